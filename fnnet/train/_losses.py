"""Losses for one example: a model output and its label in, a scalar out.

Every loss here sees **one example**, like a layer does; the training engine
vmaps it over the batch and averages. The arithmetic is optax's: these
functions add the shape checks that turn a mislabelled batch into an error
that says what was expected, the per-sequence convention, and computation in
at least ``float32`` so a ``bfloat16`` model output still gets an accurate loss.

Per-sequence outputs: a language model or a tagger predicts at every step, so
its logits are ``(seq, classes)`` and its label ``(seq,)`` class ids (or
``(seq, classes)`` probabilities). The loss is then the mean over the steps,
which gives every step of a sequence equal weight. More generally any leading
axes ``(...)`` before ``classes`` are averaged over.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class LabelError(ValueError):
    """A loss or metric got a label that does not fit the model output.

    Attributes:
      fn: the loss or metric that was called (``"softmax_cross_entropy"``, ...).
      message: what was expected and what came instead.
    """

    def __init__(self, fn: str, message: str):
        self.fn = fn
        self.message = message
        super().__init__(f"{fn}: {message}")

    def __reduce__(self):
        return (type(self), (self.fn, self.message))


def at_least_float32(x: Array) -> Array:
    """``x`` as a float in at least single precision (bfloat16 logits become float32).

    Losses are sums of many small terms and logs of probabilities near one;
    bfloat16's 8 bits of mantissa are too few for either.
    """
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.promote_types(x.dtype, jnp.float32)
    return x.astype(dtype)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _check_logits(fn: str, logits: Array) -> None:
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise LabelError(fn, f"expected floating-point logits, got dtype {logits.dtype}")
    if logits.ndim == 0:
        raise LabelError(fn, "expected logits with a classes axis, (classes,), got a scalar")


def class_label(fn: str, logits: Array, label: Any) -> tuple[Array, bool]:
    """Checks ``label`` against ``logits`` of shape ``(..., classes)``.

    Returns ``(label, is_integer)``: an integer label holds class ids, shape
    ``(...)``; any other label is one-hot or probabilities, shape ``(..., classes)``.
    """
    logits = jnp.asarray(logits)
    label = jnp.asarray(label)
    _check_logits(fn, logits)
    if jnp.issubdtype(label.dtype, jnp.integer):
        if label.shape != logits.shape[:-1]:
            hint = ""
            if logits.ndim == 2 and label.ndim == 0:
                hint = f"; per-step logits need one label per step, shape {logits.shape[:-1]}"
            raise LabelError(
                fn,
                f"an integer class label of shape {_shape(label)} needs logits of shape "
                f"{_shape(label) + ('classes',)}, got logits of shape {_shape(logits)}{hint}",
            )
        return label, True
    if label.shape != logits.shape:
        raise LabelError(
            fn,
            f"a one-hot or probability label must have the logits' shape {_shape(logits)}, "
            f"got shape {_shape(label)} (an integer label of class ids would have shape "
            f"{_shape(logits)[:-1]})",
        )
    return label, False


def softmax_cross_entropy(logits: Array, label: Any, *, label_smoothing: float = 0.0) -> Array:
    """Cross entropy between ``softmax(logits)`` and the label's distribution.

    ``-sum_c q_c * log_softmax(logits)_c`` with ``q`` the one-hot (or given)
    target distribution. With label smoothing ``a`` (Szegedy et al., 2016,
    "Rethinking the Inception Architecture"), ``q`` becomes
    ``(1 - a) * q + a / classes``: the model is asked for ``1 - a + a / classes``
    on the true class instead of certainty.

    Args:
      logits: ``(classes,)``, or ``(seq, classes)`` for a prediction per step
        (any leading axes are averaged over).
      label: the class id, an integer of shape ``()`` (``(seq,)`` per step), or a
        one-hot / probability vector with the logits' shape.
      label_smoothing: ``a`` in ``[0, 1)``.

    Returns:
      ``()`` float32 (float64 for float64 logits). A class id outside
      ``[0, classes)`` gives NaN (inside ``jit`` it cannot raise), which the
      training engine reports as a non-finite loss instead of training on a
      wrong class.
    """
    fn = "softmax_cross_entropy"
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise LabelError(fn, f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if not 0 <= label_smoothing < 1:
        raise LabelError(fn, f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    label, is_integer = class_label(fn, logits, label)
    logits = at_least_float32(jnp.asarray(logits))
    classes = logits.shape[-1]
    if is_integer:
        valid = (label >= 0) & (label < classes)  # (...)
        if label_smoothing == 0:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        else:
            q = jax.nn.one_hot(label, classes, dtype=logits.dtype)  # (..., classes)
            q = optax.smooth_labels(q, label_smoothing)
            loss = optax.softmax_cross_entropy(logits, q)
        loss = jnp.where(valid, loss, jnp.nan)
    else:
        q = label.astype(logits.dtype)
        if label_smoothing:
            q = optax.smooth_labels(q, label_smoothing)
        loss = optax.softmax_cross_entropy(logits, q)  # (...)
    return jnp.mean(loss)


def _same_shape(fn: str, output: Array, target: Array, names: tuple[str, str]) -> None:
    """Raises unless ``target`` has ``output``'s shape; ``names`` name the two in the message."""
    if output.shape != target.shape:
        raise LabelError(
            fn,
            f"expected a {names[1]} of shape {_shape(output)} (the shape of the {names[0]}), "
            f"got shape {_shape(target)}",
        )


def binary_cross_entropy(logits: Array, label: Any) -> Array:
    """Cross entropy of independent yes/no predictions, from logits.

    ``-(y * log sigmoid(z) + (1 - y) * log sigmoid(-z))``, computed without ever
    forming ``sigmoid(z)`` (so large ``|z|`` is exact), averaged over elements.

    Args:
      logits: any shape: ``()`` for one binary decision, ``(labels,)`` for
        multi-label classification, ``(seq,)`` per step.
      label: 0/1 (or probabilities in ``[0, 1]``), bool, int or float, with the
        logits' shape.

    Returns:
      ``()``, the mean over elements, float32 (float64 for float64 logits).
    """
    fn = "binary_cross_entropy"
    logits = jnp.asarray(logits)
    label = jnp.asarray(label)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise LabelError(fn, f"expected floating-point logits, got dtype {logits.dtype}")
    _same_shape(fn, logits, label, ("logits", "label"))
    logits = at_least_float32(logits)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, label.astype(logits.dtype)))


def mean_squared_error(prediction: Array, target: Any) -> Array:
    """The mean over elements of ``(prediction - target) ** 2``.

    Args:
      prediction: any shape, e.g. ``(outputs,)`` or ``(seq, outputs)``.
      target: the prediction's shape; not broadcast, since a ``(n,)`` target
        against a ``(n, 1)`` prediction would silently compare every pair.

    Returns:
      ``()``, float32 (float64 for float64 predictions).
    """
    fn = "mean_squared_error"
    prediction = jnp.asarray(prediction)
    target = jnp.asarray(target)
    if not jnp.issubdtype(prediction.dtype, jnp.floating):
        raise LabelError(fn, f"expected a floating-point prediction, got dtype {prediction.dtype}")
    _same_shape(fn, prediction, target, ("prediction", "target"))
    prediction = at_least_float32(prediction)
    return jnp.mean(optax.squared_error(prediction, target.astype(prediction.dtype)))
