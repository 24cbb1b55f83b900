"""Every example in README.md and docs/ runs, and prints what the page says."""

import doctest
import pathlib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_examples_in_page_run(page):
    # Examples are what a user types, so they run under JAX's default settings,
    # not the suite's strict promotion (optax itself mixes Python floats and ints),
    # and with JAX's default random bits (threefry), not the suite's faster rbg.
    impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "threefry2x32")
    try:
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            result = _run(page)
    finally:
        jax.config.update("jax_default_prng_impl", impl)
    assert result.failed == 0, f"{result.failed} example(s) in {page.name} failed (see output)"


def _run(page):
    return doctest.testfile(
        str(page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        verbose=False,
    )


def test_every_page_has_runnable_examples():
    """A page of prose claims with no examples would go untested: say why it has none."""
    without = [p.name for p in PAGES if ">>>" not in p.read_text()]
    assert set(without) <= {"shapes.md", "benchmarks.md"}, without
