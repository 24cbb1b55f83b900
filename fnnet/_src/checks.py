"""Input checks and the compute dtype, written once for every layer.

Each check fails with a :class:`fnnet.LayerError` naming the layer's kind (its path
is added by the composite it runs in).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnnet._src import errors


def compute_dtype(x_dtype: Any, param_dtype: Any) -> jnp.dtype:
    """The dtype a layer computes in: its input's and its params' common type.

    Tests (and careful users) turn on strict dtype promotion, under which even
    ``bfloat16`` and ``float32`` do not mix implicitly; the layer picks the common
    type under the standard rules and casts both operands to it explicitly, so an
    integer or ``bfloat16`` input meets ``float32`` weights without complaint.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(x_dtype, param_dtype)


def feature_axis(kind: str, x: Any) -> int:
    """The size of ``x``'s last (feature) axis; a scalar has none."""
    shape = jnp.shape(x)
    if len(shape) == 0:
        errors.fail(kind, "expected an input with a feature axis, got a scalar (shape ())")
    return shape[-1]


def sequence(kind: str, x: Any, what: str = "input", *, max_len: int | None = None) -> None:
    """``x`` is one example ``(seq, features)``, at most ``max_len`` long."""
    shape = tuple(jnp.shape(x))
    if len(shape) != 2:
        errors.fail(
            kind,
            f"expected one example of shape (seq, features) as {what}, got shape {shape}; "
            "batch with jax.vmap",
        )
    if max_len is not None and shape[0] > max_len:
        errors.fail(kind, f"sequence length {shape[0]} exceeds max_len {max_len} ({what} {shape})")
