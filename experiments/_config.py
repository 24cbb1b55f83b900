"""Typed experiment configurations, and overrides from the command line.

A configuration is a frozen dataclass. Every field has a type annotation, and
that annotation is the whole of the parsing rules: ``steps=3000`` becomes an int,
``models=mlp,cnn`` a tuple of strings, ``optimizer=adamw`` is checked against
its ``Literal`` choices. An unknown field, an unparsable value or a value that
breaks a rule (``Config.check``) raises :class:`ConfigError`, which names the
field and says what would be valid, before any training starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["constant", "cosine"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return (_whole(value) or isinstance(value, float)) and math.isfinite(value)


# What each numeric field of TrainConfig accepts: a test, and the rule as errors say it.
_RULES = {
    "seeds": (lambda v: _whole(v) and v >= 1, "a positive integer (e.g. seeds=3)"),
    "steps": (lambda v: _whole(v) and v >= 1, "a positive integer (e.g. steps=1000)"),
    "batch_size": (lambda v: _whole(v) and v >= 1, "a positive integer (e.g. batch_size=100)"),
    "eval_every": (lambda v: _whole(v) and v >= 1, "a positive integer (e.g. eval_every=250)"),
    "warmup_steps": (
        lambda v: _whole(v) and v >= 0,
        "an integer of at least 0 (0: none; e.g. warmup_steps=100)",
    ),
    "learning_rate": (
        lambda v: _finite(v) and v > 0,
        "positive and finite (e.g. learning_rate=1e-3)",
    ),
    "weight_decay": (
        lambda v: _finite(v) and v >= 0,
        "finite and at least 0 (0: none; e.g. weight_decay=1e-4)",
    ),
    "clip_norm": (
        lambda v: _finite(v) and v >= 0,
        "finite and at least 0 (0: no clipping; e.g. clip_norm=1.0)",
    ),
}


class ConfigError(ValueError):
    """A configuration field, value or experiment name that cannot be used."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What every experiment that trains fnnet models shares.

    Attributes:
      models: model names from the registry (``python -m experiments list`` shows them).
      seeds: independent replicas per model, trained side by side in one program.
      steps: training steps per run.
      batch_size: examples per step.
      learning_rate: the peak learning rate.
      optimizer: ``adam``, ``adamw`` (decoupled weight decay, not on biases and norms)
        or ``sgd`` (with momentum 0.9).
      schedule: ``constant``, or ``cosine`` decay to zero after the warm-up.
      warmup_steps: linear warm-up from zero over this many steps.
      weight_decay: for ``adamw``.
      clip_norm: clip gradients to this global norm (0: no clipping).
      eval_every: steps between evaluations on the test set (the learning curves).
      shuffle: reshuffle the training set every epoch (False: dataset order).
      vectorize_seeds: train the seeds side by side (``jax.vmap``; faster on the
        CPU for small dense models, each seed equal to its own run to float32
        rounding) instead of one after another (each seed bit for bit its own run).
      compute_dtype: ``auto`` (bfloat16 compute with float32 parameters on GPUs
        and TPUs, float32 on the CPU), ``float32`` or ``bfloat16``: ``fit``'s
        ``policy``. Each summary states the precision its runs used. (Not the
        command line's ``--precision``, which sets how float32 matrix products
        are computed.)
    """

    models: tuple[str, ...] = ()
    seeds: int = 3
    steps: int = 1000
    batch_size: int = 100
    learning_rate: float = 1e-2
    optimizer: Optimizer = "adam"
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    eval_every: int = 250
    shuffle: bool = True
    vectorize_seeds: bool = False
    compute_dtype: ComputeDtype = "auto"

    def check(self) -> None:
        """Raises :class:`ConfigError` for values no run could use."""
        for name, (fits, rule) in _RULES.items():
            value = getattr(self, name)
            if not fits(value):
                raise ConfigError(f"{name} must be {rule}, got {value!r}")
        if self.steps % self.eval_every:
            raise ConfigError(
                f"eval_every ({self.eval_every}) must divide steps ({self.steps}), so the "
                "last evaluation falls on the last step"
            )
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) must be less than steps ({self.steps})"
            )
        if not self.models:
            raise ConfigError("models is empty; name at least one model")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"models lists a model twice: {list(self.models)}")


def field_names(config: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(config)]


def _parse(name: str, text: str, kind: Any) -> Any:
    """``text`` as a value of type ``kind`` (an annotation), or ConfigError."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if text not in choices:
            raise ConfigError(f"{name}={text!r} is not valid; choose one of {list(choices)}")
        return text
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in typing.get_args(kind):
            if option is type(None):
                if text.lower() in ("none", "null", ""):
                    return None
                continue
            try:
                return _parse(name, text, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}={text!r} is not valid: " + "; ".join(errors))
    if origin is tuple:
        (item, _) = typing.get_args(kind)
        if text.strip() == "":
            return ()
        return tuple(_parse(name, part.strip(), item) for part in text.split(","))
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{name}={text!r} is not valid; expected true or false")
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"{name}={text!r} is not valid; expected {what}") from None
        if not math.isfinite(value):  # float() reads inf and nan; no field wants them
            raise ConfigError(f"{name}={text!r} is not valid; expected a finite number")
        return value
    if kind is str:
        return text
    raise TypeError(f"field {name} has an annotation the parser does not handle: {kind!r}")


def apply_overrides(config: Any, overrides: dict[str, str]) -> Any:
    """``config`` with fields replaced by values parsed from text.

    Args:
      config: a configuration dataclass instance.
      overrides: ``{field: text}``, e.g. ``{"steps": "3000", "models": "mlp,cnn"}``.

    Raises:
      ConfigError: an unknown field (the message lists the valid ones) or a bad value.
    """
    hints = typing.get_type_hints(type(config))
    valid = field_names(config)
    changes = {}
    for name, text in overrides.items():
        if name not in valid:
            raise ConfigError(
                f"{type(config).__name__} has no field {name!r}; valid fields: {', '.join(valid)}"
            )
        changes[name] = _parse(name, text, hints[name])
    return dataclasses.replace(config, **changes)


def changes(config: Any, default: Any, *, ignore: tuple[str, ...] = ("models", "seeds")):
    """``{field: (value, default value)}`` for each field of ``config`` that differs
    from ``default``'s, except ``ignore``: by default the choice of models and how
    many seeds, which change what is run, not how each model is trained."""
    return {
        name: (getattr(config, name), getattr(default, name))
        for name in field_names(config)
        if name not in ignore and getattr(config, name) != getattr(default, name)
    }


def to_json(config: Any) -> dict[str, Any]:
    """The configuration as JSON-able values (tuples become lists)."""
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in dataclasses.asdict(config).items()
    }
