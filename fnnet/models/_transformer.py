"""The transformer: tokens that attend to each other, block after block.

Legend for shape comments: seq = tokens in the example, width = model features,
vocab = distinct token ids, depth = blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.attention import init_attention_cache
from fnnet._src.combinators import repeat
from fnnet._src.dense import dense
from fnnet._src.embedding import attend, embedding
from fnnet._src.layer import Layer, apply_child, init_child, split_key
from fnnet._src.normalization import layer_norm
from fnnet._src.positional import learned_position, sinusoidal_position
from fnnet._src.transformer_block import transformer_block
from fnnet.models._config import records_config

POSITIONS = ("learned", "sinusoidal", "rotary")


def _check_common(kind, width, depth, num_heads, num_kv_heads, position):
    errors.positive_int(width, kind, "width")
    errors.positive_int(depth, kind, "depth")
    errors.positive_int(num_heads, kind, "num_heads")
    if width % num_heads:
        errors.fail(kind, f"num_heads ({num_heads}) must divide width ({width})")
    if num_kv_heads is not None and (
        not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads
    ):
        errors.fail(kind, f"num_kv_heads must divide num_heads ({num_heads}), got {num_kv_heads!r}")
    if position not in POSITIONS:
        errors.fail(kind, f"position must be one of {list(POSITIONS)}, got {position!r}")


def _position_layer(position: str, max_len: int) -> Layer | None:
    if position == "learned":
        return learned_position(max_len)
    if position == "sinusoidal":
        return sinusoidal_position()
    return None  # rotary: applied inside attention


@records_config
def transformer_classifier(
    out_features: int,
    *,
    width: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    mlp_ratio: int = 4,
    vocab: int | None = None,
    patch_size: int = 1,
    max_len: int = 512,
    position: str = "learned",
    dropout_rate: float = 0.0,
    attention_implementation: str | None = None,
) -> Layer:
    """An encoder: embed tokens, ``depth`` transformer blocks, mean-pool, classify.

    The input is either token ids (give ``vocab``) or a signal of real values,
    which is cut into patches of ``patch_size`` consecutive steps, each patch
    one token (as a vision transformer does with image patches).

    Args:
      out_features: number of classes (or outputs).
      width: features per token inside the model.
      depth: transformer blocks, stacked with ``fnnet.repeat`` (one compiled block).
      num_heads, num_kv_heads: attention heads; fewer key/value heads is grouped-query.
      mlp_ratio: the blocks' MLP is ``mlp_ratio * width`` wide.
      vocab: for integer token inputs, the number of token ids.
      patch_size: for real-valued inputs, steps per token; must divide ``seq``.
      max_len: the most tokens a learned position table holds.
      position: ``"learned"``, ``"sinusoidal"`` or ``"rotary"``.
      dropout_rate: dropout on residual branches while training.
      attention_implementation: ``None``/``"xla"``, or ``"cudnn"`` for the fused
        cuDNN attention kernel on NVIDIA GPUs.

    Input: ``(seq,)`` int ids with ``vocab``; else ``(seq,)`` or ``(seq, features)``
    real values. Keyword ``mask`` (``(seq,)`` bool, after patching: one per token)
    excludes padding from attention and pooling.
    Output: ``(out_features,)``.

    Params: ``{"embed", ["position"], "blocks" (stacked, leading axis depth), "ln_f", "out"}``.
    """
    kind = "transformer_classifier"
    errors.positive_int(out_features, kind, "out_features")
    errors.positive_int(patch_size, kind, "patch_size")
    _check_common(kind, width, depth, num_heads, num_kv_heads, position)
    if vocab is not None:
        errors.positive_int(vocab, kind, "vocab")
    block = transformer_block(
        num_heads,
        mlp_ratio=mlp_ratio,
        num_kv_heads=num_kv_heads,
        dropout_rate=dropout_rate,
        rotary=position == "rotary",
        attention_implementation=attention_implementation,
    )
    children: dict[str, Layer] = {
        "embed": embedding(vocab, width) if vocab is not None else dense(width),
    }
    pos = _position_layer(position, max_len)
    if pos is not None:
        children["position"] = pos
    children["blocks"] = repeat(block, depth)
    children["ln_f"] = layer_norm()
    children["out"] = dense(out_features)

    def _tokens(x):
        if vocab is not None:
            if not jnp.issubdtype(x.dtype, jnp.integer) or jnp.ndim(x) != 1:
                errors.fail(
                    kind, f"expected int token ids of shape (seq,), got {x.dtype} {jnp.shape(x)}"
                )
            return x
        if jnp.ndim(x) == 1:
            x = jnp.expand_dims(x, -1)  # (seq, 1)
        if jnp.ndim(x) != 2 or x.shape[0] % patch_size:
            errors.fail(
                kind,
                f"expected (seq,) or (seq, features) with seq divisible by "
                f"patch_size {patch_size}, got shape {jnp.shape(x)}",
            )
        return jnp.reshape(x, (x.shape[0] // patch_size, -1))  # (tokens, patch_size * features)

    def init(key, x):
        h = jax.eval_shape(_tokens, x)
        params = {}
        for (name, layer), k in zip(children.items(), split_key(key, len(children))):
            p, _, y = init_child(name, layer, k, h)
            if p:
                params[name] = p
            h = jax.ShapeDtypeStruct(y.shape[-1:], y.dtype) if name == "ln_f" else y
        return params

    def apply(params, x, *, key=None, train=False, mask=None):
        (k_blocks,) = split_key(key, 1)
        h, _ = apply_child(
            "embed", children["embed"], params["embed"], {}, _tokens(x), key=None, train=train
        )  # (seq, width)
        if pos is not None:
            h, _ = apply_child(
                "position", pos, params.get("position", {}), {}, h, key=None, train=train
            )
        extra = {} if mask is None else {"mask": mask}
        h, _ = apply_child(
            "blocks",
            children["blocks"],
            params["blocks"],
            {},
            h,
            key=k_blocks,
            train=train,
            **extra,
        )
        h, _ = apply_child("ln_f", children["ln_f"], params["ln_f"], {}, h, key=None, train=train)
        if mask is None:
            pooled = jnp.mean(h, axis=0)  # (width,)
        else:
            weights = mask.astype(h.dtype)[:, None]  # (seq, 1)
            pooled = jnp.sum(h * weights, axis=0) / jnp.maximum(jnp.sum(weights), 1.0)
        y, _ = apply_child("out", children["out"], params["out"], {}, pooled, key=None, train=train)
        return y

    return Layer(init, apply, kind)


@records_config
def transformer_lm(
    vocab: int,
    *,
    width: int = 128,
    depth: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    mlp_ratio: int = 4,
    max_len: int = 256,
    position: str = "rotary",
    tie_embeddings: bool = True,
    dropout_rate: float = 0.0,
    attention_implementation: str | None = None,
) -> Layer:
    """A decoder-only language model (the GPT recipe): predict each next token.

    Causal self-attention lets token ``t`` see tokens ``0..t`` only. With
    ``tie_embeddings`` the output layer reuses the embedding table
    (``fnnet.attend``), saving ``vocab * width`` parameters.

    Args:
      vocab: number of token ids.
      width, depth, num_heads, num_kv_heads, mlp_ratio, dropout_rate,
        attention_implementation: as in :func:`transformer_classifier`.
      max_len: the longest sequence (learned positions, and the default cache size).
      position: ``"rotary"`` (default), ``"learned"`` or ``"sinusoidal"``.
      tie_embeddings: share the embedding table with the output layer.

    Input: ``(seq,)`` int token ids.
    Output: ``(seq, vocab)`` logits for the token after each position.

    Decoding: ``apply(params, tokens, cache=cache)`` (a cache from :func:`init_cache`)
    appends ``tokens`` after those already in the cache (a whole prompt at once,
    then one token at a time) and returns ``(logits, new_cache)``. See :func:`generate`.

    Params: ``{"embed": {"table"}, ["position"], "blocks" (stacked, leading axis depth),
    "ln_f", ["out"]}``.
    """
    kind = "transformer_lm"
    errors.positive_int(vocab, kind, "vocab")
    errors.positive_int(max_len, kind, "max_len")
    _check_common(kind, width, depth, num_heads, num_kv_heads, position)
    if position == "sinusoidal":
        errors.fail(
            kind,
            "position 'sinusoidal' is not supported with a decoding cache; "
            "use 'rotary' or 'learned'",
        )
    block = transformer_block(
        num_heads,
        mlp_ratio=mlp_ratio,
        num_kv_heads=num_kv_heads,
        causal=True,
        dropout_rate=dropout_rate,
        rotary=position == "rotary",
        attention_implementation=attention_implementation,
    )
    blocks = repeat(block, depth)
    embed = embedding(vocab, width)
    pos = _position_layer(position, max_len)
    ln_f = layer_norm()
    out = None if tie_embeddings else dense(vocab, use_bias=False)

    def _check_tokens(x):
        if not jnp.issubdtype(x.dtype, jnp.integer) or len(x.shape) != 1:
            errors.fail(
                kind, f"expected int token ids of shape (seq,), got {x.dtype} {tuple(x.shape)}"
            )

    def init(key, x):
        _check_tokens(x)
        keys = split_key(key, 5)
        params = {}
        params["embed"], _, h = init_child("embed", embed, keys[0], x)
        if pos is not None:
            params["position"], _, h = init_child("position", pos, keys[1], h)
        params["blocks"], _, h = init_child("blocks", blocks, keys[2], h)
        params["ln_f"], _, h = init_child("ln_f", ln_f, keys[3], h)
        if out is not None:
            params["out"], _, _ = init_child("out", out, keys[4], h)
        return params

    def _logits(params, h, train):
        h, _ = apply_child("ln_f", ln_f, params["ln_f"], {}, h, key=None, train=train)
        if out is None:
            return attend(params["embed"], h)  # (seq, vocab)
        return apply_child("out", out, params["out"], {}, h, key=None, train=train)[0]

    def apply(params, x, *, key=None, train=False, cache=None):
        _check_tokens(x)
        h, _ = apply_child("embed", embed, params["embed"], {}, x, key=None, train=train)
        if cache is None:
            if pos is not None:
                h, _ = apply_child(
                    "position", pos, params["position"], {}, h, key=None, train=train
                )
            h, _ = apply_child("blocks", blocks, params["blocks"], {}, h, key=key, train=train)
            return _logits(params, h, train)  # (seq, vocab)
        if pos is not None:  # learned positions continue from where the cache stops
            table = params["position"]["table"]  # (max_len, width)
            start = cache["index"][0]
            h = h + jax.lax.dynamic_slice_in_dim(table, start, x.shape[0]).astype(h.dtype)

        def body(h, inputs):
            p, c, k = inputs
            with errors.scope("blocks/block"):
                h, c = block.apply(p, h, key=k, train=train, cache=c)
            return h, c

        keys = None if key is None else jax.random.split(key, depth)
        h, new_cache = jax.lax.scan(body, h, (params["blocks"], cache, keys), length=depth)
        return _logits(params, h, train), new_cache

    return Layer(init, apply, kind)


def init_cache(params: dict, max_len: int, dtype=jnp.float32) -> dict:
    """An empty key/value cache for a :func:`transformer_lm` with these params.

    The sizes are read from the parameters (depth, key/value heads, head size).

    Returns:
      ``{"k": (depth, max_len, kv_heads, head_dim), "v": same, "index": (depth,)}``.
    """
    k_weight = params["blocks"]["attn"]["k"]["w"]  # (depth, width, kv_heads, head_dim)
    depth, _, kv_heads, head_dim = k_weight.shape
    one = init_attention_cache(max_len, kv_heads, head_dim, dtype)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (depth, *a.shape)), one)


def generate(
    model: Layer,
    params: dict,
    prompt: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """Samples a continuation of ``prompt`` from a :func:`transformer_lm`.

    The prompt is processed in one call that fills the key/value cache; each new
    token then costs one single-token call. Everything runs as one compiled
    program (a ``lax.scan`` over the new tokens).

    Args:
      model: a ``transformer_lm``.
      params: its parameters.
      prompt: ``(seq,)`` int token ids, at least one.
      key: PRNG key for sampling.
      max_new_tokens: how many tokens to add.
      temperature: divides the logits; 0 picks the most likely token (greedy).
      top_k: sample only among the ``top_k`` most likely tokens.

    Returns:
      ``(seq + max_new_tokens,)`` token ids: the prompt, then the new tokens.
    """
    errors.positive_int(max_new_tokens, "generate", "max_new_tokens")
    if jnp.ndim(prompt) != 1 or prompt.shape[0] < 1:
        errors.fail(
            "generate",
            f"prompt must be (seq,) token ids with seq >= 1, got shape {jnp.shape(prompt)}",
        )
    if top_k is not None:
        errors.positive_int(top_k, "generate", "top_k")
    if temperature < 0:
        errors.fail("generate", f"temperature must be >= 0, got {temperature}")
    return _generate(model, max_new_tokens, float(temperature), top_k, params, prompt, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(model, max_new_tokens, temperature, top_k, params, prompt, key):
    cache = init_cache(params, prompt.shape[0] + max_new_tokens)
    logits, cache = model.apply(params, prompt, cache=cache)  # (seq, vocab)

    def sample(logits, key):  # (vocab,) -> ()
        if temperature == 0:
            return jnp.argmax(logits).astype(prompt.dtype)
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits).astype(prompt.dtype)

    def step(carry, key):
        last_logits, cache = carry
        token = sample(last_logits, key)
        logits, cache = model.apply(params, token[None], cache=cache)
        return (logits[-1], cache), token

    keys = jax.random.split(key, max_new_tokens)
    _, new_tokens = jax.lax.scan(step, (logits[-1], cache), keys)
    return jnp.concatenate([prompt, new_tokens])
