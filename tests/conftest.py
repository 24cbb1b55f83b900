"""Strict JAX settings for every test: mixing dtypes or ranks implicitly is an error."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    """A seeded NumPy generator, so every test sees the same data."""
    return np.random.default_rng(0)


@pytest.fixture
def key():
    return jax.random.key(0)
