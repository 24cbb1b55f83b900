"""The model registry: every architecture the experiments compare, one entry each.

An entry says which kinds of data the model reads and how to build it for a
task. An experiment that compares "the architectures" on a kind of data takes
every registered model for that kind, so adding a model to every such
comparison is one :func:`register` call. Entries may also carry training
settings of their own (a Transformer wants warm-up and a lower learning rate);
the experiment's settings apply otherwise, and a command-line override beats both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import fnnet
from experiments._config import ConfigError
from experiments._tasks import Kind, Task
from fnnet import models

Builder = Callable[[Task], fnnet.Layer]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One architecture.

    Attributes:
      name: the registry name used in configurations (``mlp``, ``gru``, ...).
      family: the explainer's family: linear, feedforward, convolutional,
        recurrent or transformer.
      builders: ``{kind: build(task) -> Layer}`` for each kind of data it reads.
      settings: ``{kind: {field: value}}`` training settings this model uses on
        that kind instead of the experiment's (overridable from the command line).
      description: one line for ``python -m experiments list``.
    """

    name: str
    family: str
    builders: dict[str, Builder]
    settings: dict[str, dict[str, Any]]
    description: str

    def build(self, task: Task) -> fnnet.Layer:
        if task.kind not in self.builders:
            raise KeyError(
                f"model {self.name!r} cannot read {task.kind} data ({task.name}); it reads: "
                f"{', '.join(sorted(self.builders))}"
            )
        return self.builders[task.kind](task)


MODELS: dict[str, ModelEntry] = {}


def register(
    name: str,
    family: str,
    description: str,
    builders: dict[str, Builder],
    settings: dict[str, dict[str, Any]] | None = None,
) -> ModelEntry:
    """Adds a model to the registry (and so to every comparison on its kinds of data)."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    entry = ModelEntry(name, family, dict(builders), dict(settings or {}), description)
    MODELS[name] = entry
    return entry


def models_for(kind: Kind) -> tuple[str, ...]:
    """Every registered model that reads ``kind`` data, in registration order."""
    return tuple(name for name, entry in MODELS.items() if kind in entry.builders)


def get(name: str) -> ModelEntry:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(MODELS)}")
    return MODELS[name]


def reader(name: str, kind: Kind, what: str) -> ModelEntry:
    """The registry entry of ``name``, which must read ``kind`` data (``what`` names
    that data in the error, e.g. "MNIST-1D signals").

    Raises:
      KeyError: no model of that name.
      ConfigError: the model cannot read ``kind`` data; the message lists those that can.
    """
    entry = get(name)
    if kind not in entry.builders:
        raise ConfigError(
            f"model {name!r} cannot read {what}; models that can: {', '.join(models_for(kind))}"
        )
    return entry


# --- The registry -------------------------------------------------------------------
# MNIST-1D ("signal") builders follow the MNIST-1D paper's models
# (../shared/reference/mnist1d.md); the others are small, comparable sizes.


def _classes(task: Task) -> int:
    return task.num_classes


register(
    "linear",
    "linear",
    "logistic regression: one dense layer (the classical-ML baseline)",
    {kind: (lambda t: models.mlp(_classes(t), ())) for kind in ("signal", "image", "tabular")},
    # Dense layers only: the seeds' matrix products batch well side by side.
    settings={kind: {"vectorize_seeds": True} for kind in ("signal", "image", "tabular")},
)

register(
    "mlp",
    "feedforward",
    "multilayer perceptron, two hidden layers of 100 with a residual connection",
    {
        kind: (lambda t: models.mlp(_classes(t), (100, 100), residual=True))
        for kind in ("signal", "image", "tabular", "sequence")
    },
    # Its 3 seeds on MNIST-1D train 10% faster vmapped than one after another
    # (python -m bench.runner); convolutions and recurrences are faster mapped.
    settings={
        kind: {"vectorize_seeds": True} for kind in ("signal", "image", "tabular", "sequence")
    },
)

register(
    "cnn",
    "convolutional",
    "three convolutions of 25 channels (stride 2 on signals; pooling to a global "
    "average on images, so position does not matter)",
    {
        "signal": lambda t: models.cnn(
            _classes(t), (25, 25, 25), kernel_size=(5, 3, 3), strides=2, padding=1, pool=None
        ),
        "image": lambda t: models.cnn(
            _classes(t), (16, 32, 32), kernel_size=3, pool=2, global_pool=True
        ),
    },
)

register(
    "simple_rnn",
    "recurrent",
    "Elman RNN (tanh), 64 units, reading the last state",
    {"sequence": lambda t: models.rnn(_classes(t), 64, cell="simple")},
)

register(
    "lstm",
    "recurrent",
    "LSTM, 64 units on sequences; 128 units after a 64-wide embedding on text",
    {
        "sequence": lambda t: models.rnn(_classes(t), 64, cell="lstm"),
        "text": lambda t: fnnet.serial(
            embed=fnnet.embedding(t.num_classes, 64),
            rnn=models.rnn(t.num_classes, 128, cell="lstm", output="sequence"),
        ),
    },
    settings={"text": {"learning_rate": 3e-3, "clip_norm": 1.0}},
)

register(
    "gru",
    "recurrent",
    "GRU: bidirectional with 6 units and every step read out on signals (the "
    "paper's); 64 units reading the last state on sequences",
    {
        "signal": lambda t: models.rnn(
            _classes(t), 6, cell="gru", bidirectional=True, output="flatten"
        ),
        "sequence": lambda t: models.rnn(_classes(t), 64, cell="gru"),
    },
)

# The Transformer has no MNIST-1D reference. One token per sample (40 tokens of one
# value) trains poorly (about 50-58% after 1000 steps); patches of 4 samples (10
# tokens), warm-up and a cosine schedule at a lower learning rate give it a fair chance.
register(
    "transformer",
    "transformer",
    "pre-norm Transformer encoder, width 32, 2 blocks, 4 heads, mean-pooled "
    "(patches of 4 samples on signals); decoder-only, width 64, 2 blocks on text",
    {
        "signal": lambda t: models.transformer_classifier(
            _classes(t), features=32, depth=2, num_heads=4, patch_size=4, max_len=16
        ),
        "sequence": lambda t: models.transformer_classifier(
            _classes(t), features=32, depth=2, num_heads=4, max_len=t.example.shape[0]
        ),
        "text": lambda t: models.transformer_lm(
            t.num_classes, features=64, depth=2, num_heads=4, max_len=t.info["context"]
        ),
    },
    settings={
        # Its test accuracy levels off by step 3000 (a 6000-step run measured 86.0%
        # at 3000 and 86.5% at 6000), so it takes half the paper's steps.
        "signal": {
            "learning_rate": 3e-3,
            "schedule": "cosine",
            "warmup_steps": 300,
            "steps": 3000,
        },
        "sequence": {"learning_rate": 3e-3, "schedule": "cosine", "warmup_steps": 100},
        "text": {"learning_rate": 3e-3, "schedule": "cosine", "warmup_steps": 100},
    },
)
