"""Numerical checks for multi-head attention: Flax parity, a NumPy GQA reference,
gradients through masks, the KV cache, and the error messages."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import fnnet

SEQ, FEATURES, HEADS = 5, 8, 2


def _flax_params(p):
    names = {"q": "query", "k": "key", "v": "value", "out": "out"}
    return {"params": {names[n]: {"kernel": p[n]["w"], "bias": p[n]["b"]} for n in names}}


def _flax_mha(out_features=FEATURES):
    return nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=FEATURES, out_features=out_features, deterministic=True
    )


def _x(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def _params(layer, x, rng, **kw):
    """Random params of the layer's shapes: nonzero biases, and no compiling of init."""
    shapes = jax.eval_shape(lambda k, x: layer.init(k, x, **kw), jax.random.key(0), x)
    return jax.tree.map(lambda s: 0.3 * _x(rng, *s.shape), shapes)


def _apply(layer, params, x, **kw):
    """One compile instead of many eager ones: keeps the file fast on a small CPU."""
    return jax.jit(lambda p, x, kw: layer.apply(p, x, **kw))(params, x, kw)


@pytest.mark.parametrize("variant", ["self", "cross", "causal", "padding", "causal_padding", "2d"])
def test_matches_flax(rng, variant):
    x = _x(rng, SEQ, FEATURES)
    context = _x(rng, 3, 6) if variant == "cross" else None
    causal = variant in ("causal", "causal_padding")
    layer = fnnet.multi_head_attention(HEADS, causal=causal)
    params = _params(layer, x, rng, context=context)

    kv_seq = SEQ if context is None else context.shape[0]
    mask, flax_mask = None, None
    padding = jnp.array([True, True, True, False, True])
    if variant in ("padding", "causal_padding"):
        mask = padding
        flax_mask = nn.make_attention_mask(jnp.ones((1, SEQ), bool), padding[None])
    if variant == "2d":
        mask = jnp.asarray(rng.random((SEQ, kv_seq)) < 0.5) | jnp.eye(SEQ, dtype=bool)
        flax_mask = mask[None, None]
    if causal:
        flax_mask = nn.combine_masks(flax_mask, nn.make_causal_mask(jnp.ones((1, SEQ))))

    y = _apply(layer, params, x, context=context, mask=mask)
    kv = None if context is None else context[None]
    expected = jax.jit(_flax_mha().apply)(_flax_params(params), x[None], kv, mask=flax_mask)[0]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _rope(x, base):
    """Rotate-half rotary embedding at positions 0 .. seq-1 for (seq, heads, head_dim)."""
    half = x.shape[-1] // 2
    angles = np.arange(x.shape[0])[:, None] * base ** (-2 * np.arange(half) / x.shape[-1])
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # (seq, 1, half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_grouped_query_matches_numpy(rng, rotary):
    heads, kv_heads, base = 4, 2, 100.0
    layer = fnnet.multi_head_attention(
        heads, num_kv_heads=kv_heads, causal=True, rotary=rotary, rotary_base=base
    )
    x = _x(rng, SEQ, FEATURES)
    params = _params(layer, x, rng)
    p = jax.tree.map(np.asarray, params)
    xn = np.asarray(x, np.float64)

    def proj(n):
        return np.einsum("sf,fhd->shd", xn, p[n]["w"]) + p[n]["b"]

    q, k, v = proj("q"), proj("k"), proj("v")
    if rotary:
        q, k = _rope(q, base), _rope(k, base)
    # Query head n reads key/value head n // (heads // kv_heads).
    k = np.repeat(k, heads // kv_heads, axis=1)
    v = np.repeat(v, heads // kv_heads, axis=1)
    scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((SEQ, SEQ), bool)), scores, -np.inf)
    h = np.einsum("hst,thd->shd", _softmax(scores), v)
    expected = np.einsum("shd,hdo->so", h, p["out"]["w"]) + p["out"]["b"]
    np.testing.assert_allclose(_apply(layer, params, x), expected, rtol=1e-5, atol=1e-5)


def test_gradients_through_masked_attention(rng):
    layer = fnnet.multi_head_attention(HEADS, causal=True)
    x = _x(rng, SEQ, FEATURES)
    params = _params(layer, x, rng)
    # Padding, plus one query row with nothing to attend to (its gradients must stay finite).
    mask = jnp.array([True, False, True, True, False])[None].repeat(SEQ, 0).at[2].set(False)

    @jax.jit
    def f(params, x):
        return layer.apply(params, x, mask=mask)

    check_grads(f, (params, x), order=1, modes=["rev"])


def test_fully_masked_row_is_finite_and_zero_attention(rng):
    layer = fnnet.multi_head_attention(HEADS)
    x = _x(rng, SEQ, FEATURES)
    params = _params(layer, x, rng)
    mask = jnp.ones((SEQ, SEQ), bool).at[1].set(False)
    y = _apply(layer, params, x, mask=mask)
    assert bool(jnp.all(jnp.isfinite(y)))
    # The masked row's attention result is zero, so only the output bias remains.
    np.testing.assert_allclose(y[1], params["out"]["b"], rtol=1e-6)
    assert not np.allclose(y[0], params["out"]["b"])


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_cache_decoding_matches_full_forward(rng, kv_heads, rotary):
    layer = fnnet.multi_head_attention(HEADS, num_kv_heads=kv_heads, causal=True, rotary=rotary)
    x = _x(rng, SEQ, FEATURES)
    params = _params(layer, x, rng)
    full = _apply(layer, params, x)

    step = jax.jit(lambda p, x, c: layer.apply(p, x, cache=c))
    cache = fnnet.init_attention_cache(SEQ + 2, kv_heads, FEATURES // HEADS)
    y, cache = step(params, x[:3], cache)  # prefill the prompt in one call
    outs = [y]
    for t in range(3, SEQ):  # then one token per call
        y, cache = step(params, x[t : t + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs), full, rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == SEQ
    assert step._cache_size() == 2  # prompt shape and token shape; the index is traced


def test_cache_overflow(rng):
    layer = fnnet.multi_head_attention(HEADS, causal=True)
    x = _x(rng, SEQ, FEATURES)
    params = _params(layer, x, rng)
    cache = fnnet.init_attention_cache(4, HEADS, FEATURES // HEADS)
    with pytest.raises(
        fnnet.LayerError, match="cannot write 5 positions into a cache of max_len 4"
    ):
        layer.apply(params, x, cache=cache)
    step = jax.jit(lambda p, x, c: layer.apply(p, x, cache=c))
    y, cache = step(params, x[:3], cache)
    assert bool(jnp.all(jnp.isfinite(y)))
    y, cache = step(params, x[3:5], cache)  # positions 3 and 4 of a 4-long cache
    assert bool(jnp.all(jnp.isnan(y)))


def test_dropout_drops_attention_result_in_training(rng):
    layer = fnnet.multi_head_attention(HEADS, dropout_rate=0.5)
    x = _x(rng, SEQ, FEATURES)
    params = _params(layer, x, rng)
    plain = _apply(fnnet.multi_head_attention(HEADS), params, x)
    np.testing.assert_allclose(_apply(layer, params, x), plain, rtol=1e-6)
    train = jax.jit(lambda p, x, k: layer.apply(p, x, key=k, train=True))
    dropped = train(params, x, jax.random.key(1))
    assert not np.allclose(dropped, plain)
    with pytest.raises(fnnet.LayerError, match="needs a key"):
        layer.apply(params, x, train=True)


def test_errors(rng):
    x = _x(rng, SEQ, FEATURES)
    with pytest.raises(fnnet.LayerError, match=r"num_heads \(3\) must divide the model width 64"):
        fnnet.multi_head_attention(3).init(jax.random.key(0), jnp.zeros((SEQ, 64)))
    with pytest.raises(fnnet.LayerError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        fnnet.multi_head_attention(4, num_kv_heads=3)
    with pytest.raises(fnnet.LayerError, match="num_heads must be a positive integer, got 0"):
        fnnet.multi_head_attention(0)

    layer = fnnet.multi_head_attention(HEADS)
    params = _params(layer, x, rng, context=jnp.zeros((3, 6)))
    with pytest.raises(fnnet.LayerError, match=r"expected input with last dimension 8, got 7"):
        layer.apply(params, x[:, :7], context=jnp.zeros((3, 6)))
    with pytest.raises(fnnet.LayerError, match=r"expected context with last dimension 6, got 7"):
        layer.apply(params, x, context=jnp.zeros((3, 7)))
    with pytest.raises(fnnet.LayerError, match=r"expected mask of shape \(3,\) \(kv_seq\) or "):
        layer.apply(params, x, context=jnp.zeros((3, 6)), mask=jnp.ones(SEQ, bool))
    with pytest.raises(fnnet.LayerError, match="expected a boolean mask"):
        layer.apply(params, x, context=jnp.zeros((3, 6)), mask=jnp.ones(3))
    with pytest.raises(fnnet.LayerError, match=r"got shape \(2, 5, 8\); batch with jax.vmap"):
        layer.apply(params, jnp.stack([x, x]), context=jnp.zeros((3, 6)))

    params = _params(layer, x, rng)
    cache = fnnet.init_attention_cache(SEQ, HEADS, FEATURES // HEADS)
    with pytest.raises(fnnet.LayerError, match="build the layer with causal=True"):
        layer.apply(params, x, cache=cache)
    causal = fnnet.multi_head_attention(HEADS, causal=True)
    with pytest.raises(fnnet.LayerError, match=r"of shape \(max_len, 2, 4\).*got \(5, 1, 4\)"):
        causal.apply(params, x, cache=fnnet.init_attention_cache(SEQ, 1, FEATURES // HEADS))
