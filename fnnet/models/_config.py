"""Models that remember how they were built, so a checkpoint can rebuild them."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import weakref
from collections.abc import Callable
from typing import Any

from fnnet._src import errors
from fnnet._src.layer import Layer

_MODELS: dict[str, Callable[..., Layer]] = {}
# Each model's config as JSON text, keyed by the model's apply function (a new closure
# for every model built, and weakly held, so a dropped model takes its entry along).
_CONFIGS: weakref.WeakKeyDictionary[Callable, str] = weakref.WeakKeyDictionary()


def records_config(factory: Callable[..., Layer]) -> Callable[..., Layer]:
    """Registers a model factory and stores each call's arguments on the layer.

    Arguments that JSON cannot hold (a custom activation function, an
    initializer) leave the model without a config (:func:`config_of` gives None):
    it still works, but a checkpoint cannot rebuild it on its own.
    """
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def wrapped(*args, **kwargs) -> Layer:
        layer = factory(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with contextlib.suppress(TypeError):  # not JSON: the model keeps no config
            _CONFIGS[layer.apply] = json.dumps(
                {"model": factory.__name__, "kwargs": bound.arguments}
            )
        return layer

    _MODELS[factory.__name__] = wrapped
    return wrapped


def config_of(model: Layer) -> dict[str, Any] | None:
    """The configuration a shipped model was built with, or None.

    Returns:
      ``{"model": name, "kwargs": {...}}``; ``build`` turns it back into the model.
    """
    text = _CONFIGS.get(model.apply)
    return None if text is None else json.loads(text)


def build(config: dict[str, Any]) -> Layer:
    """Rebuilds a model from ``config_of(model)`` (for example, from a checkpoint).

    Raises:
      LayerError: the config names no model fnnet ships, or its arguments do not fit.
    """
    if not isinstance(config, dict) or "model" not in config or "kwargs" not in config:
        errors.fail(
            "models.build", f"expected {{'model': name, 'kwargs': {{...}}}}, got {config!r}"
        )
    name = config["model"]
    if name not in _MODELS:
        errors.fail("models.build", f"unknown model {name!r}; expected one of {sorted(_MODELS)}")
    kwargs = config["kwargs"]
    try:
        signature = inspect.signature(_MODELS[name])
        signature.bind(**kwargs)
    except TypeError as e:
        errors.fail("models.build", f"arguments do not fit {name}: {e}")
    # JSON turns tuples into lists; the factories accept any sequence.
    return _MODELS[name](**kwargs)
