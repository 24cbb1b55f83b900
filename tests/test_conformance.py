"""Every registered layer and model, held to the same standard.

For each case in ``registry.CASES``: the shape predicted by ``jax.eval_shape``
equals the real output, ``jax.jit`` equals eager, ``jax.vmap`` equals a Python
loop over examples, gradients are finite, and a second jitted call with new
data does not recompile.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from registry import CASES, Case

BATCH = 3


def _setup(case: Case):
    layer = case.make()
    assert isinstance(layer, fnnet.Layer), f"{case.name}: make() must return a fnnet.Layer"
    rng = np.random.default_rng(0)
    x = jax.tree.map(jnp.asarray, case.example(rng))
    params, state = layer.init_with_state(jax.random.key(0), x)
    return layer, x, params, state


def _run(layer, case, params, state, x, key):
    """Applies the case's layer; returns only the output."""
    k = key if case.needs_key else None
    if layer.stateful:
        y, _ = layer.apply(params, state, x, key=k, train=case.train, **case.apply_kwargs)
        return y
    return layer.apply(params, x, key=k, train=case.train, **case.apply_kwargs)


def _close(a, b, tol):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol),
        a, b,
    )


ids = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_eval_shape_matches_output(case):
    layer, x, params, state = _setup(case)
    key = jax.random.key(1)
    predicted = jax.eval_shape(lambda p, s, x: _run(layer, case, p, s, x, key), params, state, x)
    actual = _run(layer, case, params, state, x, key)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), predicted) == jax.tree.map(
        lambda a: (a.shape, a.dtype), actual
    )
    # init reads only shapes: initializing from a ShapeDtypeStruct gives the same tree.
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    p2, s2 = layer.init_with_state(jax.random.key(0), abstract)
    _close((p2, s2), (params, state), 0)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_jit_equals_eager(case):
    layer, x, params, state = _setup(case)
    key = jax.random.key(1)
    eager = _run(layer, case, params, state, x, key)
    jitted = jax.jit(lambda p, s, x, k: _run(layer, case, p, s, x, k))(params, state, x, key)
    _close(jitted, eager, case.tol)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_vmap_equals_loop(case):
    layer, x, params, state = _setup(case)
    rng = np.random.default_rng(1)
    xs = [jax.tree.map(jnp.asarray, case.example(rng)) for _ in range(BATCH)]
    batch = jax.tree.map(lambda *a: jnp.stack(a), *xs)
    keys = jax.random.split(jax.random.key(2), BATCH)

    def one(x, k):
        return _run(layer, case, params, state, x, k)

    if case.vmap_axis_name is not None:
        # Cross-example statistics (BatchNorm): the loop cannot reproduce them, so
        # compare with the layer applied to the whole batch by hand instead.
        y = jax.vmap(one, axis_name=case.vmap_axis_name)(batch, keys)
        assert jax.tree.map(jnp.shape, y) == jax.tree.map(
            lambda a: (BATCH, *a.shape), jax.eval_shape(one, xs[0], keys[0])
        )
        return
    batched = jax.vmap(one)(batch, keys)
    looped = jax.tree.map(lambda *a: jnp.stack(a), *[one(x, k) for x, k in zip(xs, keys)])
    _close(batched, looped, case.tol)


@pytest.mark.parametrize("case", [c for c in CASES if c.differentiable], ids=lambda c: c.name)
def test_gradients_are_finite(case):
    layer, x, params, state = _setup(case)
    key = jax.random.key(1)
    axis = case.vmap_axis_name

    def loss(p):
        if axis is None:
            y = _run(layer, case, p, state, x, key)
        else:
            xs = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), x)
            y = jax.vmap(lambda x: _run(layer, case, p, state, x, key), axis_name=axis)(xs)
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(y))

    grads = jax.grad(loss)(params)
    leaves = jax.tree.leaves(grads)
    assert leaves, f"{case.name}: differentiable case without parameters"
    for g in leaves:
        assert bool(jnp.all(jnp.isfinite(g)))
    assert any(bool(jnp.any(g != 0)) for g in leaves), "all gradients are zero"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_second_call_does_not_recompile(case):
    layer, x, params, state = _setup(case)
    f = jax.jit(lambda p, s, x, k: _run(layer, case, p, s, x, k))
    f(params, state, x, jax.random.key(1))
    x2 = jax.tree.map(jnp.asarray, case.example(np.random.default_rng(7)))
    f(params, state, x2, jax.random.key(2))
    assert f._cache_size() == 1


def _layer_factories() -> set[str]:
    """Public names in ``fnnet`` and ``fnnet.models`` that build a Layer."""
    names = set()
    for prefix, module in (("", fnnet), ("models.", fnnet.models)):
        for name in getattr(module, "__all__", dir(module)):
            obj = getattr(module, name)
            if not inspect.isfunction(obj):
                continue
            ret = inspect.signature(obj).return_annotation
            if ret in ("Layer", fnnet.Layer):
                names.add(prefix + name)
    return names


def test_registry_covers_public_layers():
    covered = {name for c in CASES for name in c.covers}
    missing = sorted(_layer_factories() - covered)
    assert not missing, f"public layers missing from tests/cases_*.py: {missing}"


def _is_float(tree) -> bool:
    return all(jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "case",
    # BatchNorm's cross-example statistics are differentiated in test_gradients_are_finite.
    [c for c in CASES if c.vmap_axis_name is None and _is_float(c.example(np.random.default_rng(0)))],
    ids=lambda c: c.name,
)
def test_input_gradients_are_finite(case):
    """Reverse-mode differentiation works through every float-input layer, with or
    without parameters (a non-differentiable primitive fails here)."""
    layer, x, params, state = _setup(case)
    key = jax.random.key(1)

    def loss(x):
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(
            _run(layer, case, params, state, x, key)))

    for g in jax.tree.leaves(jax.grad(loss)(x)):
        assert bool(jnp.all(jnp.isfinite(g)))
