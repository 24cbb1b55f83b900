"""Strict JAX settings for every test: mixing dtypes or ranks implicitly is an error."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# XLA's own bit generator compiles in about half the time of threefry, and the
# suite compiles hundreds of small init programs. Nothing here depends on the
# particular random stream; checks that compare vmapped randomness with a loop
# pass threefry keys explicitly, since rbg's bits under vmap differ from a loop's.
jax.config.update("jax_default_prng_impl", "rbg")
# Eight simulated CPU devices, so the sharding tests can lay out a mesh (the
# setting must precede JAX's first use of its backend). Unsharded code runs on
# the first device as before.
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def rng():
    """A seeded NumPy generator, so every test sees the same data."""
    return np.random.default_rng(0)


@pytest.fixture
def key():
    return jax.random.key(0)
