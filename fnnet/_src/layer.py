"""The layer protocol: a named pair of pure functions.

A :class:`Layer` is ``init`` and ``apply``:

* ``init(key, x) -> params`` takes a PRNG key and **one example** ``x`` (an array or
  a ``jax.ShapeDtypeStruct``; only its shape and dtype are read) and returns the
  parameters, a nested dict of arrays with human-chosen names.
* ``apply(params, x, *, key=None, train=False) -> y`` maps one example to one output.
  ``key`` is needed only by layers that draw random numbers while training
  (dropout); ``train`` switches training behaviour on.

Batching is always ``jax.vmap``. Sizes, activations and flags live in the closure
of the factory that built the layer, never in ``params``, so ``jax.jit``,
``jax.grad``, ``jax.vmap`` and ``jax.lax.scan`` apply to a model directly.

A *stateful* layer (``layer.stateful is True``; BatchNorm, and every composite
that contains one) carries a second tree, ``state``, that is not trained by
gradients:

* ``init(key, x) -> (params, state)``
* ``apply(params, state, x, *, key=None, train=False) -> (y, new_state)``

Code that must handle both kinds (combinators, the training engine) calls
:meth:`Layer.init_with_state` and :meth:`Layer.apply_with_state`, which give every
layer the stateful signature (``state`` is ``{}`` for a stateless layer).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fnnet._src import errors

Params = dict[str, Any]
State = dict[str, Any]


class Layer(NamedTuple):
    """A pure-function layer: ``init`` and ``apply`` plus a name and a state flag.

    Attributes:
      init: ``init(key, x) -> params`` (or ``(params, state)`` when stateful).
      apply: ``apply(params, x, *, key=None, train=False) -> y``
        (or ``apply(params, state, x, ...) -> (y, state)`` when stateful).
      name: the kind of layer, used in error messages and summaries.
      stateful: whether the layer carries non-trainable state.
      config: for the models fnnet ships, the JSON text of the call that built the
        layer (see ``fnnet.models.build``), so a checkpoint can rebuild it; else None.
        Text rather than a dict keeps the layer hashable.
    """

    init: Callable[..., Any]
    apply: Callable[..., Any]
    name: str = "layer"
    stateful: bool = False
    config: str | None = None

    def init_with_state(self, key: jax.Array, x: Any) -> tuple[Params, State]:
        """``init`` with the stateful signature: returns ``(params, state)``."""
        out = self.init(key, x)
        return out if self.stateful else (out, {})

    def apply_with_state(
        self,
        params: Params,
        state: State,
        x: Any,
        *,
        key: jax.Array | None = None,
        train: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, State]:
        """``apply`` with the stateful signature: returns ``(y, new_state)``.

        Extra keyword arguments (a mask, sequence lengths) go to ``apply`` unchanged.
        """
        if self.stateful:
            return self.apply(params, state, x, key=key, train=train, **kwargs)
        return self.apply(params, x, key=key, train=train, **kwargs), state


def from_stateful(
    init_with_state: Callable[[jax.Array, Any], tuple[Params, State]],
    apply_with_state: Callable[..., tuple[Any, State]],
    *,
    name: str,
    stateful: bool,
) -> Layer:
    """Builds a layer from stateful-signature functions.

    Combinators are written once against the stateful signature; this gives the
    result the plain signature when none of its children has state.
    """
    if stateful:
        return Layer(init_with_state, apply_with_state, name, True)

    def init(key, x):
        return init_with_state(key, x)[0]

    def apply(params, x, *, key=None, train=False, **kwargs):
        return apply_with_state(params, {}, x, key=key, train=train, **kwargs)[0]

    return Layer(init, apply, name, False)


def output_struct(layer: Layer, params: Params, state: State, x: Any) -> Any:
    """The shape and dtype of ``layer``'s output, computed without running it."""

    def forward(params, state, x):
        return layer.apply_with_state(params, state, x, key=None, train=False)[0]

    return jax.eval_shape(forward, params, state, x)


# --- Recording every child's output, for fnnet.summary --------------------------

_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "fnnet_recorder", default=None
)


def _reserve() -> int | None:
    """Reserves the current layer's row, so parents are listed before children."""
    log = _RECORDER.get()
    if log is None:
        return None
    log.append(None)
    return len(log) - 1


def record(slot: int | None, layer: Layer, params: Params, y: Any) -> None:
    """Fills a reserved row while a summary is being taken (otherwise a no-op)."""
    log = _RECORDER.get()
    if log is not None and slot is not None:
        log[slot] = (errors.current_path(), layer.name, params, y)


def recording() -> tuple[contextvars.Token, list]:
    log: list = []
    return _RECORDER.set(log), log


def stop_recording(token: contextvars.Token) -> None:
    _RECORDER.reset(token)


# --- Calling children ---------------------------------------------------------


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys, or ``n`` Nones when there is no key."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


def init_child(name: str, layer: Layer, key: jax.Array, x: Any):
    """Initializes ``layer`` as child ``name``; returns ``(params, state, y_struct)``."""
    with errors.scope(name):
        params, state = layer.init_with_state(key, x)
        return params, state, output_struct(layer, params, state, x)


def apply_child(
    name: str,
    layer: Layer,
    params: Params,
    state: State,
    x: Any,
    *,
    key: jax.Array | None,
    train: bool,
    **kwargs: Any,
) -> tuple[Any, State]:
    """Applies ``layer`` as child ``name``; returns ``(y, new_state)``."""
    with errors.scope(name):
        slot = _reserve()
        y, new_state = layer.apply_with_state(params, state, x, key=key, train=train, **kwargs)
        record(slot, layer, params, y)
        return y, new_state
