"""fnnet's experiments: the architectures trained side by side on real tasks.

``python -m experiments list | run NAME... | report``; see ``docs/experiments.md``.
Each file in ``experiments/suite/`` defines one experiment; ``_models.py`` is the
model registry.
"""

from experiments._config import ConfigError, TrainConfig
from experiments._experiment import Experiment, Run, settings_for
from experiments._models import MODELS, register
from experiments._suite import execute, plan

__all__ = [
    "MODELS", "ConfigError", "Experiment", "Run", "TrainConfig", "execute", "plan",
    "register", "settings_for",
]  # fmt: skip
