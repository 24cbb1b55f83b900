"""The transformer: tokens that attend to each other, block after block.

Legend for shape comments: seq = tokens in the example, features = each token's
vector in the residual stream (GPT's d_model), vocab = distinct token ids,
depth = blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.attention import init_attention_cache
from fnnet._src.combinators import repeat
from fnnet._src.dense import dense
from fnnet._src.embedding import embedding
from fnnet._src.layer import Layer, composite
from fnnet._src.normalization import layer_norm
from fnnet._src.positional import learned_position, sinusoidal_position
from fnnet._src.transformer_block import transformer_block
from fnnet.models._config import records_config

POSITIONS = ("learned", "sinusoidal", "rotary")


def _check_common(kind, features, depth, num_heads, num_kv_heads, position):
    errors.positive_int(features, kind, "features")
    errors.positive_int(depth, kind, "depth")
    errors.positive_int(num_heads, kind, "num_heads")
    if features % num_heads:
        errors.fail(kind, f"num_heads ({num_heads}) must divide features ({features})")
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
    features: int = 64,
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
      features: features per token inside the model.
      depth: transformer blocks, stacked with ``fnnet.repeat`` (one compiled block).
      num_heads, num_kv_heads: attention heads; fewer key/value heads is grouped-query.
      mlp_ratio: the blocks' MLP is ``mlp_ratio * features`` wide.
      vocab: for integer token inputs, the number of token ids.
      patch_size: for real-valued inputs, steps per token; must divide ``seq``.
      max_len: the most tokens a learned position table holds.
      position: ``"learned"``, ``"sinusoidal"`` or ``"rotary"``.
      dropout_rate: dropout on residual branches while training.
      attention_implementation: ``None``/``"xla"``, or ``"cudnn"`` for the fused
        cuDNN attention kernel on NVIDIA GPUs.

    Input: ``(seq,)`` int ids with ``vocab``; else ``(seq,)`` or ``(seq, features)``
    real values. Keyword ``mask`` (``(seq,)`` bool, after patching: one per token)
    excludes padding from attention and pooling; keyword ``length`` (an int: the
    first ``length`` tokens, after patching, are real) does the same for padding at
    the end, and lets the attention kernel take a sequence length instead of a mask.
    Output: ``(out_features,)``.

    Params: ``{"embed", ["position"], "blocks" (stacked, leading axis depth), "ln_f", "out"}``.
    """
    kind = "transformer_classifier"
    errors.positive_int(out_features, kind, "out_features")
    errors.positive_int(patch_size, kind, "patch_size")
    _check_common(kind, features, depth, num_heads, num_kv_heads, position)
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
    embed = embedding(vocab, features) if vocab is not None else dense(features)
    pos = _position_layer(position, max_len)
    blocks, ln_f, out = repeat(block, depth), layer_norm(), dense(out_features)

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

    def forward(call, x, *, mask=None, length=None):
        h = call("embed", embed, _tokens(x))  # (seq, features)
        if pos is not None:
            h = call("position", pos, h)
        h = call("blocks", blocks, h, mask=mask, length=length)  # (seq, features)
        h = call("ln_f", ln_f, h)
        real = mask  # (seq,): the tokens that are pooled
        if length is not None:
            prefix = jnp.arange(h.shape[0]) < length
            real = prefix if real is None else real & prefix
        if real is None:
            pooled = jnp.mean(h, axis=0)  # (features,)
        else:
            weights = real.astype(h.dtype)[:, None]  # (seq, 1)
            pooled = jnp.sum(h * weights, axis=0) / jnp.maximum(jnp.sum(weights), 1.0)
        return call("out", out, pooled)  # (out_features,)

    return composite(forward, kind)


@records_config
def transformer_lm(
    vocab: int,
    *,
    features: int = 128,
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
    (``fnnet.attend``), saving ``vocab * features`` parameters.

    Args:
      vocab: number of token ids.
      features, depth, num_heads, num_kv_heads, mlp_ratio, dropout_rate,
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
    _check_common(kind, features, depth, num_heads, num_kv_heads, position)
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
    # GPT-2's initialization (Radford et al. 2019; nanoGPT's _init_weights): the token
    # table, and an untied output layer, drawn with standard deviation 0.02. With the
    # table tied to the output, a standard deviation of 1 would give logits of
    # standard deviation ~sqrt(features) after the final LayerNorm, and a first loss
    # far above ln(vocab).
    small = jax.nn.initializers.normal(stddev=0.02)
    embed = embedding(vocab, features, init=small)
    pos = _position_layer(position, max_len)
    blocks, ln_f = repeat(block, depth), layer_norm()
    out = None if tie_embeddings else dense(vocab, use_bias=False, w_init=small)

    def forward(call, tokens, *, cache=None):  # tokens: (seq,) int
        _check_tokens(tokens)
        h = call("embed", embed, tokens)  # (seq, features)
        if pos is not None:
            h = call("position", pos, h, positions=_positions(cache, tokens.shape[0]))
        if cache is None:
            h = call("blocks", blocks, h)  # (seq, features)
        else:
            h, cache = call("blocks", blocks, h, cache=cache)
        h = call("ln_f", ln_f, h)
        logits = call("embed", embed, h, transpose=True) if out is None else call("out", out, h)
        return logits if cache is None else (logits, cache)  # logits: (seq, vocab)

    def _check_tokens(tokens):
        if not jnp.issubdtype(tokens.dtype, jnp.integer) or len(tokens.shape) != 1:
            errors.fail(
                kind,
                f"expected int token ids of shape (seq,), got {tokens.dtype} {tuple(tokens.shape)}",
            )

    def _positions(cache, seq):
        """Without a cache: 0 .. seq-1 (None); with one, where the cache stops."""
        if cache is None:
            return None
        size = cache["k"].shape[1]  # (depth, cache_len, kv_heads, head_dim)
        if size > max_len:
            errors.fail(
                kind,
                f"the cache holds {size} positions but the learned position table only "
                f"{max_len} (max_len); make the cache at most max_len long, or build the "
                "model with a larger max_len",
            )
        return cache["index"][0] + jnp.arange(seq)  # (seq,)

    return composite(forward, kind)


def init_cache(params: dict, max_len: int, dtype=jnp.float32) -> dict:
    """An empty key/value cache for a :func:`transformer_lm` with these params.

    The sizes are read from the parameters (depth, key/value heads, head size).

    Returns:
      ``{"k": (depth, max_len, kv_heads, head_dim), "v": same, "index": (depth,)}``.
    """
    k_weight = params["blocks"]["attn"]["k"]["w"]  # (depth, features, kv_heads, head_dim)
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
    if "position" in params:  # learned positions: the table is as long as the model reaches
        max_len = params["position"]["table"].shape[0]
        if prompt.shape[0] + max_new_tokens > max_len:
            errors.fail(
                "generate",
                f"the prompt ({prompt.shape[0]} tokens) and max_new_tokens ({max_new_tokens}) "
                f"need {prompt.shape[0] + max_new_tokens} positions, but the model's learned "
                f"positions stop at max_len={max_len}",
            )
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
