"""Normalization layers: parity with Flax linen (weights copied across), and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _random_affine(params, rng):
    """Non-trivial scale and bias, so parity checks them too."""
    return {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}


def test_layer_norm_matches_flax(key, rng):
    x = jnp.asarray(3 + 2 * rng.standard_normal((3, 4)), jnp.float32)  # (seq, features)
    layer = fnnet.layer_norm()
    params = layer.init(key, x)
    assert jax.tree.map(jnp.shape, params) == {"scale": (4,), "bias": (4,)}
    params = _random_affine(params, rng)
    ref = nn.LayerNorm().apply({"params": params}, x)
    np.testing.assert_allclose(layer.apply(params, x), ref, **TOL)

    plain = fnnet.layer_norm(use_scale=False, use_bias=False, epsilon=1e-3)
    assert plain.init(key, x) == {}
    ref = nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-3).apply({}, x)
    np.testing.assert_allclose(plain.apply({}, x), ref, **TOL)


def test_rms_norm_matches_flax(key, rng):
    x = jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)
    layer = fnnet.rms_norm()
    params = _random_affine(layer.init(key, x), rng)
    assert set(params) == {"scale"}
    ref = nn.RMSNorm().apply({"params": params}, x)
    np.testing.assert_allclose(layer.apply(params, x), ref, **TOL)


@pytest.mark.parametrize("shape", [(3, 6), (2, 2, 6)], ids=["length", "image"])
def test_group_norm_matches_flax(key, rng, shape):
    xs = jnp.asarray(1 + rng.standard_normal((2, *shape)), jnp.float32)  # (batch, ..., channels)
    layer = fnnet.group_norm(3)
    params = _random_affine(layer.init(key, xs[0]), rng)
    assert set(params) == {"scale", "bias"}
    ref = nn.GroupNorm(num_groups=3).apply({"params": params}, xs)
    ys = jax.vmap(layer.apply, in_axes=(None, 0))(params, xs)
    np.testing.assert_allclose(ys, ref, **TOL)


def test_batch_norm_matches_flax_in_training_and_evaluation(key, rng):
    xs = jnp.asarray(2 + 3 * rng.standard_normal((4, 3, 2)), jnp.float32)  # (batch, length, f)
    layer = fnnet.batch_norm(momentum=0.8, epsilon=1e-3)
    params, state = layer.init(key, xs[0])
    assert jax.tree.map(jnp.shape, (params, state)) == (
        {"scale": (2,), "bias": (2,)},
        {"mean": (2,), "var": (2,)},
    )
    params = _random_affine(params, rng)
    state = {"mean": jnp.array([0.5, -1.0]), "var": jnp.array([2.0, 0.5])}
    ref = nn.BatchNorm(momentum=0.8, epsilon=1e-3)
    variables = {"params": params, "batch_stats": state}

    # Training: batch statistics over the examples and their positions; the new
    # running statistics leave the vmap once, unbatched.
    step = jax.vmap(
        lambda x: layer.apply(params, state, x, train=True), axis_name="batch", out_axes=(0, None)
    )
    ys, new_state = jax.jit(step)(xs)
    ref_ys, updates = ref.apply(variables, xs, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(ys, ref_ys, **TOL)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **TOL), new_state, updates["batch_stats"]
    )

    # Evaluation: the running statistics, per example, state unchanged.
    ys, _ = jax.vmap(lambda x: layer.apply(params, new_state, x), out_axes=(0, None))(xs)
    ref_ys = ref.apply(
        {"params": params, "batch_stats": updates["batch_stats"]}, xs, use_running_average=True
    )
    np.testing.assert_allclose(ys, ref_ys, **TOL)
    assert layer.apply(params, new_state, xs[0])[1] is new_state


def test_batch_norm_gradients_flow_through_batch_statistics(key, rng):
    """The loss of one example depends on the others through the batch mean."""
    layer = fnnet.batch_norm()
    params, state = layer.init(key, jnp.zeros(2))
    xs = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)

    def first_output(xs):
        ys, _ = jax.vmap(
            lambda x: layer.apply(params, state, x, train=True),
            axis_name="batch",
            out_axes=(0, None),
        )(xs)
        return ys[0, 0]

    g = jax.jit(jax.grad(first_output))(xs)
    assert bool(jnp.all(g[1:, 0] != 0)) and bool(jnp.all(g[:, 1] == 0))


def test_normalization_errors(key):
    with pytest.raises(fnnet.LayerError, match=r"^layer_norm: epsilon must be a positive number"):
        fnnet.layer_norm(epsilon=0.0)
    with pytest.raises(fnnet.LayerError, match=r"^group_norm: num_groups must be a positive"):
        fnnet.group_norm(0)
    with pytest.raises(fnnet.LayerError, match=r"^batch_norm: momentum must be a number in"):
        fnnet.batch_norm(momentum=1.5)
    with pytest.raises(
        fnnet.LayerError,
        match=r"^group_norm: channels \(6, the last dimension of input shape \(3, 6\)\) "
        r"must be divisible by num_groups \(4\)",
    ):
        fnnet.group_norm(4).init(key, jax.ShapeDtypeStruct((3, 6), jnp.float32))
    with pytest.raises(fnnet.LayerError, match=r"rms_norm: expected an input with a feature axis"):
        fnnet.rms_norm().init(key, jnp.zeros(()))
    params = fnnet.layer_norm().init(key, jnp.zeros(4))
    with pytest.raises(
        fnnet.LayerError,
        match=r"^layer_norm at 'norm': expected input with last dimension 4 \(the size of "
        r"'scale'\), got 5 \(input shape \(2, 5\)\)",
    ):
        fnnet.serial(norm=fnnet.layer_norm()).apply({"norm": params}, jnp.zeros((2, 5)))

    layer = fnnet.batch_norm()
    params, state = layer.init(key, jnp.zeros(3))
    message = (
        r"^batch_norm: needs batch statistics in training mode: "
        r"apply it under jax.vmap\(\.\.\., axis_name='batch'\)"
    )
    with pytest.raises(fnnet.LayerError, match=message):
        layer.apply(params, state, jnp.zeros(3), train=True)
    with pytest.raises(fnnet.LayerError, match=message):  # a vmap, but with another axis name
        jax.vmap(lambda x: layer.apply(params, state, x, train=True), axis_name="b")(
            jnp.zeros((2, 3))
        )


@pytest.mark.parametrize(
    "make",
    [fnnet.layer_norm, fnnet.rms_norm, lambda: fnnet.group_norm(2)],
    ids=["layer_norm", "rms_norm", "group_norm"],
)
def test_norms_return_the_input_dtype_with_float32_statistics(make):
    """Mixed precision: a bfloat16 activation stays bfloat16 after a norm, while the
    statistics are computed in float32 (the result equals the float32 one, rounded)."""
    layer = make()
    x = jax.random.normal(jax.random.key(0), (5, 4)) * 30 + 100
    params = layer.init(jax.random.key(1), x)
    y16 = layer.apply(params, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    y32 = layer.apply(params, x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=2e-2, rtol=2e-2)


def test_batch_norm_returns_the_input_dtype():
    layer = fnnet.batch_norm()
    x = jnp.ones((3, 4), jnp.bfloat16)
    params, state = layer.init(jax.random.key(0), x[0])
    y, new_state = layer.apply(params, state, x[0])
    assert y.dtype == jnp.bfloat16 and new_state["mean"].dtype == jnp.float32
