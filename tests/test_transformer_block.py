"""The transformer block against its equation written out by hand in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet

SEQ, FEATURES, HEADS = 5, 8, 2


def _params(layer, x, rng):
    """Random params of the block's shapes (nonzero biases and norm shifts)."""
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    return jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes
    )


def _gelu(x):  # jax.nn.gelu's default tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _norm(p, x, kind):
    if kind == "rms_norm":
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * p["scale"]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _attention(p, x, allowed):
    q, k, v = (np.einsum("sf,fhd->shd", x, p[n]["w"]) + p[n]["b"] for n in "qkv")
    scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    h = np.einsum("hst,thd->shd", weights, v)
    return np.einsum("shd,hdo->so", h, p["out"]["w"]) + p["out"]["b"]


def _block(p, x, allowed, norm="layer_norm"):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    x = x + _attention(p["attn"], _norm(p["ln1"], x, norm), allowed)
    up, down = p["mlp"]["up"], p["mlp"]["down"]
    hidden = _gelu(_norm(p["ln2"], x, norm) @ up["w"] + up["b"])
    return x + hidden @ down["w"] + down["b"]


@pytest.mark.parametrize("variant", ["plain", "causal_padding", "rms_norm"])
def test_matches_equation(rng, variant):
    causal = variant == "causal_padding"
    norm = "rms_norm" if variant == "rms_norm" else "layer_norm"
    layer = fnnet.transformer_block(HEADS, causal=causal, norm=norm)
    x = jnp.asarray(rng.standard_normal((SEQ, FEATURES)), jnp.float32)
    params = _params(layer, x, rng)
    assert set(params) == {"ln1", "attn", "ln2", "mlp"} and set(params["mlp"]) == {"up", "down"}
    assert params["mlp"]["up"]["w"].shape == (FEATURES, 4 * FEATURES)

    allowed = np.ones((SEQ, SEQ), bool)
    mask = None
    if causal:
        mask = jnp.array([True, False, True, True, True])
        allowed = np.tril(allowed) & np.asarray(mask)[None]
    y = jax.jit(lambda p, x: layer.apply(p, x, mask=mask))(params, x)
    np.testing.assert_allclose(y, _block(params, x, allowed, norm), rtol=1e-5, atol=1e-5)


def test_causal_block_ignores_the_future(rng):
    layer = fnnet.transformer_block(HEADS, mlp_ratio=2, causal=True, rotary=True)
    x = jnp.asarray(rng.standard_normal((SEQ, FEATURES)), jnp.float32)
    params = _params(layer, x, rng)
    f = jax.jit(layer.apply)
    y, y_changed = f(params, x), f(params, x.at[3].add(1.0))
    np.testing.assert_allclose(y[:3], y_changed[:3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(y[3:], y_changed[3:])

    # Decoding with a cache reproduces the causal forward pass.
    step = jax.jit(lambda p, x, c: layer.apply(p, x, cache=c))
    cache = fnnet.init_attention_cache(SEQ, HEADS, FEATURES // HEADS)
    first, cache = step(params, x[:4], cache)
    last, cache = step(params, x[4:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, last]), y, rtol=1e-5, atol=1e-5)


def test_dropout_needs_a_key_and_acts_in_training(rng):
    layer = fnnet.transformer_block(HEADS, mlp_ratio=1, dropout_rate=0.5)
    x = jnp.asarray(rng.standard_normal((SEQ, FEATURES)), jnp.float32)
    params = _params(layer, x, rng)
    train = jax.jit(lambda p, x, k: layer.apply(p, x, key=k, train=True))
    assert not np.allclose(train(params, x, jax.random.key(1)), jax.jit(layer.apply)(params, x))
    with pytest.raises(fnnet.LayerError, match="dropout at 'drop_attn': needs a PRNG key"):
        jax.eval_shape(lambda p, x: layer.apply(p, x, train=True), params, x)


def test_errors(rng):
    x = jnp.zeros((SEQ, FEATURES))
    with pytest.raises(
        fnnet.LayerError,
        match=r"attention at 'attn': num_heads \(3\) must divide the model width 8",
    ):
        fnnet.transformer_block(3).init(jax.random.key(0), x)
    with pytest.raises(fnnet.LayerError, match="norm must be one of"):
        fnnet.transformer_block(HEADS, norm="batch_norm")
    with pytest.raises(fnnet.LayerError, match="unknown activation 'gelux'"):
        fnnet.transformer_block(HEADS, activation="gelux")
    layer = fnnet.transformer_block(HEADS, mlp_ratio=1)
    params = _params(layer, x, rng)
    with pytest.raises(fnnet.LayerError, match="at 'ln1'.*8.*7"):
        jax.eval_shape(layer.apply, params, jnp.zeros((SEQ, 7)))
    with pytest.raises(
        fnnet.LayerError, match=r"attention at 'attn': expected mask of shape \(5,\)"
    ):
        jax.eval_shape(lambda p, x: layer.apply(p, x, mask=jnp.ones(4, bool)), params, x)
