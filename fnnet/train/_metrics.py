"""Metrics for one example: a model output and its label in, a scalar out.

Like the losses, every metric sees **one example** and the engine (or
:func:`fnnet.train.evaluate`) vmaps and averages it. Labels are class ids or
one-hot / probability vectors, checked as the losses check them. With
per-sequence logits ``(seq, classes)`` and labels ``(seq,)`` the metric is the
mean over the steps (the fraction of tokens predicted right).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnnet.train._losses import LabelError, class_label

Array = jax.Array


def _class_ids(fn: str, logits: Array, label: Any) -> Array:
    """The label as class ids, shape ``(...)``; a distribution's id is its argmax."""
    label, is_integer = class_label(fn, logits, label)
    # int32 like argmax's and top_k's indices: strict promotion would reject uint8 ids.
    return label.astype(jnp.int32) if is_integer else jnp.argmax(label, axis=-1)


def accuracy(logits: Array, label: Any) -> Array:
    """1.0 when the highest logit is the label's class, else 0.0.

    Ties go to the lowest class index (``jnp.argmax``). A class id outside
    ``[0, classes)`` is never matched.

    Args:
      logits: ``(classes,)``, or ``(seq, classes)`` per step.
      label: a class id of shape ``()`` (``(seq,)`` per step), or a one-hot /
        probability vector with the logits' shape (its argmax is the class).

    Returns:
      ``()`` float32: 0 or 1, or for per-step logits the fraction of steps right.
    """
    ids = _class_ids("accuracy", logits, label)
    correct = jnp.argmax(jnp.asarray(logits), axis=-1) == ids  # (...)
    return jnp.mean(correct.astype(jnp.float32))


def top_k_accuracy(logits: Array, label: Any, k: int) -> Array:
    """1.0 when the label's class is among the ``k`` highest logits, else 0.0.

    Ties are broken as ``jax.lax.top_k`` breaks them, by lower index first, so
    ``top_k_accuracy(logits, label, 1)`` equals ``accuracy(logits, label)``.

    Args:
      logits: ``(classes,)``, or ``(seq, classes)`` per step.
      label: as for :func:`accuracy`.
      k: how many guesses count, ``1 <= k <= classes``.

    Returns:
      ``()`` float32: 0 or 1, or for per-step logits the fraction of steps right.
    """
    fn = "top_k_accuracy"
    ids = _class_ids(fn, logits, label)
    logits = jnp.asarray(logits)
    classes = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classes:
        raise LabelError(fn, f"k must be an integer in [1, classes={classes}], got {k!r}")
    _, top = jax.lax.top_k(logits, k)  # (..., k)
    correct = jnp.any(top == jnp.expand_dims(ids, -1), axis=-1)  # (...)
    return jnp.mean(correct.astype(jnp.float32))
