"""What a checkpoint verifies of its arrays: a content digest that ignores sharding.

The digest of an array is the sum, modulo 2**32, of one mixed word per 32 bits of
each element, each mixed with the element's position in the whole array::

    digest(x) = sum_i fmix(word_i ^ (i * 0x9E3779B1))          (uint32 arithmetic)

A sum does not care which device holds which element, so the same digest comes out
of a state split over 8 devices, over 2 processes, or held whole on the host, and
each device sums only the elements it holds (XLA adds the partial sums up). The
mixer is murmur3's finaliser, a bijection, so changing any one element always
changes the digest; several changes cancel with odds of about 2**-32.

The same function runs under NumPy (host arrays) and under ``jax.jit`` (device
arrays of any sharding); ``tests/test_train_checkpoint.py`` checks they agree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _fmix(xp: Any, h: Any) -> Any:
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(xp: Any, x: Any) -> Any:
    """The bits of ``x`` as uint32 words, with a trailing axis of 1 or 2 words per element."""
    size = x.dtype.itemsize
    bits_type = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32, 8: xp.uint64}[size]
    if x.dtype == np.bool_:
        bits = x.astype(xp.uint8)
    elif xp is np:
        bits = np.ascontiguousarray(x).view(bits_type)
    else:
        bits = lax.bitcast_convert_type(x, bits_type)
    if size < 8:
        return bits.astype(xp.uint32)[..., None]
    low = (bits & xp.uint64(0xFFFFFFFF)).astype(xp.uint32)
    return xp.stack([low, (bits >> xp.uint64(32)).astype(xp.uint32)], axis=-1)


def _positions(xp: Any, shape: tuple[int, ...]) -> Any:
    """Each word's position in the whole array, in C order."""
    if xp is np:
        return np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
    # Built per axis, so under a sharding each device makes only its own part.
    out, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        out = out + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return out


def digest(xp: Any, x: Any) -> Any:
    """The digest of one array, as a uint32 scalar of ``xp`` (NumPy or jax.numpy)."""
    words = _words(xp, x)
    if words.size == 0:
        return xp.uint32(0)
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as it should here
        position = _positions(xp, words.shape)
        return xp.sum(_fmix(xp, words ^ (position * xp.uint32(0x9E3779B1))), dtype=xp.uint32)


def _finite(xp: Any, x: Any) -> Any:
    """Whether every element is finite: the largest magnitude is (NaN propagates)."""
    if not jnp.issubdtype(x.dtype, jnp.inexact) or x.size == 0:  # jnp knows bfloat16 is one
        return xp.bool_(True)
    return xp.isfinite(xp.max(xp.abs(x)))


@jax.jit
def _on_device(arrays: list[jax.Array]) -> jax.Array:
    """``(digest, finite)`` per array, as one (n, 2) array: one transfer back."""
    return jnp.stack(
        [jnp.stack([digest(jnp, x), _finite(jnp, x).astype(jnp.uint32)]) for x in arrays]
    )


def survey(leaves: list[Any]) -> list[tuple[int, bool]]:
    """``(digest, all finite)`` of each leaf: JAX arrays on their devices (one
    compiled program; in a run over several processes every process must call it,
    as every process saves and restores), the rest on the host."""
    out: list[Any] = [None] * len(leaves)
    on_device = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    if on_device:
        # The result is replicated: every process reads its own copy.
        values = np.asarray(_on_device([leaves[i] for i in on_device]).addressable_data(0))
        for i, (value, finite) in zip(on_device, values):
            out[i] = (int(value), bool(finite))
    for i, leaf in enumerate(leaves):
        if out[i] is None:
            host = np.asarray(leaf)
            out[i] = (int(digest(np, host)), bool(_finite(np, host)))
    return out


def count_nonfinite(leaf: Any) -> tuple[int, int]:
    """How many NaN and infinite values ``leaf`` holds (for the message, after
    ``survey`` found some)."""
    xp = jnp if isinstance(leaf, jax.Array) else np
    return int(xp.sum(xp.isnan(leaf))), int(xp.sum(xp.isinf(leaf)))
