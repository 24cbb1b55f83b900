"""Every registered layer and model, held to the same standard.

For each case in ``registry.CASES``: ``init`` works from shapes alone, the shape
predicted by ``jax.eval_shape`` equals the real output, ``jax.jit`` equals eager,
``jax.vmap`` equals a loop over examples, gradients with respect to params and
inputs are finite, and a second jitted call with new data does not recompile.
A case that carries a ``reference`` computation must also equal it.
"""

from __future__ import annotations

import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet

from registry import CASES, Case

BATCH = 3


def _key(seed: int) -> jax.Array:
    """Keys for apply: threefry, whose bits under vmap equal a loop's (rbg's do not)."""
    return jax.random.key(seed, impl="threefry2x32")


def _setup(case: Case):
    """Builds the layer and initializes it from the example's shape alone: init
    receives a ``jax.ShapeDtypeStruct``, so touching the data would fail here."""
    layer = case.make()
    assert isinstance(layer, fnnet.Layer), f"{case.name}: make() must return a fnnet.Layer"
    x = jax.tree.map(jnp.asarray, case.example(np.random.default_rng(0)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    params, state = jax.jit(lambda k: layer.init_with_state(k, abstract))(jax.random.key(0))
    return layer, x, params, state


def _run_one(layer, case, params, state, x, key):
    """Applies the case's layer to one example; returns only the output."""
    k = key if case.needs_key else None
    if layer.stateful:
        y, _ = layer.apply(params, state, x, key=k, train=case.train, **case.apply_kwargs)
        return y
    return layer.apply(params, x, key=k, train=case.train, **case.apply_kwargs)


def _run(layer, case, params, state, x, key):
    """Like ``_run_one``; a layer that needs a named batch axis (BatchNorm in
    training) runs on a batch of one under ``jax.vmap`` with that name."""
    if case.vmap_axis_name is None:
        return _run_one(layer, case, params, state, x, key)
    batch = jax.tree.map(lambda a: a[None], x)
    y = jax.vmap(
        lambda x: _run_one(layer, case, params, state, x, key), axis_name=case.vmap_axis_name
    )(batch)
    return jax.tree.map(lambda a: a[0], y)


def _close(a, b, tol):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol),
        a,
        b,
    )


ids = [c.name for c in CASES]


def _check_shape_jit_and_compile_once(case, layer, x, params, state, f):
    """eval_shape predicts the output; jit equals eager; new data reuses the program."""
    key = _key(1)
    eager = _run(layer, case, params, state, x, key)
    _close(f(params, state, x, key), eager, case.tol)
    predicted = jax.eval_shape(f, params, state, x, key)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), predicted) == jax.tree.map(
        lambda a: (a.shape, a.dtype), eager
    ), "eval_shape disagrees with the real output"
    x2 = jax.tree.map(jnp.asarray, case.example(np.random.default_rng(7)))
    f(params, state, x2, _key(2))
    assert f._cache_size() == 1, "a second call with new data recompiled"


def _check_vmap_equals_loop(case, layer, params, state, f):
    rng = np.random.default_rng(1)
    xs = [jax.tree.map(jnp.asarray, case.example(rng)) for _ in range(BATCH)]
    batch = jax.tree.map(lambda *a: jnp.stack(a), *xs)
    keys = jax.random.split(_key(2), BATCH)
    if case.vmap_axis_name is not None:
        # Cross-example statistics (BatchNorm): a loop cannot reproduce them, so check
        # that the batched run gives one output per example of the predicted shape.
        y = jax.vmap(
            lambda x, k: _run_one(layer, case, params, state, x, k), axis_name=case.vmap_axis_name
        )(batch, keys)
        one = jax.eval_shape(f, params, state, xs[0], keys[0])
        assert jax.tree.map(jnp.shape, y) == jax.tree.map(lambda a: (BATCH, *a.shape), one)
        return
    batched = jax.jit(jax.vmap(f, in_axes=(None, None, 0, 0)))(params, state, batch, keys)
    looped = [f(params, state, x, k) for x, k in zip(xs, keys)]
    _close(batched, jax.tree.map(lambda *a: jnp.stack(a), *looped), case.tol)


def _is_float(tree) -> bool:
    return all(jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) for a in jax.tree.leaves(tree))


def _check_gradients_are_finite(case, layer, x, params, state):
    """Reverse mode works: gradients with respect to the params (nonzero for a
    differentiable case) and to float inputs are finite. A non-differentiable
    primitive in a parameter-free layer fails here too."""
    key = _key(1)
    axis = case.vmap_axis_name

    def loss(p, x):
        if axis is None:
            y = _run(layer, case, p, state, x, key)
        else:  # two examples, so batch statistics are not degenerate
            xs = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), x)
            y = jax.vmap(lambda x: _run_one(layer, case, p, state, x, key), axis_name=axis)(xs)
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(y))

    wrt = (0, 1) if _is_float(x) else (0,)
    grads = jax.jit(jax.grad(loss, argnums=wrt))(params, x)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))), "non-finite gradient"
    if case.differentiable:
        leaves = jax.tree.leaves(grads[0])
        assert leaves, f"{case.name}: differentiable case without parameters"
        assert any(bool(jnp.any(g != 0)) for g in leaves), "all parameter gradients are zero"
    else:
        assert len(wrt) == 2 or not jax.tree.leaves(params), (
            f"{case.name}: nothing to differentiate; mark it differentiable"
        )


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_conformance(case):
    """One case through every check; setup and the jitted single-example function
    are shared between the checks, so each case compiles as little as possible."""
    layer, x, params, state = _setup(case)
    f = jax.jit(lambda p, s, x, k: _run(layer, case, p, s, x, k))
    _check_shape_jit_and_compile_once(case, layer, x, params, state, f)
    _check_vmap_equals_loop(case, layer, params, state, f)
    _check_gradients_are_finite(case, layer, x, params, state)
    if case.reference is not None:
        y = _run(layer, case, params, state, x, _key(1))
        with jax.numpy_rank_promotion("allow"):  # references broadcast as people write them
            expected = case.reference(params, x)
        _close(y, expected, case.tol)


# Public names that do not build a Layer. A new public name is either covered by a
# registry case or listed here, so nothing escapes the conformance checks unnoticed.
NOT_LAYERS = {
    "Call", "Cell", "Layer", "LayerError", "Summary", "summary", "models", "errors",
    "attend", "apply_rotary", "get_activation", "init_attention_cache",
    "simple_cell", "lstm_cell", "gru_cell",  # cells: covered through the rnn cases
    "models.generate", "models.init_cache", "models.config_of",
}  # fmt: skip


def _public_names() -> set[str]:
    models = importlib.import_module("fnnet.models")
    return set(fnnet.__all__) | {f"models.{n}" for n in models.__all__}


def test_registry_covers_public_layers():
    covered = {name for c in CASES for name in c.covers}
    missing = sorted(_public_names() - NOT_LAYERS - covered)
    assert not missing, f"public layers missing from tests/cases_*.py: {missing}"


def test_layer_factories_are_annotated_and_non_layers_are_not():
    """Keeps NOT_LAYERS honest: every public function annotated to return a Layer
    must be covered, and nothing listed as a non-layer may claim to build one."""
    models = importlib.import_module("fnnet.models")
    for name in _public_names():
        module, attr = (models, name[7:]) if name.startswith("models.") else (fnnet, name)
        obj = getattr(module, attr)
        if inspect.isfunction(obj):
            returns_layer = inspect.signature(obj).return_annotation in ("Layer", fnnet.Layer)
            assert returns_layer != (name in NOT_LAYERS), name
