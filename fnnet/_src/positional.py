"""Positional encodings: telling a permutation-invariant attention layer where tokens are.

* :func:`sinusoidal_position` adds the fixed sine/cosine table of Vaswani et al. (2017).
* :func:`learned_position` adds a learned row per position (GPT-2, BERT).
* :func:`rotary` rotates query/key features by a position-dependent angle
  (RoPE, Su et al. 2021), so attention scores depend only on relative position.

Each accepts ``positions=`` (int ``(seq,)``) in ``apply`` to encode absolute
positions other than ``0 .. seq-1``, as a decoder with a key/value cache needs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fnnet._src import checks, errors
from fnnet._src.layer import Layer


def _base(base, kind: str) -> float:
    if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 1:
        errors.fail(kind, f"base must be a number greater than 1, got {base!r}")
    return float(base)


def _check_floating(kind: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        errors.fail(
            kind, f"expected a floating input, got dtype {x.dtype} (input shape {tuple(x.shape)})"
        )


def _positions(kind: str, positions, seq: int) -> jax.Array:
    """``0 .. seq-1`` by default; otherwise checks the caller's ``(seq,)`` int positions."""
    if positions is None:
        return jnp.arange(seq, dtype=jnp.int32)
    positions = jnp.asarray(positions)
    if positions.shape != (seq,) or not jnp.issubdtype(positions.dtype, jnp.integer):
        errors.fail(
            kind,
            f"expected integer positions of shape ({seq},), got "
            f"{positions.dtype} {tuple(positions.shape)}",
        )
    return positions


def _compute_dtype(dtype) -> jnp.dtype:
    # Angles reach max_len radians; half precision would lose the phase at long range.
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def _inverse_frequencies(pairs: int, base: float, dtype) -> jax.Array:
    """``base ** (-i / pairs)`` for ``i = 0 .. pairs-1``: wavelengths from 2*pi up to ~base."""
    return jnp.power(jnp.array(base, dtype), -jnp.arange(pairs, dtype=dtype) / pairs)


# --- Sinusoidal ------------------------------------------------------------------


def sinusoidal_table(positions: jax.Array, features: int, *, base: float = 10000.0) -> jax.Array:
    """The sinusoidal encoding of Vaswani et al. at ``positions``, in float32.

    Interleaved as in the paper: ``PE[p, 2i] = sin(p / base**(2i / features))`` and
    ``PE[p, 2i + 1] = cos(p / base**(2i / features))``.

    Args:
      positions: integer positions ``(seq,)``.
      features: even encoding size.
      base: the longest wavelength is ``2 * pi * base``.

    Returns:
      ``(seq, features)`` float32.
    """
    inv_freq = _inverse_frequencies(features // 2, base, jnp.float32)  # (features/2,)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (seq, features/2)
    # Stacking on a new last axis then merging it interleaves sin and cos.
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(-1, features)


def _check_sequence(kind: str, shape, max_len: int | None) -> None:
    checks.sequence(kind, jax.ShapeDtypeStruct(tuple(shape), jnp.float32), max_len=max_len)


def sinusoidal_position(*, max_len: int | None = None, base: float = 10000.0) -> Layer:
    """Adds the fixed sinusoidal position table of Vaswani et al. (2017).

    Parameter-free; see :func:`sinusoidal_table` for the formula.

    Args:
      max_len: if given, longer sequences are an error (the table itself has no limit).
      base: the longest wavelength is ``2 * pi * base``.

    Input: ``(seq, features)`` with ``features`` even; ``apply`` also takes
    ``positions=`` (int ``(seq,)``, default ``0 .. seq-1``).
    Output: ``(seq, features)``, the input plus the table.
    """
    kind = "sinusoidal_position"
    if max_len is not None:
        errors.positive_int(max_len, kind, "max_len")
    base = _base(base, kind)

    def check(x):
        _check_sequence(kind, x.shape, max_len)
        if x.shape[1] % 2:
            errors.fail(
                kind,
                f"expected an even number of features, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})",
            )

    def init(key, x):
        check(x)
        return {}

    def apply(params, x, *, key=None, train=False, positions=None):
        del params, key, train
        check(x)
        _check_floating(kind, x)
        pos = _positions(kind, positions, x.shape[0])
        return x + sinusoidal_table(pos, x.shape[1], base=base).astype(x.dtype)

    return Layer(init, apply, kind)


# --- Learned ---------------------------------------------------------------------


def learned_position(
    max_len: int, *, init: Callable | None = None, param_dtype=jnp.float32
) -> Layer:
    """Adds a learned vector for each position ``0 .. max_len-1``.

    Args:
      max_len: the longest sequence.
      init: ``init(key, shape, dtype)`` for the table (default normal with
        standard deviation 0.02, as GPT-2).
      param_dtype: dtype of the table.

    Input: ``(seq, features)`` with ``seq <= max_len``; ``apply`` also takes
    ``positions=`` (int ``(seq,)``, default ``0 .. seq-1``; positions outside
    ``[0, max_len)`` give NaN).
    Output: ``(seq, features)``.
    Params: ``{"table": (max_len, features)}``.
    """
    kind = "learned_position"
    errors.positive_int(max_len, kind, "max_len")
    init_fn = jax.nn.initializers.normal(stddev=0.02) if init is None else init

    def init_(key, x):
        _check_sequence(kind, x.shape, max_len)
        return {"table": init_fn(key, (max_len, x.shape[1]), param_dtype)}

    def apply(params, x, *, key=None, train=False, positions=None):
        del key, train
        table = params["table"]  # (max_len, features)
        _check_sequence(kind, x.shape, table.shape[0])
        _check_floating(kind, x)
        if x.shape[1] != table.shape[1]:
            errors.fail(
                kind,
                f"expected input with last dimension {table.shape[1]}, got "
                f"{x.shape[1]} (input shape {tuple(x.shape)})",
            )
        if positions is None:
            rows = table[: x.shape[0]]
        else:
            pos = _positions(kind, positions, x.shape[0])
            # A position past the table is a bug in the caller's cache bookkeeping: NaN, not clamp.
            pos = jnp.where(pos < 0, jnp.array(table.shape[0], pos.dtype), pos)
            rows = jnp.take(table, pos, axis=0, mode="fill")
        return x + rows.astype(x.dtype)  # (seq, features)

    return Layer(init_, apply, kind)


# --- Rotary ----------------------------------------------------------------------


def apply_rotary(x: jax.Array, positions: jax.Array | None, *, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (RoPE, Su et al. 2021) at absolute ``positions``.

    Uses the "rotate half" convention of GPT-NeoX and Hugging Face LLaMA: feature
    ``i`` is paired with feature ``i + head_dim/2`` (not with its neighbour
    ``i + 1`` as in the paper), and the pair is rotated by the angle
    ``p * base**(-2i / head_dim)``::

        y[..., :h] = x[..., :h] * cos - x[..., h:] * sin
        y[..., h:] = x[..., h:] * cos + x[..., :h] * sin      (h = head_dim / 2)

    Both conventions give scores ``<rope(q, m), rope(k, n)>`` that depend only on
    ``m - n``; they differ by a fixed permutation of features, so weights trained
    with one need their projections permuted to use the other.

    Args:
      x: queries or keys ``(seq, heads, head_dim)`` or ``(seq, head_dim)``, with
        ``head_dim`` even and a floating dtype.
      positions: integer positions ``(seq,)``, or None for ``0 .. seq-1``.
      base: frequency base (10000 in the paper).

    Returns:
      The rotated ``x``, same shape and dtype.
    """
    kind = "rotary"
    base = _base(base, kind)
    if x.ndim not in (2, 3):
        errors.fail(
            kind,
            f"expected (seq, heads, head_dim) or (seq, head_dim), got shape "
            f"{tuple(x.shape)} (batch with jax.vmap)",
        )
    _check_floating(kind, x)
    head_dim = x.shape[-1]
    if head_dim % 2:
        errors.fail(
            kind, f"expected an even head_dim, got {head_dim} (input shape {tuple(x.shape)})"
        )
    positions = _positions(kind, positions, x.shape[0])
    dtype = _compute_dtype(x.dtype)
    half = head_dim // 2
    inv_freq = _inverse_frequencies(half, base, dtype)  # (head_dim/2,)
    angles = positions.astype(dtype)[:, None] * inv_freq[None, :]  # (seq, head_dim/2)
    angles = angles.reshape(x.shape[0], *(1,) * (x.ndim - 2), half)  # broadcast over heads
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(dtype), x[..., half:].astype(dtype)
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return y.astype(x.dtype)


def rotary(*, base: float = 10000.0) -> Layer:
    """Rotary position embedding (RoPE) as a parameter-free layer.

    See :func:`apply_rotary` for the convention. Apply it to queries and keys
    (not values) after splitting heads.

    Args:
      base: frequency base (10000 in the paper).

    Input: ``(seq, heads, head_dim)`` or ``(seq, head_dim)`` with ``head_dim`` even;
    ``apply`` also takes ``positions=`` (int ``(seq,)``, default ``0 .. seq-1``).
    Output: same shape and dtype.
    """
    kind = "rotary"
    base = _base(base, kind)

    def init(key, x):
        if len(x.shape) not in (2, 3) or x.shape[-1] % 2:
            errors.fail(
                kind,
                f"expected (seq, heads, head_dim) or (seq, head_dim) with "
                f"head_dim even, got shape {tuple(x.shape)}",
            )
        return {}

    def apply(params, x, *, key=None, train=False, positions=None):
        del params, key, train
        return apply_rotary(x, positions, base=base)

    return Layer(init, apply, kind)
