"""Multi-head dot-product attention: grouped-query heads, masks, rotary positions, a KV cache.

Shapes for one example (batch with ``jax.vmap``): the query sequence is ``x`` of
``(seq, features)``; keys and values come from ``x`` (self-attention) or from
``context`` of ``(kv_seq, context_features)`` (cross-attention). Inside, queries are
``(seq, heads, head_dim)`` and keys/values ``(kv_seq, kv_heads, head_dim)``; with
fewer key/value heads than query heads (grouped-query attention) query head ``n``
reads key/value head ``n // (heads // kv_heads)``.

The scores, masking and softmax are left to ``jax.nn.dot_product_attention``, so
``implementation="cudnn"`` runs the fused cuDNN kernel on GPUs (bfloat16 or float16
inputs only, and a head_dim that is a multiple of 8 and at most 256 on Hopper and
newer, 128 before; JAX raises otherwise). Under ``jax.vmap`` the kernel is called
once for the whole batch, on ``(batch, seq, heads, head_dim)`` with nested ``vmap``
axes folded into ``batch``, by a custom batching rule (see
:mod:`fnnet._src.attention_core`); left to JAX's own batching, the cuDNN kernel
fails with a mask and more than one head. The mask reaches the kernel in its
cheapest exact form: causality as ``is_causal``; ``length`` (a prefix of real keys)
and a one-token decoding step (which sees cache positions ``0 .. index``) as
``key_value_seq_lengths``; only a ``mask`` argument or a several-token cache call
(a prompt) as a boolean ``(batch, 1, seq, kv_seq)`` mask, shared by the heads (and
``(1, 1, seq, kv_seq)`` when the vmap does not batch it). Reverse-mode gradients
are one batched program too (for cuDNN, a custom-batched backward call); forward-mode
ones (``jax.jvp``, ``jax.jacfwd``) are not supported.

XLA's path computes the softmax in float32 whatever the input dtype: bfloat16
inputs gain precision there, and float64 inputs lose it (the attention weights are
float32 before they are cast back), so float64 attention agrees with a float64
reference to about 1e-7, not to float64 precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnnet._src import checks, errors
from fnnet._src.attention_core import attend
from fnnet._src.checks import compute_dtype
from fnnet._src.layer import Layer

_KIND = "attention"
_IMPLEMENTATIONS = (None, "xla", "cudnn")


def init_attention_cache(max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> dict:
    """An empty key/value cache for decoding with :func:`multi_head_attention`.

    Args:
      max_len: the most positions (prompt plus generated tokens) the cache can hold.
      num_kv_heads: the layer's number of key/value heads (``num_heads`` without GQA).
      head_dim: the layer's size of each head.
      dtype: the dtype the keys and values are stored in.

    Returns:
      ``{"k": (max_len, kv_heads, head_dim) zeros, "v": the same, "index": int32 0}``;
      ``index`` is the number of positions written so far.
    """
    errors.positive_int(max_len, "attention_cache", "max_len")
    errors.positive_int(num_kv_heads, "attention_cache", "num_kv_heads")
    errors.positive_int(head_dim, "attention_cache", "head_dim")
    zeros = jnp.zeros((max_len, num_kv_heads, head_dim), dtype)
    return {"k": zeros, "v": zeros, "index": jnp.int32(0)}


def _check_sequence(x, what: str) -> None:
    checks.sequence(_KIND, x, what)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        errors.fail(_KIND, f"expected a floating-point {what}, got dtype {x.dtype}")


def _check_width(x, expected: int, what: str) -> None:
    if x.shape[-1] != expected:
        errors.fail(
            _KIND,
            f"expected {what} with last dimension {expected}, got {x.shape[-1]} "
            f"({what} shape {tuple(x.shape)})",
        )


def _project(p: dict, x: jax.Array, dtype) -> jax.Array:
    """(seq, features) -> (seq, heads, head_dim)."""
    y = jnp.einsum("sf,fhd->shd", x.astype(dtype), p["w"].astype(dtype))
    if "b" in p:
        y = y + p["b"].astype(dtype)[None]
    return y


def _user_mask(mask, seq: int, kv_seq: int) -> jax.Array:
    """A ``(kv_seq,)`` or ``(seq, kv_seq)`` boolean mask as ``(seq, kv_seq)``."""
    shape = tuple(jnp.shape(mask))
    if shape not in ((kv_seq,), (seq, kv_seq)):
        errors.fail(
            _KIND,
            f"expected mask of shape ({kv_seq},) (kv_seq) or ({seq}, {kv_seq}) (seq, kv_seq), "
            f"got {shape}",
        )
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        errors.fail(_KIND, f"expected a boolean mask (True = attend), got dtype {mask.dtype}")
    return mask if mask.ndim == 2 else jnp.broadcast_to(mask[None], (seq, kv_seq))


def _user_length(length) -> jax.Array:
    """An int scalar ``length`` as int32."""
    length = jnp.asarray(length)
    if length.shape != () or not jnp.issubdtype(length.dtype, jnp.integer):
        errors.fail(
            _KIND,
            "expected length to be an int scalar (the number of leading key positions "
            f"that may be attended), got {length.dtype} of shape {length.shape}",
        )
    return length.astype(jnp.int32)


def multi_head_attention(
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    out_features: int | None = None,
    causal: bool = False,
    use_bias: bool = True,
    rotary: bool = False,
    rotary_base: float = 10000.0,
    dropout_rate: float = 0.0,
    implementation: str | None = None,
    param_dtype=jnp.float32,
) -> Layer:
    """Multi-head scaled dot-product attention, ``softmax(q k^T / sqrt(head_dim)) v``.

    ``init(key, x, *, context=None)`` and
    ``apply(params, x, *, key=None, train=False, context=None, mask=None, length=None,
    cache=None)``. Pass ``context`` to both for cross-attention.

    Masks. ``mask`` is boolean with True meaning "may attend": ``(kv_seq,)`` masks
    key/value positions for every query (padding), ``(seq, kv_seq)`` masks each
    query separately. ``length``, an int scalar, says the same as the padding mask
    ``jnp.arange(kv_seq) < length`` (the first ``length`` keys are real), and is
    the cheaper form: the kernel gets it as a sequence length and builds no mask
    (see :mod:`fnnet._src.attention_core`). Both are combined (logical and) with
    each other and with the causal mask, under which
    query ``i`` sees keys ``j <= i``. A query row whose every key is masked out has no
    defined softmax; its attention result is set to zero, so its output is just the
    output bias (finite, with finite gradients on the default XLA path).

    Dropout. ``jax.nn.dot_product_attention`` never exposes the attention weights,
    so they are not dropped. Instead, when training with ``dropout_rate > 0``, each
    element of the ``(seq, heads, head_dim)`` attention result (the weighted sum of
    values, before the output projection) is zeroed with probability
    ``dropout_rate`` and the survivors scaled by ``1 / (1 - dropout_rate)``.

    Decoding. With ``cache=`` (from :func:`init_attention_cache`) ``apply`` returns
    ``(y, new_cache)``: this call's ``seq`` keys and values (a whole prompt, or one
    token) are written at positions ``index .. index + seq - 1`` and every query
    attends causally over cache positions ``<= its own`` (absolute position
    ``index + i``), which is also where rotary is applied. The cache is for causal
    self-attention only. ``seq > max_len`` is rejected when tracing; a traced
    ``index`` cannot be checked then, so a call with ``index + seq > max_len``
    returns NaN outputs instead of silently overwriting the cache's last positions.
    ``mask`` then has ``kv_seq = max_len`` and ``length`` counts cache positions.

    Args:
      num_heads: number of query heads.
      num_kv_heads: number of key/value heads (grouped-query attention); must divide
        ``num_heads``. Default ``num_heads``.
      head_dim: size of each head. Default ``features // num_heads``.
      out_features: output width. Default ``features``.
      causal: query ``i`` attends only to keys ``j <= i``.
      use_bias: add biases to the four projections.
      rotary: apply rotary position embeddings to queries and keys.
      rotary_base: the rotary frequency base.
      dropout_rate: probability of dropping an attention-result element in training.
      implementation: ``None``/``"xla"`` or ``"cudnn"``, passed to
        ``jax.nn.dot_product_attention``.
      param_dtype: dtype of the parameters.

    Input: ``(seq, features)``; context ``(kv_seq, context_features)``.
    Output: ``(seq, out_features)`` (and the new cache when ``cache`` is given).

    Params: ``{"q": {"w": (features, heads, head_dim), "b": (heads, head_dim)},
    "k"/"v": {"w": (context_features, kv_heads, head_dim), "b": (kv_heads, head_dim)},
    "out": {"w": (heads, head_dim, out_features), "b": (out_features,)}}``.
    """
    errors.positive_int(num_heads, _KIND, "num_heads")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    errors.positive_int(kv_heads, _KIND, "num_kv_heads")
    if num_heads % kv_heads:
        errors.fail(_KIND, f"num_kv_heads ({kv_heads}) must divide num_heads ({num_heads})")
    if head_dim is not None:
        errors.positive_int(head_dim, _KIND, "head_dim")
    if out_features is not None:
        errors.positive_int(out_features, _KIND, "out_features")
    dropout_rate = errors.rate(dropout_rate, _KIND, "dropout_rate")
    if (
        isinstance(rotary_base, bool)
        or not isinstance(rotary_base, (int, float))
        or rotary_base <= 1
    ):
        errors.fail(_KIND, f"rotary_base must be a number greater than 1, got {rotary_base!r}")
    if implementation not in _IMPLEMENTATIONS:
        errors.fail(
            _KIND, f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}"
        )

    def sizes(features: int) -> int:
        if head_dim is not None:
            d = head_dim
        elif features % num_heads:
            errors.fail(_KIND, f"num_heads ({num_heads}) must divide the model width {features}")
        else:
            d = features // num_heads
        if rotary and d % 2:
            errors.fail(_KIND, f"rotary embeddings need an even head_dim, got {d}")
        return d

    def init(key, x, *, context=None):
        _check_sequence(x, "input")
        source = x if context is None else context
        if context is not None:
            _check_sequence(context, "context")
        features, source_features = x.shape[-1], source.shape[-1]
        d = sizes(features)
        out = features if out_features is None else out_features
        kq, kk, kv, ko = jax.random.split(key, 4)
        # Fan-in is the contracted input axis, as in flax's DenseGeneral.
        w_in = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        w_out = jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)

        def proj(k, fan_in, heads):
            p = {"w": w_in(k, (fan_in, heads, d), param_dtype)}
            if use_bias:
                p["b"] = jnp.zeros((heads, d), param_dtype)
            return p

        params = {
            "q": proj(kq, features, num_heads),
            "k": proj(kk, source_features, kv_heads),
            "v": proj(kv, source_features, kv_heads),
            "out": {"w": w_out(ko, (num_heads, d, out), param_dtype)},
        }
        if use_bias:
            params["out"]["b"] = jnp.zeros((out,), param_dtype)
        return params

    def apply(
        params, x, *, key=None, train=False, context=None, mask=None, length=None, cache=None
    ):
        # Every check is static and comes first: misuse fails before any computation.
        _check_sequence(x, "input")
        _check_width(x, params["q"]["w"].shape[0], "input")
        if context is not None:
            if cache is not None:
                errors.fail(_KIND, "a KV cache is for self-attention; got both cache and context")
            _check_sequence(context, "context")
            _check_width(context, params["k"]["w"].shape[0], "context")
        seq = x.shape[0]
        if cache is not None:
            if not causal:
                errors.fail(
                    _KIND,
                    "a KV cache decodes causally; build the layer with causal=True so that "
                    "training and decoding agree",
                )
            _check_cache(cache, params["k"]["w"].shape[1:], seq)
        source = x if context is None else context
        kv_seq = source.shape[0] if cache is None else cache["k"].shape[0]
        user_mask = None if mask is None else _user_mask(mask, seq, kv_seq)  # (seq, kv_seq)
        length = None if length is None else _user_length(length)  # int32 ()
        dropping = train and dropout_rate > 0
        if dropping and key is None:
            errors.fail(
                _KIND,
                f"dropout_rate={dropout_rate} needs a key in training: "
                "call apply(..., key=jax.random.key(...), train=True)",
            )
        # Explicit, so strict dtype promotion still lets bfloat16 inputs meet float32 weights.
        dtype = compute_dtype(x.dtype, params["q"]["w"].dtype)

        q = _project(params["q"], x, dtype)  # (seq, heads, head_dim)
        k = _project(params["k"], source, dtype)  # (kv_seq, kv_heads, head_dim)
        v = _project(params["v"], source, dtype)  # (kv_seq, kv_heads, head_dim)

        if cache is None:
            positions, kv_positions = jnp.arange(seq), jnp.arange(kv_seq)
        else:
            # Absolute positions: this call's tokens follow the `index` already cached.
            positions = cache["index"] + jnp.arange(seq, dtype=jnp.int32)  # (seq,)
            kv_positions = positions
        if rotary:
            q, k = _rotate(q, k, positions, kv_positions, rotary_base)
        if cache is not None:
            cache = _write(cache, k, v)
            # From here on kv_seq is max_len: (max_len, kv_heads, head_dim).
            k, v = cache["k"].astype(dtype), cache["v"].astype(dtype)

        # Query at position p sees keys at positions <= p (in a cache this also hides
        # the unwritten tail).
        below = jnp.arange(kv_seq, dtype=positions.dtype)[None, :] <= positions[:, None]
        # The kernel is told the pattern in its cheapest exact form: causality as
        # is_causal, a prefix of valid keys as a length, and only the rest as a mask.
        allowed, kv_length, is_causal = user_mask, length, causal
        if cache is not None:
            # Queries start at `index`, not 0, so is_causal (j <= i) does not apply.
            is_causal = False
            if seq == 1:
                # One query at position `index` sees the first index + 1 keys: a length.
                stop = positions[0] + 1
                kv_length = stop if length is None else jnp.minimum(length, stop)
            else:
                allowed = below if user_mask is None else below & user_mask
        h = attend(q, k, v, allowed, kv_length, is_causal=is_causal, implementation=implementation)
        # (seq, heads, head_dim)
        # A fully masked row has no softmax; define its attention result as zero.
        live = None  # (seq,): whether each query sees any key
        if user_mask is not None:
            visible = user_mask & below if causal else user_mask
            if length is not None:
                visible = visible & (jnp.arange(kv_seq) < length)[None, :]
            live = jnp.any(visible, axis=-1)
        elif length is not None:
            # Causality never hides key 0, so only a length <= 0 empties a row.
            live = jnp.broadcast_to(length > 0, (seq,))
        if live is not None:
            h = jnp.where(live[:, None, None], h, jnp.zeros_like(h))
        if dropping:
            keep = jax.random.bernoulli(key, 1.0 - dropout_rate, h.shape)
            h = jnp.where(keep, h / jnp.asarray(1.0 - dropout_rate, h.dtype), jnp.zeros_like(h))

        y = jnp.einsum("shd,hdo->so", h, params["out"]["w"].astype(dtype))  # (seq, out_features)
        if "b" in params["out"]:
            y = y + params["out"]["b"].astype(dtype)[None]
        if cache is None:
            return y
        # A traced index cannot be checked while tracing, and dynamic_update_slice would
        # clamp an overflowing write onto the last positions: poison the output instead.
        fits = cache["index"] <= jnp.int32(cache["k"].shape[0])
        return jnp.where(fits, y, jnp.full_like(y, jnp.nan)), cache

    return Layer(init, apply, _KIND)


def _rotate(q, k, q_positions, k_positions, base: float):
    # Imported here so that attention without rotary never needs the positional module.
    from fnnet._src.positional import apply_rotary

    return apply_rotary(q, q_positions, base=base), apply_rotary(k, k_positions, base=base)


def _check_cache(cache, kv_shape, seq: int) -> None:
    """Checks the cache against the layer's key/value heads and this call's length."""
    if not isinstance(cache, dict) or set(cache) != {"k", "v", "index"}:
        errors.fail(_KIND, "expected cache to be a dict from init_attention_cache")
    k = cache["k"]
    if len(k.shape) != 3 or tuple(k.shape[1:]) != tuple(kv_shape) or cache["v"].shape != k.shape:
        errors.fail(
            _KIND,
            f"expected cache k and v of shape (max_len, {kv_shape[0]}, {kv_shape[1]}) "
            f"(max_len, kv_heads, head_dim), got {tuple(k.shape)} and {tuple(cache['v'].shape)}",
        )
    if seq > k.shape[0]:
        errors.fail(_KIND, f"cannot write {seq} positions into a cache of max_len {k.shape[0]}")
    if jnp.shape(cache["index"]) != () or jnp.asarray(cache["index"]).dtype != jnp.int32:
        errors.fail(_KIND, "expected cache index to be an int32 scalar")


def _write(cache, k, v) -> dict:
    """Writes this call's keys and values at ``index`` and advances it."""
    index = cache["index"]
    start = (index, jnp.int32(0), jnp.int32(0))
    dtype = cache["k"].dtype
    return {
        "k": jax.lax.dynamic_update_slice(cache["k"], k.astype(dtype), start),
        "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(dtype), start),
        "index": index + jnp.int32(k.shape[0]),
    }
