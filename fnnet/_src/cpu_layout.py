"""Rewrites that put operations in the form XLA:CPU runs fast, so training stays fast.

Workarounds for two XLA:CPU limitations, not part of fnnet's interface: the
training steps (``fnnet.train._step``) apply them. Each traces a function to a
jaxpr and replays it with some operations replaced by the same arithmetic in
another form, inside ``jit``, ``scan``, ``while`` and ``cond`` bodies too. When
XLA:CPU is fixed upstream, the rewrite can go.

**Convolutions inside loops** (:func:`canonicalize_convolutions`; upstream
jax-ml/jax#12868, "Convolution is significantly slower inside a loop body
(CPU)", https://github.com/jax-ml/jax/issues/12868). XLA:CPU calls its fast
(Eigen) convolution only for operands in NHWC order with an HWIO kernel and an
NHWC output. Any other convolution is emitted as a naive loop nest, unless the
pass ``ConvCanonicalization`` first wraps it in transposes that put it in that
form. That pass visits only the *entry* computation
(``xla/service/cpu/conv_canonicalization.cc`` loops over
``module->entry_computation()``), so a convolution inside a while loop, which is
what ``jax.lax.scan`` compiles to, keeps its layout and runs slowly. A forward
convolution from ``fnnet.conv`` is already NHWC/HWIO. Its gradients are not:
JAX's transpose rules give the input gradient a kernel with input and output
features swapped (``b0f_0oi->b0f``) and the kernel gradient the batch as its
feature axis (``f0b_i0o->0bf``). A training step jitted on its own is fine (the
step is the entry computation), but the same step inside a scan ran about four
times slower on the MNIST-1D CNN. The rewrite does what the pass would have
done: ``transpose -> canonical convolution -> transpose``, the same convolution,
so results agree (bit for bit with what XLA produces at top level).

**Products over many rows** (:func:`rows_first_dots`). A layer written for one
example applies ``x @ w`` to a ``(seq, features)`` input; the batch ``vmap`` makes
it ``(batch, seq, features) @ w``, a product with two row axes. Its weight
gradient, from JAX's transpose rule, then contracts over *two* axes,
``(batch, seq)``, and XLA:CPU runs that by first copying the output gradient
into a transposed layout and calling a slower kernel: 12.6 ms against 3.0 ms
for the same weight gradient of a ``(1024, 10, 64) @ (64, 256)`` product whose
rows were merged first (2 cores). The rewrite merges the row axes, and the
contracted axes, of such a product (``(batch * seq, features) @ w``, reshapes
that cost nothing) *before* differentiation, so every product the gradient
needs has one contracted axis. The products are the same; the sums may be
taken in another order, so results agree to float rounding.
"""

from __future__ import annotations

import functools
import math
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


def _conv_rule(eqn: core.JaxprEqn) -> Callable[..., jax.Array] | None:
    return _canonical_conv if _needs_rewrite(eqn.params) else None


# --- Products over many rows ----------------------------------------------------------

_dot_p = lax.dot_general_p


def _rows_first_plan(lhs_shape: tuple, rhs_shape: tuple, params: dict) -> int | None:
    """The first contracted axis of ``rhs`` when the product can be taken as one
    ``(rows, k) @ rhs``: no batch axes, the contracted axes ``lhs``'s last ones and
    adjacent in ``rhs`` in the same order, and more than one row or contracted
    axis to merge. None otherwise."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if lb or rb or params.get("out_sharding") is not None:
        return None
    count, rank = len(lc), len(lhs_shape)
    pairs = sorted(zip(lc, rc))  # einsum may list the pairs in any order
    if count == 0 or [a for a, _ in pairs] != list(range(rank - count, rank)):
        return None
    first = pairs[0][1]
    if [b for _, b in pairs] != list(range(first, first + count)):
        return None
    if rank - count < 2 and count < 2:
        return None  # already one row axis and one contracted axis
    return first


def _rows_first_dot(lhs: jax.Array, rhs: jax.Array, *, first: int, **params: Any) -> jax.Array:
    """The product ``params`` describes, over ``lhs`` reshaped to ``(rows, k)``;
    ``first`` is ``rhs``'s first contracted axis (from :func:`_rows_first_plan`)."""
    count = len(params["dimension_numbers"][0][0])  # lhs's last, in rhs's order from first
    rows, inner = lhs.shape[: lhs.ndim - count], lhs.shape[lhs.ndim - count :]
    lhs = lax.reshape(lhs, (math.prod(rows), math.prod(inner)))
    rhs = lax.reshape(rhs, (*rhs.shape[:first], math.prod(inner), *rhs.shape[first + count :]))
    out = lax.dot_general(
        lhs,
        rhs,
        (((1,), (first,)), ((), ())),
        precision=params["precision"],
        preferred_element_type=params["preferred_element_type"],
    )  # (rows, *rhs's other axes)
    return lax.reshape(out, (*rows, *out.shape[1:]))


def _dot_rule(eqn: core.JaxprEqn) -> Callable[..., jax.Array] | None:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    first = _rows_first_plan(lhs, rhs, eqn.params)
    return None if first is None else functools.partial(_rows_first_dot, first=first)


# --- Replaying a jaxpr with some equations rewritten ---------------------------------

# ``{primitive: rule}``: ``rule(eqn)`` gives the function that computes ``eqn`` in the
# fast form, or None to keep it as it is.
Rules = dict[Any, Callable[[core.JaxprEqn], Callable[..., Any] | None]]


def _eqn_needs_rewrite(eqn: core.JaxprEqn, rules: Rules) -> bool:
    """Whether ``eqn`` is, or contains at any depth, an equation to rewrite."""
    if eqn.primitive in rules:
        return rules[eqn.primitive](eqn) is not None
    return any(_jaxpr_needs_rewrite(sub, rules) for sub in core.jaxprs_in_params(eqn.params))


def _jaxpr_needs_rewrite(jaxpr: core.Jaxpr, rules: Rules) -> bool:
    return any(_eqn_needs_rewrite(eqn, rules) for eqn in jaxpr.eqns)


def _bind(eqn: core.JaxprEqn, params: dict[str, Any], invals: list[Any]) -> list[Any]:
    bind_params = eqn.primitive.get_bind_params(params)
    # Older JAX returned (subfuns, params); newer returns params alone.
    subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _struct(aval: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _rewrite_closed(closed: core.ClosedJaxpr, rules: Rules) -> core.ClosedJaxpr:
    if not _jaxpr_needs_rewrite(closed.jaxpr, rules):
        return closed

    def replay(*args):
        return _eval(closed.jaxpr, closed.consts, list(args), rules)

    return jax.make_jaxpr(replay)(*map(_struct, closed.in_avals))


def _rewrite_param(value: Any, rules: Rules) -> Any:
    """A sub-jaxpr parameter (a scan body, cond branches, ...) with its equations rewritten."""
    if isinstance(value, core.ClosedJaxpr):
        return _rewrite_closed(value, rules)
    if isinstance(value, core.Jaxpr) and not value.constvars:
        if not _jaxpr_needs_rewrite(value, rules):
            return value
        new = _rewrite_closed(core.ClosedJaxpr(value, ()), rules)
        # An open jaxpr parameter (remat) must stay closed-over-nothing.
        return new.jaxpr if not new.consts else value
    if isinstance(value, tuple) and value and all(isinstance(v, core.ClosedJaxpr) for v in value):
        return tuple(_rewrite_closed(v, rules) for v in value)
    return value


def _eval(jaxpr: core.Jaxpr, consts: Any, args: list[Any], rules: Rules) -> list[Any]:
    """Evaluates ``jaxpr`` in the current trace, rewriting equations on the way."""
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
        rule = rules.get(eqn.primitive)
        fast = rule(eqn) if rule is not None else None
        if fast is not None:
            outvals = [fast(*invals, **eqn.params)]
        elif not _eqn_needs_rewrite(eqn, rules):
            outvals = _bind(eqn, eqn.params, invals)
        elif eqn.primitive.name in ("jit", "pjit"):
            # Inline the nested jit: XLA inlines it anyway, and inlining spares
            # rebuilding its many parameters around a new jaxpr.
            inner = eqn.params["jaxpr"]
            outvals = _eval(inner.jaxpr, inner.consts, invals, rules)
        else:
            params = {name: _rewrite_param(value, rules) for name, value in eqn.params.items()}
            outvals = _bind(eqn, params, invals)
        for v, value in zip(eqn.outvars, outvals):
            write(v, value)
    return [read(v) for v in jaxpr.outvars]


def _rewriting(fn: Callable[..., Any], rules: Rules) -> Callable[..., Any]:
    """``fn`` traced and replayed with ``rules`` applied (unchanged where none applies)."""

    @functools.wraps(fn)
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat_args = jax.tree.leaves(args)
        if _jaxpr_needs_rewrite(closed.jaxpr, rules):
            out = _eval(closed.jaxpr, closed.consts, flat_args, rules)
        else:
            out = core.jaxpr_as_fun(closed)(*flat_args)  # replayed unchanged
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


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
    return _rewriting(fn, {_conv_p: _conv_rule})


def rows_first_dots(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every product over several row axes taken over one (see the module
    docstring): ``(batch, seq, k) @ (k, n)`` as ``(batch * seq, k) @ (k, n)``.

    Use it on the function a training step differentiates, so that the weight
    gradients JAX derives from the products contract over one axis. Works under
    ``jit``, ``vmap`` and ``grad`` and inside ``scan``; the result computes the
    same values, up to the order of the sums.

    Args:
      fn: a function of arrays (pytrees allowed) to arrays.

    Returns:
      A function with the same signature and results.
    """
    return _rewriting(fn, {_dot_p: _dot_rule})
