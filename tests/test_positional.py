"""Positional encodings: hand-computed sinusoids, a NumPy RoPE and its properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet


def numpy_rope(x, positions, base=10000.0):
    """The Hugging Face LLaMA formula: ``x * cos + rotate_half(x) * sin``."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (np.arange(0, x.shape[-1], 2) / x.shape[-1])
    freqs = np.outer(positions, inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (seq, head_dim)
    if x.ndim == 3:
        emb = emb[:, None, :]
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


# --- sinusoidal ----------------------------------------------------------------


def test_sinusoidal_entries_by_hand():
    layer = fnnet.sinusoidal_position()
    x = jnp.zeros((3, 4))
    assert layer.init(jax.random.key(0), x) == {}
    pe = np.asarray(layer.apply({}, x))
    # features 4: frequencies 1 and 1 / 10000 ** (2 / 4) = 1 / 100; sin and cos interleaved.
    np.testing.assert_allclose(pe[0], [0.0, 1.0, 0.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(
        pe[1], [math.sin(1), math.cos(1), math.sin(0.01), math.cos(0.01)], rtol=1e-6
    )
    np.testing.assert_allclose(
        pe[2], [math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)], rtol=1e-6
    )


def test_sinusoidal_matches_the_paper_formula_and_adds(rng):
    seq, d = 6, 8
    x = rng.standard_normal((seq, d)).astype(np.float32)
    pos = np.arange(seq)[:, None]
    i = np.arange(d // 2)[None, :]
    pe = np.zeros((seq, d))
    pe[:, 0::2] = np.sin(pos / 10000 ** (2 * i / d))
    pe[:, 1::2] = np.cos(pos / 10000 ** (2 * i / d))
    layer = fnnet.sinusoidal_position(max_len=6)
    np.testing.assert_allclose(layer.apply({}, jnp.asarray(x)), x + pe, rtol=1e-5, atol=1e-6)
    # positions= picks absolute rows of the same table.
    tail = layer.apply({}, jnp.zeros((2, d)), positions=jnp.array([4, 5], jnp.int32))
    np.testing.assert_allclose(tail, pe[4:], rtol=1e-5, atol=1e-6)


def test_sinusoidal_errors():
    with pytest.raises(fnnet.LayerError, match="even number of features, got 5"):
        fnnet.sinusoidal_position().init(jax.random.key(0), jnp.zeros((3, 5)))
    with pytest.raises(fnnet.LayerError, match="sequence length 4 exceeds max_len 3"):
        fnnet.sinusoidal_position(max_len=3).apply({}, jnp.zeros((4, 2)))
    with pytest.raises(fnnet.LayerError, match=r"expected one example of shape \(seq, features\)"):
        fnnet.sinusoidal_position().apply({}, jnp.zeros((2, 4, 2)))
    with pytest.raises(fnnet.LayerError, match="max_len must be a positive integer"):
        fnnet.sinusoidal_position(max_len=0)
    with pytest.raises(fnnet.LayerError, match="base must be a number greater than 1"):
        fnnet.sinusoidal_position(base=-1.0)
    with pytest.raises(fnnet.LayerError, match=r"integer positions of shape \(2,\)"):
        fnnet.sinusoidal_position().apply({}, jnp.zeros((2, 4)), positions=jnp.arange(3))


# --- learned -------------------------------------------------------------------


def test_learned_adds_the_first_rows(rng):
    layer = fnnet.learned_position(6)
    x = jnp.asarray(rng.standard_normal((4, 3)).astype(np.float32))
    params = layer.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"table": (6, 3)}
    np.testing.assert_allclose(float(jnp.std(params["table"])), 0.02, rtol=0.5)
    np.testing.assert_allclose(layer.apply(params, x), x + params["table"][:4], rtol=1e-6)
    at = layer.apply(params, x[:2], positions=jnp.array([5, 1], jnp.int32))
    np.testing.assert_allclose(at, x[:2] + np.asarray(params["table"])[[5, 1]], rtol=1e-6)
    # A position past the table is NaN rather than a silently clamped row.
    bad = layer.apply(params, x[:2], positions=jnp.array([6, -1], jnp.int32))
    assert np.isnan(np.asarray(bad)).all()


def test_learned_errors():
    layer = fnnet.learned_position(4)
    params = layer.init(jax.random.key(0), jnp.zeros((4, 3)))
    with pytest.raises(fnnet.LayerError, match="sequence length 5 exceeds max_len 4"):
        layer.init(jax.random.key(0), jnp.zeros((5, 3)))
    with pytest.raises(fnnet.LayerError, match="sequence length 5 exceeds max_len 4"):
        layer.apply(params, jnp.zeros((5, 3)))
    with pytest.raises(fnnet.LayerError, match="expected input with last dimension 3, got 2"):
        layer.apply(params, jnp.zeros((2, 2)))
    with pytest.raises(fnnet.LayerError, match="max_len must be a positive integer"):
        fnnet.learned_position(None)


# --- rotary --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3, 8), (5, 6)])
def test_rotary_matches_numpy(shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    layer = fnnet.rotary()
    assert layer.init(jax.random.key(0), x) == {}
    np.testing.assert_allclose(
        layer.apply({}, jnp.asarray(x)), numpy_rope(x, np.arange(5)), rtol=1e-5, atol=1e-5
    )
    pos = np.array([100, 3, 0, 7, 4000])
    y = fnnet.apply_rotary(jnp.asarray(x), jnp.asarray(pos, jnp.int32), base=500.0)
    np.testing.assert_allclose(y, numpy_rope(x, pos, base=500.0), rtol=1e-4, atol=1e-4)


def test_rotary_scores_depend_only_on_relative_position(rng):
    q = jnp.asarray(rng.standard_normal((1, 16)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((1, 16)).astype(np.float32))

    @jax.jit
    def rotated_dot(m, n):
        qm = fnnet.apply_rotary(q, m)
        kn = fnnet.apply_rotary(k, n)
        return jnp.sum(qm * kn)

    def score(m, n):
        return float(rotated_dot(jnp.array([m], jnp.int32), jnp.array([n], jnp.int32)))

    for offset in (0, 3, -5):
        scores = [score(m, m - offset) for m in (5, 12, 40)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert abs(score(5, 5) - score(5, 2)) > 1e-3  # and it does depend on the offset


def test_rotary_preserves_norms_and_dtype(rng):
    x = jnp.asarray(rng.standard_normal((6, 2, 8)).astype(np.float32))
    y = fnnet.rotary().apply({}, x, positions=jnp.arange(10, 16, dtype=jnp.int32))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    assert fnnet.rotary().apply({}, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_rotary_errors():
    with pytest.raises(fnnet.LayerError, match="even head_dim, got 5"):
        fnnet.apply_rotary(jnp.zeros((3, 5)), None)
    with pytest.raises(fnnet.LayerError, match=r"\(seq, heads, head_dim\) or \(seq, head_dim\)"):
        fnnet.rotary().init(jax.random.key(0), jnp.zeros((2, 3, 4, 4)))
    with pytest.raises(fnnet.LayerError, match=r"integer positions of shape \(3,\)"):
        fnnet.rotary().apply({}, jnp.zeros((3, 4)), positions=jnp.zeros((3,)))
    with pytest.raises(fnnet.LayerError, match="expected a floating input"):
        fnnet.apply_rotary(jnp.zeros((3, 4), jnp.int32), None)
