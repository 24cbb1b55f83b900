"""Convolutions rewritten into the layout XLA:CPU runs fast, so fused training stays fast.

A workaround for an XLA:CPU limitation, not part of fnnet's interface: the
training steps (``fnnet.train._step``) apply it to a step before a loop runs
it. Upstream this is jax-ml/jax#12868 ("Convolution is significantly slower
inside a loop body (CPU)", https://github.com/jax-ml/jax/issues/12868); when it
is fixed there, this module can go.

Why this exists. XLA:CPU calls its fast (Eigen) convolution only for operands in
NHWC order with an HWIO kernel and an NHWC output. Any other convolution is
emitted as a naive loop nest, unless the pass ``ConvCanonicalization`` first
wraps it in transposes that put it in that form. That pass visits only the
*entry* computation (``xla/service/cpu/conv_canonicalization.cc`` loops over
``module->entry_computation()``), so a convolution inside a while loop, which is
what ``jax.lax.scan`` compiles to, keeps its layout and runs slowly.

A forward convolution from ``fnnet.conv`` is already NHWC/HWIO. Its gradients are
not: JAX's transpose rules give the input gradient a kernel with input and
output features swapped (``b0f_0oi->b0f``) and the kernel gradient the batch as
its feature axis (``f0b_i0o->0bf``). A training step jitted on its own is fine
(the step is the entry computation), but the same step inside a scan ran about
four times slower on the MNIST-1D CNN.

:func:`canonicalize_convolutions` does in JAX what the pass would have done:
it traces a function to a jaxpr and replays it with every convolution that is
not NHWC/HWIO/NHWC replaced by ``transpose -> canonical convolution ->
transpose``, inside ``jit``, ``scan``, ``while`` and ``cond`` bodies too. The
arithmetic is the same convolution, so results agree (bit for bit with what
XLA produces for the same convolution at top level).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.extend import core

_conv_p = lax.conv_general_dilated_p


def _canonical_specs(ndim: int) -> lax.ConvDimensionNumbers:
    """Dimension numbers of an NHWC input, HWIO kernel and NHWC output of rank ``ndim``."""
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )


def _needs_rewrite(params: dict[str, Any]) -> bool:
    """A convolution XLA:CPU would canonicalize in the entry computation, and can run
    with Eigen afterwards (1 to 3 spatial axes, no feature or batch groups)."""
    dn = params["dimension_numbers"]
    ndim = len(dn.lhs_spec)
    return (
        1 <= ndim - 2 <= 3
        and params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and tuple(dn) != tuple(_canonical_specs(ndim))
    )


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """The convolution ``params`` describes, computed in NHWC/HWIO/NHWC form."""
    dn = params["dimension_numbers"]
    lb, lf, *ls = dn.lhs_spec
    ro, ri, *rs = dn.rhs_spec
    ob, of, *os_ = dn.out_spec
    # Spatial axes keep their order, so the window (strides, padding, dilation) holds.
    lhs = lax.transpose(lhs, (lb, *ls, lf))  # (batch, *spatial, in_features)
    rhs = lax.transpose(rhs, (*rs, ri, ro))  # (*kernel, in_features, out_features)
    out_order = (ob, *os_, of)
    new_params = dict(params, dimension_numbers=_canonical_specs(lhs.ndim))
    out = _conv_p.bind(lhs, rhs, **new_params)  # (batch, *spatial, out_features)
    inverse = [0] * len(out_order)
    for position, axis in enumerate(out_order):
        inverse[axis] = position
    return lax.transpose(out, tuple(inverse))


def _eqn_needs_rewrite(eqn: core.JaxprEqn) -> bool:
    """Whether ``eqn`` is, or contains at any depth, a convolution to rewrite."""
    if eqn.primitive is _conv_p:
        return _needs_rewrite(eqn.params)
    return any(_jaxpr_needs_rewrite(sub) for sub in core.jaxprs_in_params(eqn.params))


def _jaxpr_needs_rewrite(jaxpr: core.Jaxpr) -> bool:
    return any(_eqn_needs_rewrite(eqn) for eqn in jaxpr.eqns)


def _bind(eqn: core.JaxprEqn, params: dict[str, Any], invals: list[Any]) -> list[Any]:
    bind_params = eqn.primitive.get_bind_params(params)
    # Older JAX returned (subfuns, params); newer returns params alone.
    subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _struct(aval: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _rewrite_closed(closed: core.ClosedJaxpr) -> core.ClosedJaxpr:
    if not _jaxpr_needs_rewrite(closed.jaxpr):
        return closed

    def replay(*args):
        return _eval(closed.jaxpr, closed.consts, list(args))

    return jax.make_jaxpr(replay)(*map(_struct, closed.in_avals))


def _rewrite_param(value: Any) -> Any:
    """A sub-jaxpr parameter (a scan body, cond branches, ...) with its convolutions rewritten."""
    if isinstance(value, core.ClosedJaxpr):
        return _rewrite_closed(value)
    if isinstance(value, core.Jaxpr) and not value.constvars:
        if not _jaxpr_needs_rewrite(value):
            return value
        new = _rewrite_closed(core.ClosedJaxpr(value, ()))
        # An open jaxpr parameter (remat) must stay closed-over-nothing.
        return new.jaxpr if not new.consts else value
    if isinstance(value, tuple) and value and all(isinstance(v, core.ClosedJaxpr) for v in value):
        return tuple(_rewrite_closed(v) for v in value)
    return value


def _eval(jaxpr: core.Jaxpr, consts: Any, args: list[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` in the current trace, rewriting convolutions on the way."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    def write(v, value):
        if not isinstance(v, core.DropVar):
            env[v] = value

    for v, value in zip(jaxpr.constvars, consts):
        write(v, value)
    for v, value in zip(jaxpr.invars, args):
        write(v, value)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if not _eqn_needs_rewrite(eqn):
            outvals = _bind(eqn, eqn.params, invals)
        elif eqn.primitive is _conv_p:
            outvals = [_canonical_conv(*invals, **eqn.params)]
        elif eqn.primitive.name in ("jit", "pjit"):
            # Inline the nested jit: XLA inlines it anyway, and inlining spares
            # rebuilding its many parameters around a new jaxpr.
            inner = eqn.params["jaxpr"]
            outvals = _eval(inner.jaxpr, inner.consts, invals)
        else:
            params = {name: _rewrite_param(value) for name, value in eqn.params.items()}
            outvals = _bind(eqn, params, invals)
        for v, value in zip(eqn.outvars, outvals):
            write(v, value)
    return [read(v) for v in jaxpr.outvars]


def canonicalize_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every convolution in the layout XLA:CPU runs with its fast kernel.

    Use it on a function whose convolutions will sit inside a loop (a training
    step under ``jax.lax.scan``); see the module docstring for why. A function
    without such convolutions is traced once and replayed unchanged. Works under
    ``jit``, ``vmap`` and ``grad`` and inside ``scan``; the result computes the
    same values.

    Args:
      fn: a function of arrays (pytrees allowed) to arrays.

    Returns:
      A function with the same signature and results.
    """

    @functools.wraps(fn)
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat_args = jax.tree.leaves(args)
        if _jaxpr_needs_rewrite(closed.jaxpr):
            out = _eval(closed.jaxpr, closed.consts, flat_args)
        else:
            out = core.jaxpr_as_fun(closed)(*flat_args)  # replayed unchanged
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped
