"""What an experiment is: a question, a typed configuration, and the runs that answer it.

Each module in ``experiments/suite/`` defines one ``EXPERIMENT``; the modules
are found by listing the package, so adding an experiment is adding a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import json
import pkgutil
from collections.abc import Callable
from typing import Any

from experiments._config import ConfigError, TrainConfig, field_names, to_json
from experiments._tasks import Task
from fnnet.train._precision import describe_policy, resolve_policy


def _describe_loader(loader: Callable) -> str:
    """``loader`` as text for fingerprints: a ``functools.partial`` with its arguments."""
    if isinstance(loader, functools.partial):
        func = loader.func
        keywords = sorted(loader.keywords.items())
        return f"{func.__module__}.{func.__qualname__}{loader.args}{keywords}"
    return f"{loader.__module__}.{loader.__qualname__}"


@dataclasses.dataclass(frozen=True)
class Run:
    """One model trained on one task, all seeds together.

    Attributes:
      key: unique within the experiment, used for file names (``mlp``,
        ``cnn-depth3``).
      model: the model's name in tables.
      task: a loader of the dataset, a ``functools.partial`` of a cached loader
        from ``experiments._tasks`` (its arguments enter the fingerprint).
      settings: the resolved training settings.
      labels: extra columns for this run's rows (``depth``, ``length``, ...).
      build: ``build(task) -> Layer`` for an fnnet model.
      classical: for a scikit-learn model instead, ``classical(seed) -> estimator``.
      after: ``after(model, params, task) -> [dict]``, called once training ends with
        the replicas' stacked params; one dict of extra columns per seed (a text
        sample, say).
    """

    key: str
    model: str
    task: Callable[[], Task]
    settings: TrainConfig
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    build: Callable[[Task], Any] | None = None
    classical: Callable[[int], Any] | None = None
    after: Callable[..., list[dict]] | None = None

    def fingerprint(self) -> str:
        """A short hash of everything that decides this run's results."""
        facts = {
            "key": self.key,
            "model": self.model,
            "settings": to_json(self.settings),
            "labels": self.labels,
            "task": _describe_loader(self.task),
        }
        if self.classical is None and getattr(self.settings, "compute_dtype", None) == "auto":
            # What "auto" means here decides the results: float32 on the CPU,
            # bfloat16 compute on an accelerator.
            facts["precision"] = describe_policy(resolve_policy("auto"))
        text = json.dumps(facts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def work(self) -> int:
        """Units of progress this run contributes (steps; 1 for a classical model)."""
        return self.settings.steps if self.classical is None else 1


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment definition.

    Attributes:
      name: the command-line name.
      title: a heading.
      question: the question it answers, in one or two sentences.
      config: the default configuration (a dataclass, usually a ``TrainConfig``
        subclass with the experiment's own fields).
      quick: overrides applied by ``--quick`` (same syntax as the command line).
      runs: ``runs(config, explicit) -> [Run]``; ``explicit`` holds the fields set on
        the command line or by ``--quick``, which a model's own settings must not change.
      answer: ``answer(config, rows) -> markdown``: what the numbers say, and any
        extra tables, for the summary.
      plots: ``plots(config, rows, curves, out_dir, *, styles) -> [file names]``
        beyond the standard ones (learning curves, metric against parameters and
        time); ``styles`` is the experiment's ``_report.style_map``, to pass to the
        ``_report.plot_*`` functions so each model looks the same in every plot.
      reference: markdown for the summary's reference section (published numbers).
    """

    name: str
    title: str
    question: str
    config: Any
    runs: Callable[[Any, set[str]], list[Run]]
    answer: Callable[[Any, list[dict]], str]
    quick: dict[str, str] = dataclasses.field(default_factory=dict)
    plots: Callable[..., list[str]] | None = None
    reference: str = ""


def discover() -> dict[str, Experiment]:
    """Every experiment in ``experiments.suite``, in the order of their ``ORDER``."""
    from experiments import suite

    found = []
    for info in pkgutil.iter_modules(suite.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"experiments.suite.{info.name}")
        experiment = getattr(module, "EXPERIMENT", None)
        if not isinstance(experiment, Experiment):
            raise TypeError(f"experiments/suite/{info.name}.py defines no EXPERIMENT")
        found.append((getattr(module, "ORDER", 100), experiment))
    found.sort(key=lambda pair: (pair[0], pair[1].name))
    names = [e.name for _, e in found]
    if len(set(names)) != len(names):
        raise ValueError(f"two experiments share a name: {names}")
    return {e.name: e for _, e in found}


def resolve_names(requested: list[str], known: dict[str, Experiment]) -> list[str]:
    """Experiment names in suite order; ``all`` (or nothing) means every one.

    Raises:
      ConfigError: a name no experiment has (with the nearest ones), or a field name
        given without ``=`` (``steps 100``, which the message rewrites as ``steps=100``).
    """
    if not requested or requested == ["all"]:
        return list(known)
    fields = {f for e in known.values() for f in field_names(e.config)}
    for i, name in enumerate(requested):
        if name in fields and name not in known:
            value = requested[i + 1] if i + 1 < len(requested) else "VALUE"
            value = "VALUE" if value in known or value in fields else value
            raise ConfigError(
                f"{name!r} is a field, not an experiment; write {name}={value} "
                "(FIELD=VALUE, no spaces)"
            )
    unknown = [n for n in requested if n not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*known, "all"], n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown experiment {', '.join(map(repr, unknown))}; valid: "
            f"{', '.join(known)} (or all){hint}"
        )
    return [n for n in known if n in requested]


def settings_for(config: Any, model: str, kind: str, explicit: set[str], **changes) -> TrainConfig:
    """The training settings of one run: the experiment's, then the model's own
    settings for this kind of data (``ModelEntry.settings``) except fields the user
    set explicitly, then ``changes``."""
    from experiments._models import get

    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    own = get(model).settings.get(kind, {})
    base.update({k: v for k, v in own.items() if k not in explicit})
    if "steps" in explicit and "warmup_steps" in own and "warmup_steps" not in explicit:
        # The model's warm-up is a share of the run it was tuned for; a run of other
        # length warms up for the same share (steps=100 would otherwise be refused
        # for a 300-step warm-up the user never asked for).
        tuned = own.get("steps", type(config)().steps)
        base["warmup_steps"] = own["warmup_steps"] * base["steps"] // tuned
    base.update(changes)
    return TrainConfig(**base)
