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
    """The bits of ``x`` as uint32 words, with a trailing axis of the words per element."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):  # the real and the imaginary parts
        parts = _words(xp, xp.stack([x.real, x.imag], axis=-1))
        return parts.reshape(*x.shape, -1)
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


def _nonfinite(xp: Any, x: Any) -> tuple[Any, Any]:
    if not jnp.issubdtype(x.dtype, jnp.inexact):  # jnp knows bfloat16 is one
        return xp.int32(0), xp.int32(0)
    return xp.sum(xp.isnan(x), dtype=xp.int32), xp.sum(xp.isinf(x), dtype=xp.int32)


def _maybe_finite(x: jax.Array) -> jax.Array:
    """False when some element of ``x`` is NaN or infinite, or when its sum overflowed
    (``survey`` then counts). NaN and infinity survive any order of addition, across
    devices too (a sharded max drops NaN on the CPU), and a sum of ``x`` itself makes
    no array its size (counting would reduce an int32 flag per element, which XLA
    on the CPU writes out in full)."""
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.bool_(True)
    return jnp.isfinite(lax.reduce(x, jnp.zeros((), x.dtype), lax.add, tuple(range(x.ndim))))


@jax.jit
def _on_device(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return digest(jnp, x), _maybe_finite(x)


@jax.jit
def _count_on_device(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _nonfinite(jnp, x)


def _read(value: jax.Array) -> int:
    return int(np.asarray(value.addressable_data(0)))  # replicated: every process has it


def survey(leaves: list[Any]) -> list[tuple[int, int, int]]:
    """``(digest, NaN count, infinity count)`` of each leaf: JAX arrays on their devices,
    the rest on the host. In a run over several processes every process must call
    it with the same leaves, as every process saves and restores.

    One program per leaf, each read before the next starts, so the temporaries XLA
    makes are bounded by the largest leaf rather than the whole state: on the CPU
    it writes out the input of every reduction (a mixed word per element), and one
    program over a whole state held 1.5 times the state's share of each process.
    Programs are compiled once per shape and sharding, not once per state.
    """
    out = []
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            digest_value, finite = _on_device(leaf)
            counts = (0, 0) if _read(finite) else map(_read, _count_on_device(leaf))
            out.append((_read(digest_value), *counts))
        else:
            host = np.asarray(leaf)
            out.append(tuple(int(v) for v in (digest(np, host), *_nonfinite(np, host))))
    return out
