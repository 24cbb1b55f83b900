"""Composition: stacks, residuals, branches and scanned repeats of layers.

``serial`` and ``parallel`` are composites (:func:`fnnet.composite`) written as
their forward pass; ``residual`` and ``repeat`` wrap one block. Each is stateful
when one of its children is (see :class:`fnnet.Layer`). Parameters of children
are stored under their names; a child without parameters (an activation, a
pooling) takes no entry in the tree. Keyword inputs (a ``mask``, ``lengths``)
reach every child whose ``apply`` takes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.layer import (
    Layer,
    accepted_inputs,
    apply_recorded,
    composite,
    output_struct,
    same_signature,
)


def _named_children(kind: str, layers: Sequence[Layer], named: dict[str, Layer]):
    """Names positional layers by kind (``dense_0``, ``dense_1``, ``relu_0``) and
    appends the explicitly named ones, checking that every child is a Layer."""
    children: list[tuple[str, Layer]] = []
    counts: dict[str, int] = {}
    for layer in layers:
        if not isinstance(layer, Layer):
            errors.fail(kind, f"expected Layer children, got {type(layer).__name__}")
        i = counts.get(layer.kind, 0)
        counts[layer.kind] = i + 1
        children.append((f"{layer.kind}_{i}", layer))
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


def serial(*layers: Layer, kind: str = "serial", **named: Layer) -> Layer:
    """Applies layers one after another: ``y = f_n(...f_2(f_1(x)))``.

    Children passed by keyword keep their names (``serial(hidden=dense(100),
    out=dense(10))`` has params ``{"hidden": ..., "out": ...}``); positional
    children are named after their kind and position among that kind
    (``dense_0``, ``dense_1``). Positional children come first.

    Args:
      *layers: children named by kind.
      kind: the kind shown for this stack in summaries and errors.
      **named: children with chosen names.

    Returns:
      A layer mapping the first child's input to the last child's output.
    """
    children = _named_children(kind, layers, named)

    def forward(call, x, **inputs):
        for name, layer in children:
            x = call(name, layer, x, **inputs)
        return x

    return composite(forward, kind, stateful=any(l.stateful for _, l in children))


def _same_shape(kind: str, x, y, what: str) -> None:
    if jnp.shape(x) != jnp.shape(y):
        errors.fail(
            kind, f"{what} must keep the input shape {jnp.shape(x)}, but gives {jnp.shape(y)}"
        )


def residual(block: Layer, kind: str = "residual") -> Layer:
    """A skip connection around ``block``: ``y = x + block(x)``.

    The block's parameters are the residual's parameters (no extra nesting).
    ``block`` must map its input to the same shape.
    """

    def init(key, x):
        params, state = block.init_with_state(key, x)
        _same_shape(kind, x, output_struct(block, params, state, x), "the residual block")
        return (params, state) if block.stateful else params

    def apply_with_state(params, state, x, *, key=None, train=False, **inputs):
        inputs = accepted_inputs(block, inputs)
        fx, state = block.apply_with_state(params, state, x, key=key, train=train, **inputs)
        _same_shape(kind, x, fx, "the residual block")
        return x + fx.astype(x.dtype), state

    if block.stateful:
        return Layer(init, same_signature(apply_with_state, block.apply), kind, True)

    def apply(params, x, *, key=None, train=False, **inputs):
        return apply_with_state(params, {}, x, key=key, train=train, **inputs)[0]

    return Layer(init, same_signature(apply, block.apply), kind)


_MERGES: dict[str, Callable[[list], Any]] = {
    "concat": lambda ys: jnp.concatenate(ys, axis=-1),
    "sum": lambda ys: sum(ys[1:], ys[0]),
    "stack": lambda ys: jnp.stack(ys, axis=0),
    "tuple": tuple,
}


def parallel(
    *layers: Layer,
    merge: str | Callable[[list], Any] = "concat",
    kind: str = "parallel",
    **named: Layer,
) -> Layer:
    """Runs every branch on the same input and merges their outputs.

    Args:
      *layers, **named: the branches, named as in :func:`serial`.
      merge: ``"concat"`` (along the last axis), ``"sum"``, ``"stack"`` (new
        leading axis), ``"tuple"`` (return the outputs as a tuple in branch order),
        or a function of the list of outputs.
      kind: the kind shown in summaries and errors.
    """
    children = _named_children(kind, layers, named)
    if callable(merge):
        merge_fn = merge
    elif merge in _MERGES:
        merge_fn = _MERGES[merge]
    else:
        errors.fail(kind, f"merge must be one of {sorted(_MERGES)} or a callable, got {merge!r}")

    def forward(call, x, **inputs):
        return merge_fn([call(name, layer, x, **inputs) for name, layer in children])

    return composite(forward, kind, stateful=any(l.stateful for _, l in children))


# repeat() unrolls its scan up to this many copies by default (see its docstring).
_UNROLL_UP_TO = 4


# The policies of jax.checkpoint_policies that take no arguments, by name (the
# others, such as save_only_these_names, are built by the caller and passed as is).
_REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)


def _remat_policy(kind: str, remat):
    """``remat`` as ``(on, policy)``: checked, a policy name looked up."""
    if remat is False or remat is None:
        return False, None
    if remat is True:
        return True, None
    if isinstance(remat, str):
        if remat not in _REMAT_POLICIES:
            errors.fail(
                kind,
                f"remat={remat!r} is not a policy name; expected True, False, one of "
                f"{list(_REMAT_POLICIES)}, or a jax.checkpoint_policies policy",
            )
        return True, getattr(jax.checkpoint_policies, remat)
    if callable(remat):
        return True, remat
    errors.fail(
        kind,
        f"remat must be True, False, a policy name or a jax.checkpoint policy, got {remat!r}",
    )


def repeat(
    block: Layer,
    n: int,
    kind: str = "repeat",
    *,
    unroll: int | bool | None = None,
    remat: bool | str | Callable = False,
) -> Layer:
    """Applies ``block`` ``n`` times with separate parameters, as one ``lax.scan``.

    Parameters (and state) of the ``n`` copies are stacked along a new leading
    axis, so a deep stack is traced once, whatever ``n`` is.
    ``block`` must map its input to the same shape and dtype. Keyword inputs to
    ``apply`` (a mask) are passed to every copy, except a ``cache``: that holds
    one cache per copy, stacked along a leading axis of ``n``; each copy reads
    its own and ``apply`` returns ``(y, new_cache)``.

    Args:
      block: the layer to repeat.
      n: how many copies.
      kind: the kind shown in summaries and errors.
      unroll: ``lax.scan``'s ``unroll``: how many copies each loop iteration
        runs (True: all, so no loop is left). The default unrolls stacks of up
        to 4 copies and loops over deeper ones. A loop keeps XLA from fusing
        across blocks and adds a slice and an update per stacked parameter;
        for the MNIST-1D transformer (2 blocks) unrolling made a CPU training
        step about a fifth faster, at the cost of compiling each copy.
      remat: recompute each copy's activations in the backward pass instead of
        keeping them (``jax.checkpoint`` around one copy), so a deep stack's
        training step holds one copy's activations at a time rather than ``n``:
        memory for arithmetic (a second forward pass). True keeps only each
        copy's input; a name (``"dots_saveable"``: keep the matrix products'
        results, recompute the elementwise rest; also ``"nothing_saveable"``,
        ``"everything_saveable"``, ``"dots_with_no_batch_dims_saveable"``) or
        any ``jax.checkpoint_policies`` policy chooses what else is kept. The
        results equal those without remat to float rounding.
    """
    errors.positive_int(n, kind, "n")
    rematerialize, policy = _remat_policy(kind, remat)
    if unroll is None:
        unroll = n <= _UNROLL_UP_TO
    if not isinstance(unroll, bool) and not (isinstance(unroll, int) and unroll >= 1):
        errors.fail(kind, f"unroll must be True, False or a positive int, got {unroll!r}")

    def init(key, x):
        keys = jax.random.split(key, n)
        with errors.scope("block"):
            params, state = jax.vmap(lambda k: block.init_with_state(k, x))(keys)
            first = jax.tree.map(lambda a: a[0], (params, state))
            _same_shape(kind, x, output_struct(block, *first, x), "a repeated block")
        return (params, state) if block.stateful else params

    def apply_with_state(params, state, x, *, key=None, train=False, **inputs):
        inputs = accepted_inputs(block, inputs)
        keys = None if key is None else jax.random.split(key, n)
        cache = inputs.pop("cache", None)  # one per copy, stacked: scanned, not broadcast

        def body(h, per_copy):
            p, s, k, c = per_copy
            more = {} if c is None else {"cache": c}
            with errors.scope("block"):
                y, s = apply_recorded(block, p, s, h, key=k, train=train, **inputs, **more)
                y, c = (y, None) if c is None else y
                _same_shape(kind, h, y, "a repeated block")
            return y.astype(h.dtype), (s, c)

        if rematerialize:
            # prevent_cse=False: inside a scan, common-subexpression elimination
            # cannot undo the recomputation, and the barrier would only slow it.
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        y, (state, cache) = jax.lax.scan(
            body, x, (params, state, keys, cache), length=n, unroll=unroll
        )
        return (y, state) if cache is None else ((y, cache), state)

    if block.stateful:
        return Layer(init, same_signature(apply_with_state, block.apply), kind, True)

    def apply(params, x, *, key=None, train=False, **inputs):
        return apply_with_state(params, {}, x, key=key, train=train, **inputs)[0]

    return Layer(init, same_signature(apply, block.apply), kind)
