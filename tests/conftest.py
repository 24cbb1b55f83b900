"""Strict JAX settings for every test: mixing dtypes or ranks implicitly is an error."""

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

# One persistent compilation cache for the session: the xdist workers and the
# subprocesses the tests start (a killed run and its resume, the multi-host pairs,
# the runner) compile many of the same programs. The controller makes the folder
# before the workers start, and they and every subprocess inherit it through the
# environment; it is removed at the end. Only programs that took 0.3 s or more to
# compile are stored (JAX's own threshold).
if "FNNET_TEST_CACHE" not in os.environ:
    os.environ["FNNET_TEST_CACHE"] = tempfile.mkdtemp(prefix="fnnet-test-cache-")
    os.environ["FNNET_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["FNNET_TEST_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"
jax.config.update("jax_compilation_cache_dir", os.environ["FNNET_TEST_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


def pytest_sessionfinish(session):
    if os.environ.get("FNNET_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["FNNET_TEST_CACHE"], ignore_errors=True)


# The suite means the same on a GPU or TPU host: every test, and every process a
# test starts, computes on the CPU (an accelerator's TF32 or bfloat16 matmuls would
# break the 2e-5 tolerances). Accelerator checks live in the benchmarks.
os.environ["JAX_PLATFORMS"] = "cpu"
jax.config.update("jax_platforms", "cpu")
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


@pytest.fixture
def threefry():
    """JAX's threefry PRNG for the test: replica r equals a separate run bit for bit
    only under it (see init_replicas)."""
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    yield
    jax.config.update("jax_default_prng_impl", previous)
