"""Embedding and attend: parity with flax.linen.Embed after copying the table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import fnnet


@pytest.fixture
def layer_and_params():
    layer = fnnet.embedding(11, 4)
    return layer, layer.init(jax.random.key(0), jnp.zeros((3,), jnp.int32))


def test_matches_flax_embed_lookup_and_attend(layer_and_params, rng):
    layer, params = layer_and_params
    assert jax.tree.map(jnp.shape, params) == {"table": (11, 4)}
    ref = nn.Embed(11, 4)
    variables = {"params": {"embedding": params["table"]}}
    ids = jnp.asarray(rng.integers(0, 11, (2, 5)).astype(np.int32))
    np.testing.assert_allclose(layer.apply(params, ids), ref.apply(variables, ids), rtol=1e-6)

    h = jnp.asarray(rng.standard_normal((5, 4)).astype(np.float32))
    logits = fnnet.attend(params, h)
    assert logits.shape == (5, 11)
    expected = ref.apply(variables, h, method=nn.Embed.attend)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_lookup_is_row_selection(layer_and_params):
    layer, params = layer_and_params
    ids = jnp.array([[3, 0], [10, 3]], jnp.int32)
    y = layer.apply(params, ids)
    assert y.shape == (2, 2, 4)
    np.testing.assert_array_equal(y[1, 1], params["table"][3])
    # Scalar ids give a single vector.
    np.testing.assert_array_equal(layer.apply(params, jnp.array(7, jnp.int32)), params["table"][7])


def test_default_init_is_unit_normal():
    layer = fnnet.embedding(1000, 64)
    table = jax.jit(layer.init)(jax.random.key(0), jnp.zeros((1,), jnp.int32))["table"]
    assert table.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.std(table)), 1.0, rtol=0.02)


def test_out_of_range_ids_give_nan(layer_and_params):
    layer, params = layer_and_params
    y = layer.apply(params, jnp.array([0, 11, -1, 10], jnp.int32))
    assert np.isnan(np.asarray(y[1])).all() and np.isnan(np.asarray(y[2])).all()
    assert np.isfinite(np.asarray(y)[[0, 3]]).all()


def test_gradient_counts_repeated_ids(layer_and_params):
    layer, params = layer_and_params
    ids = jnp.array([2, 5, 2], jnp.int32)
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, ids)))(params)["table"]
    np.testing.assert_array_equal(grads[:, 0], np.bincount([2, 5, 2], minlength=11))


def test_attend_gradient_is_correct(layer_and_params):
    _, params = layer_and_params
    h = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    jax.test_util.check_grads(fnnet.attend, (params, h), order=2, modes=["rev"])


def test_errors(layer_and_params):
    layer, params = layer_and_params
    with pytest.raises(fnnet.LayerError, match="expected integer ids, got dtype float32"):
        layer.init(jax.random.key(0), jax.ShapeDtypeStruct((3,), jnp.float32))
    with pytest.raises(fnnet.LayerError, match="expected integer ids"):
        layer.apply(params, jnp.zeros((3,)))
    with pytest.raises(fnnet.LayerError, match="vocab must be a positive integer"):
        fnnet.embedding(0, 4)
    with pytest.raises(fnnet.LayerError, match="features must be a positive integer"):
        fnnet.embedding(5, 2.0)
    with pytest.raises(fnnet.LayerError, match="attend: expected input with last dimension 4"):
        fnnet.attend(params, jnp.ones((2, 3)))
    with pytest.raises(fnnet.LayerError, match="expected a floating input"):
        fnnet.attend(params, jnp.ones((2, 4), jnp.int32))
