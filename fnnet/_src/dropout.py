"""Dropout: randomly zeroing activations while training."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.layer import Layer


def dropout(rate: float) -> Layer:
    """Zeroes each element with probability ``rate`` while training.

    The kept elements are scaled by ``1 / (1 - rate)`` ("inverted" dropout), so
    the expected value of every element is unchanged and evaluation needs no
    rescaling: with ``train=False`` the layer is the identity.

    Args:
      rate: the probability of *dropping* an element, in ``[0, 1)``. ``0`` makes
        the layer the identity, in training too.

    Input: any shape. Output: the same shape and dtype.

    Training mode draws a fresh mask from ``key``, which is then required::

      y = layer.apply({}, x, key=jax.random.key(0), train=True)

    Batch with ``jax.vmap`` over a batch of keys too (``jax.random.split(key,
    batch)``), or the examples share one mask.
    """
    rate = errors.rate(rate, "dropout")
    keep = 1.0 - rate

    def init(key, x):
        del key, x
        return {}

    def apply(params, x, *, key=None, train=False):
        del params
        if not train or rate == 0.0:
            return x
        if key is None:
            errors.fail(
                "dropout", "needs a PRNG key in training mode: call apply(..., key=key, train=True)"
            )
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            errors.fail("dropout", f"expected a floating-point input, got dtype {x.dtype}")
        mask = jax.random.bernoulli(key, keep, jnp.shape(x))
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    return Layer(init, apply, "dropout")
