"""Pooling and flattening of one channels-last example.

Windowed pools slide over the spatial axes of ``(*spatial, channels)`` and never
mix channels; global pools reduce every spatial axis at once. None of these
layers has parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fnnet._src import errors
from fnnet._src.conv import (
    Padding,
    check_padding,
    check_window_fits,
    expand,
    resolve_padding,
    spatial_tuple,
)
from fnnet._src.layer import Layer


def _no_params(key, x):
    del key, x
    return {}


def _window_pool(kind: str, window, strides, padding: Padding, reduce) -> Layer:
    """A parameter-free layer reducing each window with ``reduce(x, window, strides, pads)``."""
    ndim = len(window) if isinstance(window, Sequence) and not isinstance(window, str) else None
    window = spatial_tuple(window, ndim, kind, "window")
    strides = window if strides is None else spatial_tuple(strides, ndim, kind, "strides")
    padding = check_padding(padding, ndim, kind, ("SAME", "VALID"))

    def geometry(shape):
        n = ndim if ndim is not None else len(shape) - 1
        if n < 1:
            errors.fail(
                kind,
                f"expected one example (*spatial, channels) with at least one "
                f"spatial axis, got shape {tuple(shape)}",
            )
        if len(shape) != n + 1:
            errors.fail(
                kind,
                f"expected one example (*spatial, channels) with {n} spatial "
                f"axes, got shape {tuple(shape)} (batch with jax.vmap)",
            )
        w, s = expand(window, n, kind, "window"), expand(strides, n, kind, "strides")
        pads = resolve_padding(padding, shape[:-1], w, s, kind)
        check_window_fits(kind, shape[:-1], w, pads)
        return w, s, pads

    def init(key, x):
        geometry(x.shape)
        return {}

    def apply(params, x, *, key=None, train=False):
        del params, key, train
        w, s, pads = geometry(x.shape)
        # The channel axis is a window of one with stride one and no padding.
        return reduce(x, (*w, 1), (*s, 1), [*pads, (0, 0)])  # (*out_spatial, channels)

    return Layer(init, apply, kind)


def max_pool(
    window: int | Sequence[int],
    *,
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> Layer:
    """The maximum over each window, per channel.

    Args:
      window: window size, an int (same on every spatial axis, whose number comes
        from the example's rank) or one per spatial axis.
      strides: step between windows (default: ``window``, non-overlapping).
      padding: ``"VALID"``, ``"SAME"``, an int or ``(lo, hi)`` pairs per spatial axis;
        padded positions never win the maximum.

    Input: ``(*spatial, channels)``, e.g. ``(height, width, channels)``.
    Output: ``(*out_spatial, channels)``.
    """

    # The initial values are NumPy constants, not jnp arrays: under a trace a jnp
    # array is a tracer, and reduce_window then falls back to a generic reduction
    # that reverse-mode differentiation does not support.
    def reduce(x, w, s, pads):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            lowest = np.array(-np.inf, x.dtype)
        elif jnp.issubdtype(x.dtype, jnp.integer):
            lowest = np.array(jnp.iinfo(x.dtype).min, x.dtype)
        else:
            errors.fail("max_pool", f"expected a numeric input, got dtype {x.dtype}")
        return jax.lax.reduce_window(x, lowest, jax.lax.max, w, s, pads)

    return _window_pool("max_pool", window, strides, padding, reduce)


def avg_pool(
    window: int | Sequence[int],
    *,
    strides: int | Sequence[int] | None = None,
    padding: Padding = "VALID",
    count_include_pad: bool = True,
) -> Layer:
    """The mean over each window, per channel.

    Args:
      window: window size, an int (same on every spatial axis) or one per axis.
      strides: step between windows (default: ``window``, non-overlapping).
      padding: ``"VALID"``, ``"SAME"``, an int or ``(lo, hi)`` pairs per spatial axis.
      count_include_pad: divide by the full window size, counting padded zeros (as
        PyTorch and Flax do by default); if False, divide by the number of real
        inputs in each window.

    Input: ``(*spatial, channels)`` of a floating dtype.
    Output: ``(*out_spatial, channels)``.
    """

    def reduce(x, w, s, pads):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            errors.fail("avg_pool", f"expected a floating input, got dtype {x.dtype}")
        zero = np.array(0, x.dtype)
        total = jax.lax.reduce_window(x, zero, jax.lax.add, w, s, pads)
        if count_include_pad:
            return total / jnp.array(math.prod(w), x.dtype)
        # The count of real inputs depends only on shapes; XLA folds it to a constant.
        counts = jax.lax.reduce_window(jnp.ones_like(x), zero, jax.lax.add, w, s, pads)
        return total / counts

    return _window_pool("avg_pool", window, strides, padding, reduce)


def _global(kind: str, reduce) -> Layer:
    def check(shape):
        if len(shape) < 2:
            errors.fail(
                kind,
                f"expected one example (*spatial, channels) with at least one "
                f"spatial axis, got shape {tuple(shape)}",
            )

    def init(key, x):
        check(x.shape)
        return {}

    def apply(params, x, *, key=None, train=False):
        del params, key, train
        check(x.shape)
        return reduce(x, axis=tuple(range(x.ndim - 1)))  # (channels,)

    return Layer(init, apply, kind)


def global_avg_pool() -> Layer:
    """The mean over every spatial axis, per channel.

    Input: ``(*spatial, channels)``, e.g. ``(height, width, channels)``.
    Output: ``(channels,)``.
    """
    return _global("global_avg_pool", jnp.mean)


def global_max_pool() -> Layer:
    """The maximum over every spatial axis, per channel.

    Input: ``(*spatial, channels)``, e.g. ``(length, channels)``.
    Output: ``(channels,)``.
    """
    return _global("global_max_pool", jnp.max)


def flatten() -> Layer:
    """Flattens one example into a vector (batch with ``jax.vmap``, so no batch axis).

    The order is row-major over the example's own axes, so an image ``(height,
    width, channels)`` becomes ``[x[0, 0, :], x[0, 1, :], ...]``: channels vary
    fastest. (PyTorch's ``(channels, height, width)`` layout flattens channels
    slowest; weights moved across must be permuted accordingly.)

    Input: any shape ``(...)``. Output: ``(prod(...),)``.
    """

    def apply(params, x, *, key=None, train=False):
        del params, key, train
        return jnp.reshape(x, (-1,))

    return Layer(_no_params, apply, "flatten")
