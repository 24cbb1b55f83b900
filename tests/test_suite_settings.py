"""The settings conftest.py gives every test, and every process a test starts."""

import os
import subprocess
import sys

import jax


def test_the_suite_computes_on_the_cpu_here_and_in_its_subprocesses():
    assert jax.default_backend() == "cpu"
    assert os.environ["JAX_PLATFORMS"] == "cpu"  # inherited by every subprocess
    child = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert child.stdout.strip() == "cpu"


def test_subprocesses_share_the_sessions_compilation_cache():
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == os.environ["FNNET_TEST_CACHE"]
    assert os.path.isdir(os.environ["FNNET_TEST_CACHE"])
