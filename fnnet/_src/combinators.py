"""Composition: stacks, residuals, branches and scanned repeats of layers.

Each combinator is written once against the stateful signature and becomes
stateful only when one of its children is (see :func:`fnnet.Layer`).
Parameters of children are stored under their names; a child without
parameters (an activation, a pooling) takes no entry in the tree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.layer import (
    Layer,
    apply_child,
    from_stateful,
    init_child,
    output_struct,
    split_key,
)


def fn(f: Callable[[Any], Any], name: str | None = None) -> Layer:
    """A parameter-free layer that applies ``f`` to its input.

    Args:
      f: any function of one example, e.g. ``jnp.tanh`` or ``lambda x: x[::2]``.
      name: the kind shown in summaries and errors (default: ``f.__name__``).

    Returns:
      A stateless layer with empty parameters.
    """
    kind = name or getattr(f, "__name__", "fn")

    def init(key, x):
        del key, x
        return {}

    def apply(params, x, *, key=None, train=False):
        del params, key, train
        return f(x)

    return Layer(init, apply, kind)


def _named_children(kind: str, layers: Sequence[Layer], named: dict[str, Layer]):
    """Names positional layers by kind (``dense_0``, ``dense_1``, ``relu_0``) and
    appends the explicitly named ones, checking that every child is a Layer."""
    children: list[tuple[str, Layer]] = []
    counts: dict[str, int] = {}
    for layer in layers:
        if not isinstance(layer, Layer):
            errors.fail(kind, f"expected Layer children, got {type(layer).__name__}")
        i = counts.get(layer.name, 0)
        counts[layer.name] = i + 1
        children.append((f"{layer.name}_{i}", layer))
    for name, layer in named.items():
        if not isinstance(layer, Layer):
            errors.fail(kind, f"child {name!r} is a {type(layer).__name__}, not a Layer")
        if "/" in name:
            errors.fail(kind, f"child name {name!r} may not contain '/'")
        children.append((name, layer))
    names = [n for n, _ in children]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        errors.fail(kind, f"child names must be unique, repeated: {clashes}")
    if not children:
        errors.fail(kind, "needs at least one child layer")
    return children


def serial(*layers: Layer, name: str = "serial", **named: Layer) -> Layer:
    """Applies layers one after another: ``y = f_n(...f_2(f_1(x)))``.

    Children passed by keyword keep their names (``serial(hidden=dense(100),
    out=dense(10))`` has params ``{"hidden": ..., "out": ...}``); positional
    children are named after their kind and position among that kind
    (``dense_0``, ``dense_1``). Positional children come first.

    Args:
      *layers: children named by kind.
      name: the kind shown for this stack in summaries and errors.
      **named: children with chosen names.

    Returns:
      A layer mapping the first child's input to the last child's output.
    """
    children = _named_children(name, layers, named)

    def init(key, x):
        params, state = {}, {}
        for (child, layer), k in zip(children, split_key(key, len(children))):
            p, s, x = init_child(child, layer, k, x)
            if p:
                params[child] = p
            if s:
                state[child] = s
        return params, state

    def apply(params, state, x, *, key=None, train=False):
        new_state = {}
        for (child, layer), k in zip(children, split_key(key, len(children))):
            x, s = apply_child(
                child, layer, params.get(child, {}), state.get(child, {}), x, key=k, train=train
            )
            if s:
                new_state[child] = s
        return x, new_state

    return from_stateful(init, apply, name=name, stateful=any(l.stateful for _, l in children))


def _same_struct(kind: str, x, y, what: str) -> None:
    if jnp.shape(x) != jnp.shape(y):
        errors.fail(
            kind, f"{what} must keep the input shape {jnp.shape(x)}, but gives {jnp.shape(y)}"
        )


def residual(block: Layer, name: str = "residual") -> Layer:
    """A skip connection around ``block``: ``y = x + block(x)``.

    The block's parameters are the residual's parameters (no extra nesting).
    ``block`` must map its input to the same shape.
    """

    def init(key, x):
        params, state = block.init_with_state(key, x)
        _same_struct(name, x, output_struct(block, params, state, x), "the residual block")
        return params, state

    def apply(params, state, x, *, key=None, train=False):
        fx, state = block.apply_with_state(params, state, x, key=key, train=train)
        _same_struct(name, x, fx, "the residual block")
        return x + fx, state

    return from_stateful(init, apply, name=name, stateful=block.stateful)


_MERGES: dict[str, Callable[[list], Any]] = {
    "concat": lambda ys: jnp.concatenate(ys, axis=-1),
    "sum": lambda ys: sum(ys[1:], ys[0]),
    "stack": lambda ys: jnp.stack(ys, axis=0),
}


def parallel(
    *layers: Layer,
    merge: str | Callable[[list], Any] = "concat",
    name: str = "parallel",
    **named: Layer,
) -> Layer:
    """Runs every branch on the same input and merges their outputs.

    Args:
      *layers, **named: the branches, named as in :func:`serial`.
      merge: ``"concat"`` (along the last axis), ``"sum"``, ``"stack"`` (new
        leading axis), ``"tuple"`` (return the outputs as a tuple in branch order),
        or a function of the list of outputs.
      name: the kind shown in summaries and errors.
    """
    children = _named_children(name, layers, named)
    if callable(merge):
        merge_fn = merge
    elif merge == "tuple":
        merge_fn = tuple
    elif merge in _MERGES:
        merge_fn = _MERGES[merge]
    else:
        errors.fail(
            name, f"merge must be one of {sorted([*_MERGES, 'tuple'])} or a callable, got {merge!r}"
        )

    def init(key, x):
        params, state = {}, {}
        for (child, layer), k in zip(children, split_key(key, len(children))):
            p, s, _ = init_child(child, layer, k, x)
            if p:
                params[child] = p
            if s:
                state[child] = s
        return params, state

    def apply(params, state, x, *, key=None, train=False):
        ys, new_state = [], {}
        for (child, layer), k in zip(children, split_key(key, len(children))):
            y, s = apply_child(
                child, layer, params.get(child, {}), state.get(child, {}), x, key=k, train=train
            )
            ys.append(y)
            if s:
                new_state[child] = s
        return merge_fn(ys), new_state

    return from_stateful(init, apply, name=name, stateful=any(l.stateful for _, l in children))


# repeat() unrolls its scan up to this many copies by default (see its docstring).
_UNROLL_UP_TO = 4


def repeat(
    block: Layer, n: int, name: str = "repeat", *, unroll: int | bool | None = None
) -> Layer:
    """Applies ``block`` ``n`` times with separate parameters, as one ``lax.scan``.

    Parameters (and state) of the ``n`` copies are stacked along a new leading
    axis, so a deep stack is traced once, whatever ``n`` is.
    ``block`` must map its input to the same shape and dtype. Extra keyword
    arguments to ``apply`` (a mask) are passed to every copy.

    Args:
      block: the layer to repeat.
      n: how many copies.
      name: the kind shown in summaries and errors.
      unroll: ``lax.scan``'s ``unroll``: how many copies each loop iteration
        runs (True: all, so no loop is left). The default unrolls stacks of up
        to 4 copies and loops over deeper ones. A loop keeps XLA from fusing
        across blocks and adds a slice and an update per stacked parameter;
        for the MNIST-1D transformer (2 blocks) unrolling made a CPU training
        step about a fifth faster, at the cost of compiling each copy.
    """
    errors.positive_int(n, name, "n")
    if unroll is None:
        unroll = n <= _UNROLL_UP_TO
    if not isinstance(unroll, bool) and not (isinstance(unroll, int) and unroll >= 1):
        errors.fail(name, f"unroll must be True, False or a positive int, got {unroll!r}")

    def init(key, x):
        keys = jax.random.split(key, n)
        with errors.scope("block"):
            params, state = jax.vmap(lambda k: block.init_with_state(k, x))(keys)
            first = jax.tree.map(lambda a: a[0], (params, state))
            _same_struct(name, x, output_struct(block, *first, x), "a repeated block")
        return params, state

    def apply(params, state, x, *, key=None, train=False, **kwargs):
        keys = None if key is None else jax.random.split(key, n)

        def body(h, inputs):
            p, s, k = inputs
            y, s = apply_child("block", block, p, s, h, key=k, train=train, **kwargs)
            _same_struct(name, h, y, "a repeated block")
            return y.astype(h.dtype), s

        y, new_state = jax.lax.scan(body, x, (params, state, keys), length=n, unroll=unroll)
        return y, new_state

    return from_stateful(init, apply, name=name, stateful=block.stateful)
