"""The layer protocol: a named pair of pure functions, and composites written once.

A :class:`Layer` is ``init`` and ``apply``:

* ``init(key, x) -> params`` takes a PRNG key and **one example** ``x`` (an array or
  a ``jax.ShapeDtypeStruct``; only its shape and dtype are read) and returns the
  parameters, a nested dict of arrays with human-chosen names.
* ``apply(params, x, *, key=None, train=False, **inputs) -> y`` maps one example to
  one output. ``key`` is needed only by layers that draw random numbers while
  training (dropout); ``train`` switches training behaviour on; ``inputs`` are the
  layer's own keyword inputs (an attention ``mask``, sequence ``lengths``).

Batching is always ``jax.vmap``. Sizes, activations and flags live in the closure
of the factory that built the layer, never in ``params``, so ``jax.jit``,
``jax.grad``, ``jax.vmap`` and ``jax.lax.scan`` apply to a model directly.

**The calling convention.** ``apply`` returns its output first. A call that hands
something on to the next call returns it second, as ``(y, that)``:

* a *stateful* layer (``layer.stateful``; BatchNorm, and every composite holding
  one) takes its non-trained ``state`` after ``params`` and returns the new one:
  ``init(key, x) -> (params, state)``, ``apply(params, state, x, ...) -> (y, state)``;
* attention called with ``cache=`` returns ``(y, new_cache)``;
* a recurrent layer built with ``return_carry=True`` returns ``(y, final_carry)``.

Code that handles every layer alike (combinators, the training engine) calls
:meth:`Layer.init_with_state` and :meth:`Layer.apply_with_state`, which give every
layer the stateful signature (``state`` is ``{}`` for a stateless layer).

**Composites** are written once, as a forward function, with :func:`composite`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnnet._src import errors

Params = dict[str, Any]
State = dict[str, Any]


class Layer(NamedTuple):
    """A pure-function layer: ``init`` and ``apply``, its kind and whether it has state.

    Attributes:
      init: ``init(key, x) -> params`` (or ``(params, state)`` when stateful).
      apply: ``apply(params, x, *, key=None, train=False, **inputs) -> y``
        (or ``apply(params, state, x, ...) -> (y, state)`` when stateful).
      kind: what sort of layer this is (``"dense"``, ``"transformer_block"``), shown
        in error messages and summaries. A layer's *name* is the one its parent
        gives it (its key in the parameter tree).
      stateful: whether the layer carries non-trainable state.
    """

    init: Callable[..., Any]
    apply: Callable[..., Any]
    kind: str = "layer"
    stateful: bool = False

    def init_with_state(self, key: jax.Array, x: Any, **inputs: Any) -> tuple[Params, State]:
        """``init`` with the stateful signature: returns ``(params, state)``.

        Keyword inputs go to ``init`` unchanged (attention's ``context``).
        """
        out = self.init(key, x, **inputs)
        return out if self.stateful else (out, {})

    def apply_with_state(
        self,
        params: Params,
        state: State,
        x: Any,
        *,
        key: jax.Array | None = None,
        train: bool = False,
        **inputs: Any,
    ) -> tuple[Any, State]:
        """``apply`` with the stateful signature: returns ``(y, new_state)``.

        Keyword inputs (a mask, sequence lengths) go to ``apply`` unchanged.
        """
        if self.stateful:
            return self.apply(params, state, x, key=key, train=train, **inputs)
        return self.apply(params, x, key=key, train=train, **inputs), state


def output_struct(layer: Layer, params: Params, state: State, x: Any) -> Any:
    """The shape and dtype of ``layer``'s output, computed without running it."""

    def forward(params, state, x):
        return layer.apply_with_state(params, state, x, key=None, train=False)[0]

    return jax.eval_shape(forward, params, state, x)


def shape_of(x: Any) -> Any:
    """``x`` (a pytree of arrays or shape structs) as ``jax.ShapeDtypeStruct`` leaves."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), x)


def child_key(key: jax.Array | None, name: str) -> jax.Array | None:
    """The key of the child called ``name``: derived from the name, not the order.

    Adding, removing or reordering a composite's children therefore never changes
    the initialization (or the dropout) of another child.
    """
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


# --- Which keyword inputs a layer takes -------------------------------------------

_OWN = ("key", "train")


@functools.lru_cache(maxsize=4096)
def _accepted(apply: Callable) -> frozenset[str] | None:
    """The keyword inputs ``apply`` takes (besides key and train), or None for any."""
    try:
        parameters = inspect.signature(apply).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _OWN
    )


def accepted_inputs(layer: Layer, inputs: dict[str, Any], *, init=False) -> dict[str, Any]:
    """The part of ``inputs`` that ``layer.apply`` (or ``layer.init``) takes by keyword."""
    names = _accepted(layer.init if init else layer.apply)
    return dict(inputs) if names is None else {k: v for k, v in inputs.items() if k in names}


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
        log[slot] = (errors.current_path(), layer.kind, params, y)


def apply_recorded(layer: Layer, params: Params, state: State, x: Any, **kw: Any):
    """``layer.apply_with_state``, recorded as a row of a summary being taken."""
    slot = _reserve()
    y, state = layer.apply_with_state(params, state, x, **kw)
    record(slot, layer, params, y)
    return y, state


def same_signature(apply: Callable, like: Callable) -> Callable:
    """Gives a wrapper's ``apply`` the keyword inputs of the layer it wraps."""
    with contextlib.suppress(TypeError, ValueError):  # a builtin: nothing to advertise
        apply.__signature__ = inspect.signature(like)
    return apply


def recording() -> tuple[contextvars.Token, list]:
    log: list = []
    return _RECORDER.set(log), log


def stop_recording(token: contextvars.Token) -> None:
    _RECORDER.reset(token)


# --- Composites: one forward function, run to initialize and to apply -----------


def _check_child(kind: str, name: Any, layer: Any) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        errors.fail(kind, f"a child's name must be a non-empty string without '/', got {name!r}")
    if not isinstance(layer, Layer):
        errors.fail(kind, f"child {name!r} is a {type(layer).__name__}, not a Layer")


class Call:
    """What a composite's forward calls its children with: ``call(name, layer, x, **inputs)``.

    While initializing, ``call`` initializes ``layer`` from the shape of ``x`` with a
    key derived from ``name`` and returns the output (shapes only; nothing runs).
    While applying, it applies ``layer`` with ``params[name]`` and returns what the
    child's ``apply`` returns, less its state, which ``call`` keeps. ``train`` and
    the key reach every child without being passed by hand; keyword inputs reach a
    child only if its ``apply`` takes them.

    Calling the same name again with the same layer reuses its parameters (tied
    weights). ``call.initializing`` tells the two modes apart, for the rare forward
    that must.
    """

    def __init__(self, kind, key, params, state, train, *, initializing, stateful):
        self.kind = kind
        self.initializing = initializing
        self.train = train
        self._key = key
        self._stateful = stateful
        self._params = params
        self._state = state
        self._new_state: State = dict(state)  # a child not called keeps its state
        self._layers: dict[str, Layer] = {}
        self.used_inputs: set[str] = set()

    def __call__(self, name: str, layer: Layer, x: Any, **inputs: Any) -> Any:
        _check_child(self.kind, name, layer)
        seen = self._layers.setdefault(name, layer)
        if seen is not layer:
            errors.fail(
                self.kind,
                f"child {name!r} is called with two different layers ({seen.kind} and "
                f"{layer.kind}); give each its own name",
            )
        if layer.stateful and not self._stateful:
            errors.fail(
                self.kind,
                f"child {name!r} ({layer.kind}) is stateful; build this composite with "
                "stateful=True",
            )
        inputs = accepted_inputs(layer, inputs)
        self.used_inputs.update(inputs)
        with errors.scope(name):
            if self.initializing:
                return self._init(name, layer, x, inputs)
            return self._apply(name, layer, x, inputs)

    def _init(self, name, layer, x, inputs):
        if name not in self._params and name not in self._state:
            key = self._key
            given = shape_of(accepted_inputs(layer, inputs, init=True))
            if isinstance(key, jax.core.Tracer):  # init under jit / vmap: all is staged
                params, state = layer.init_with_state(child_key(key, name), shape_of(x), **given)
            else:  # x is traced by eval_shape; the child's values are computed now
                with jax.ensure_compile_time_eval():
                    k = child_key(key, name)
                    params, state = layer.init_with_state(k, shape_of(x), **given)
            if params:
                self._params[name] = params
            if state:
                self._state[name] = state
        params, state = self._params.get(name, {}), self._state.get(name, {})
        return layer.apply_with_state(params, state, x, key=None, train=False, **inputs)[0]

    def _apply(self, name, layer, x, inputs):
        params = self._params.get(name, {})
        state = self._new_state.get(name, {})
        y, state = apply_recorded(
            layer, params, state, x, key=child_key(self._key, name), train=self.train, **inputs
        )
        if state:
            self._new_state[name] = state
        return y

    def check_all_used(self, inputs: dict[str, Any], free: bool) -> None:
        """After apply: every parameter entry and keyword input reached a child."""
        unused = sorted(set(self._params) - set(self._layers))
        if unused:
            errors.fail(
                "params",
                f"{self.kind} has no child named {unused}; were these params made by a "
                f"different model? (children: {sorted(self._layers)})",
            )
        if free:
            ignored = sorted(k for k, v in inputs.items() if v is not None)
            ignored = [k for k in ignored if k not in self.used_inputs]
            if ignored:
                errors.fail(self.kind, f"no layer inside takes the keyword input(s) {ignored}")


def composite(forward: Callable[..., Any], kind: str, *, stateful: bool = False) -> Layer:
    """A layer made of named children, written once as its forward pass.

    ``forward(call, x, **inputs)`` computes the output from one example ``x``,
    calling each child as ``call(name, layer, h, **child_inputs)`` (see
    :class:`Call`). The same function initializes the composite (``call`` builds
    each child from the shape that reaches it, so a flatten size is never
    computed by hand) and applies it. Parameters are ``{name: child params}``
    for every child that has any; state likewise.

    Args:
      forward: the forward pass. Its keyword parameters are the composite's
        keyword inputs; with ``**inputs`` it takes any and passes them on (an
        input that no child takes is an error, not silently dropped).
      kind: the kind shown in summaries and errors.
      stateful: the composite holds a stateful child (BatchNorm), so it takes and
        returns ``state``.

    Returns:
      A :class:`Layer`; its ``apply`` returns what ``forward`` returns.
    """
    signature = inspect.signature(forward)
    free = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

    def init(key, x):
        params, state = {}, {}
        call = Call(kind, key, params, state, False, initializing=True, stateful=stateful)
        if isinstance(key, jax.core.Tracer):
            zeros = jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), a.dtype), x)
            forward(call, zeros)
        else:
            jax.eval_shape(lambda x: forward(call, x), shape_of(x))
        return (params, state) if stateful else params

    takes = [p.name for p in signature.parameters.values()][2:]

    def run(params, state, x, key, train, inputs):
        if not free and set(inputs) - set(takes):
            errors.fail(
                kind,
                f"unknown keyword input(s) {sorted(set(inputs) - set(takes))}; "
                f"{kind} takes {takes or 'none'}",
            )
        call = Call(kind, key, params, state, train, initializing=False, stateful=stateful)
        y = forward(call, x, **inputs)
        call.check_all_used(inputs, free)
        return y, call._new_state

    if stateful:

        def apply(params, state, x, *, key=None, train=False, **inputs):
            return run(params, state, x, key, train, inputs)

    else:

        def apply(params, x, *, key=None, train=False, **inputs):
            return run(params, {}, x, key, train, inputs)[0]

    # Advertise forward's keyword inputs, so a parent passes this layer only those.
    own = [p for p in signature.parameters.values()][2:]
    head = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if stateful:
        head.append(inspect.Parameter("state", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    head.append(inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    tail = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
        for n, d in (("key", None), ("train", False))
    ]
    apply.__signature__ = inspect.Signature(head + tail + own)
    apply.__doc__ = forward.__doc__
    return Layer(init, apply, kind, stateful)
