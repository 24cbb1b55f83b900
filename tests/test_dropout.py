"""Dropout: drop fraction, preserved mean, evaluation identity, keys and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet


def test_drops_about_rate_and_keeps_the_mean():
    x = jnp.ones(100_000)
    y = fnnet.dropout(0.3).apply({}, x, key=jax.random.key(0), train=True)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.3) < 0.01
    # Kept elements are scaled by 1 / (1 - rate), so the mean stays 1.
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
    assert abs(float(jnp.mean(y)) - 1.0) < 0.02
    assert y.dtype == x.dtype


def test_evaluation_and_rate_zero_are_the_identity(rng):
    x = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    np.testing.assert_array_equal(fnnet.dropout(0.5).apply({}, x), x)
    np.testing.assert_array_equal(fnnet.dropout(0.5).apply({}, x, key=jax.random.key(0)), x)
    np.testing.assert_array_equal(fnnet.dropout(0.0).apply({}, x, train=True), x)


def test_same_key_same_mask():
    layer = fnnet.dropout(0.5)
    x = jnp.ones(64)
    a = layer.apply({}, x, key=jax.random.key(3), train=True)
    b = layer.apply({}, 2 * x, key=jax.random.key(3), train=True)
    c = layer.apply({}, x, key=jax.random.key(4), train=True)
    np.testing.assert_array_equal(a == 0, b == 0)
    assert bool(jnp.any((a == 0) != (c == 0)))


def test_errors(key):
    for bad in (1.0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(fnnet.LayerError, match=r"^dropout: rate must be a probability"):
            fnnet.dropout(bad)
    with pytest.raises(
        fnnet.LayerError,
        match=r"^dropout at 'drop': needs a PRNG key in training mode: "
        r"call apply\(\.\.\., key=key, train=True\)",
    ):
        fnnet.serial(drop=fnnet.dropout(0.1)).apply({}, jnp.ones(3), train=True)
    with pytest.raises(fnnet.LayerError, match=r"expected a floating-point input, got dtype int32"):
        fnnet.dropout(0.1).apply({}, jnp.ones(3, jnp.int32), key=key, train=True)
