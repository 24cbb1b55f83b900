"""Numerical checks and errors for dense and neuron."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet


def test_dense_matches_flax_on_a_sequence(key, rng):
    x = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)  # (seq, features)
    layer = fnnet.dense(4)
    params = layer.init(key, x)
    assert jax.tree.map(jnp.shape, params) == {"w": (3, 4), "b": (4,)}
    params = {"w": params["w"], "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    ref = nn.Dense(4).apply({"params": {"kernel": params["w"], "bias": params["b"]}}, x)
    np.testing.assert_allclose(layer.apply(params, x), ref, rtol=1e-5, atol=1e-5)


def test_dense_hand_computed_and_options():
    x = jnp.array([1.0, 2.0])
    w_init = lambda key, shape, dtype: jnp.arange(6, dtype=dtype).reshape(shape)  # noqa: E731
    layer = fnnet.dense(3, w_init=w_init, b_init=jax.nn.initializers.ones)
    params = layer.init(jax.random.key(0), x)
    # [1, 2] @ [[0, 1, 2], [3, 4, 5]] + 1
    np.testing.assert_allclose(layer.apply(params, x), [7.0, 10.0, 13.0])

    no_bias = fnnet.dense(3, use_bias=False, w_init=w_init)
    params = no_bias.init(jax.random.key(0), x)
    assert set(params) == {"w"}
    np.testing.assert_allclose(no_bias.apply(params, x), [6.0, 9.0, 12.0])


def test_dense_default_init_and_dtypes(key):
    params = fnnet.dense(200).init(key, jax.ShapeDtypeStruct((50,), jnp.float32))
    # LeCun normal: variance 1 / in_features; zero bias.
    assert abs(float(jnp.std(params["w"])) - 50**-0.5) < 0.01
    assert not jnp.any(params["b"])

    half = fnnet.dense(2, param_dtype=jnp.bfloat16)
    params = half.init(key, jnp.zeros(3, jnp.bfloat16))
    assert params["w"].dtype == jnp.bfloat16
    assert half.apply(params, jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
    # bfloat16 input meets float32 weights under strict promotion: computed in float32.
    params = fnnet.dense(2).init(key, jnp.zeros(3))
    assert fnnet.dense(2).apply(params, jnp.ones(3, jnp.bfloat16)).dtype == jnp.float32


def test_neuron_is_a_weighted_sum_through_an_activation():
    layer = fnnet.neuron()
    params = layer.init(jax.random.key(0), jnp.zeros(3))
    assert jax.tree.map(jnp.shape, params) == {"w": (3,), "b": ()}
    params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.25)}
    x = jnp.array([1.0, 2.0, 3.0])
    y = layer.apply(params, x)
    assert y.shape == ()
    z = 0.5 * 1.0 - 1.0 * 2.0 + 2.0 * 3.0 + 0.25
    np.testing.assert_allclose(y, 1.0 / (1.0 + np.exp(-z)), rtol=1e-6)
    np.testing.assert_allclose(fnnet.neuron("identity").apply(params, x), z, rtol=1e-6)
    np.testing.assert_allclose(fnnet.neuron(jax.nn.relu).apply(params, -x), 0.0)


def test_dense_errors(key):
    for bad in (-3, 0, 2.5, True):
        with pytest.raises(fnnet.LayerError, match=r"^dense: features must be a positive integer"):
            fnnet.dense(bad)
    with pytest.raises(fnnet.LayerError, match=r"scalar"):
        fnnet.dense(2).init(key, jnp.zeros(()))
    params = fnnet.dense(2).init(key, jnp.zeros(3))
    with pytest.raises(fnnet.LayerError, match=r"expected input with last dimension 3, got 5"):
        fnnet.dense(2).apply(params, jnp.zeros(5))
    with pytest.raises(fnnet.LayerError, match=r"shape \(3, 2\), but this layer has 4 features"):
        fnnet.dense(4).apply(params, jnp.zeros(3))


def test_errors_deep_in_a_serial_name_the_path(key):
    model = fnnet.serial(hidden=fnnet.dense(4), out=fnnet.dense(2))
    params = model.init(key, jnp.zeros(3))
    with pytest.raises(
        fnnet.LayerError, match=r"^dense at 'hidden': expected input with last dimension 3, got 5"
    ):
        model.apply(params, jnp.zeros(5))
    # The output layer's params come from a model whose hidden layer had 6 units.
    other = fnnet.serial(hidden=fnnet.dense(6), out=fnnet.dense(2)).init(key, jnp.zeros(3))
    mixed = {"hidden": params["hidden"], "out": other["out"]}
    with pytest.raises(
        fnnet.LayerError, match=r"^dense at 'out': expected input with last dimension 6, got 4"
    ):
        jax.jit(model.apply)(mixed, jnp.zeros(3))
    with pytest.raises(fnnet.LayerError, match=r"dense at 'hidden': params 'w' has shape \(3, 6\)"):
        model.apply(other, jnp.zeros(3))


def test_neuron_errors(key):
    with pytest.raises(fnnet.LayerError, match=r"unknown activation 'relux'"):
        fnnet.neuron("relux")
    with pytest.raises(fnnet.LayerError, match=r"neuron: expected input of shape \(features,\)"):
        fnnet.neuron().init(key, jnp.zeros((2, 3)))
    params = fnnet.neuron().init(key, jnp.zeros(3))
    with pytest.raises(fnnet.LayerError, match=r"expected 3 input features, got 4"):
        fnnet.neuron().apply(params, jnp.zeros(4))
