"""Evaluation over a whole dataset in fixed-size batches, compiled once.

The dataset is padded to a whole number of batches by repeating its last
example, and a mask drops the padding from every sum, so:

* every real example counts exactly once, whatever ``N % batch_size`` is;
* every batch has the same shape, so one program is compiled for a given
  model, metrics and batch size, and reused for every dataset size ``N``.

That second point is why the batches are a Python loop over one jitted batch
function rather than a ``jax.lax.scan`` over all of them: the length of a scan
is part of its program, so a scan would compile anew for every number of
batches. The data still stays on the device: it is moved there (and padded)
once, each batch is a device-side slice, the per-batch sums stay on the device,
and only the final sums come back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnnet._src.layer import Layer
from fnnet.train._inputs import check_params, split_inputs
from fnnet.train._precision import Policy, apply_with_policy

MetricFn = Callable[[Any, Any], jax.Array]


class EvaluationError(ValueError):
    """``evaluate`` was called with a dataset, batch size or metric it cannot use."""


def _batch_outputs(model: Layer, policy: Policy | None, params: Any, state: Any, xs: Any) -> Any:
    """The model's output for each example of one batch (leading axis ``batch``)."""

    def forward(x):
        positional, inputs = split_inputs(model, x)
        if policy is None:
            return model.apply_with_state(
                params, state, positional, key=None, train=False, **inputs
            )[0]
        return apply_with_policy(
            model, policy, params, state, positional, key=None, train=False, **inputs
        )[0]

    return jax.vmap(forward)(xs)


def _batch_sums(
    model: Layer,
    metric_fns: tuple[tuple[str, MetricFn], ...],
    policy: Policy | None,
    params: Any,
    state: Any,
    xs: Any,
    ys: Any,
    mask: jax.Array,
) -> dict[str, jax.Array]:
    """The sum of each metric over the real examples of one batch.

    ``xs``, ``ys``: leading axis ``batch``; ``mask``: ``(batch,)`` bool, False on padding.
    Returns ``{name: ()}`` float32 sums.
    """

    outputs = _batch_outputs(model, policy, params, state, xs)  # (batch, ...)
    sums = {}
    for name, fn in metric_fns:
        values = jax.vmap(fn)(outputs, ys)  # (batch,)
        if values.shape != mask.shape:
            raise EvaluationError(
                f"evaluate: metric {name!r} must return a scalar per example, "
                f"got shape {tuple(values.shape[1:])}"
            )
        # where, not a product with the mask: a NaN from a padded example must not leak.
        values = jnp.where(mask, values.astype(jnp.float32), 0.0)
        sums[name] = jnp.sum(values)
    return sums


# One module-level jit, with the model, metrics and policy static: its cache is
# keyed on them and on the batch's shapes, so calls with any N reuse one program.
_batch_sums_jit = jax.jit(_batch_sums, static_argnums=(0, 1, 2))


def _check_batch_size(batch_size: Any, where: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise EvaluationError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")


def _examples(tree: Any, where: str, name: str, empty: str) -> int:
    """N, the leading axis every array of ``tree`` shares (``name`` and ``empty``
    say what ``tree`` is in the errors)."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
    if not sizes or None in sizes or len(sizes) != 1:
        raise EvaluationError(
            f"{where}: every array of {name} needs the same leading example axis N, "
            f"got shapes {jax.tree.map(np.shape, tree)}"
        )
    (n,) = sizes
    if n == 0:
        raise EvaluationError(f"{where}: {empty} is empty (N = 0)")
    return n


def _size(dataset: Any) -> int:
    if not isinstance(dataset, tuple | list) or len(dataset) != 2:
        raise EvaluationError(
            f"evaluate: dataset must be a pair (x, y) of arrays with a leading example "
            f"axis, got {type(dataset).__name__}"
        )
    return _examples(tuple(dataset), "evaluate", "(x, y)", "the dataset")


def _pad(a: Any, total: int) -> jax.Array:
    """``a`` on the device, its last example repeated until it has ``total``."""
    a = jnp.asarray(a)
    extra = total - a.shape[0]
    if extra == 0:
        return a
    return jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1), mode="edge")


def evaluate(
    model: Layer,
    params: Any,
    state: Any,
    dataset: tuple[Any, Any],
    metric_fns: Mapping[str, MetricFn],
    *,
    batch_size: int,
    policy: Policy | None = None,
) -> dict[str, float]:
    """The mean of each metric over every example of ``dataset``, in inference mode.

    The model runs with ``train=False`` (dropout off, BatchNorm on its running
    averages), one example at a time under ``jax.vmap``. The last batch is padded
    to ``batch_size`` and the padding masked out, so each real example has equal
    weight and one program serves every dataset size.

    Args:
      model: the model, stateful or not.
      params: its params.
      state: its state (``{}`` for a stateless model).
      dataset: ``(x, y)``: arrays (or pytrees of arrays) with a leading axis of
        ``N`` examples; NumPy arrays are moved to the device once.
      metric_fns: ``{name: fn}`` with ``fn(output, y) -> ()`` for **one**
        example (the losses and metrics of ``fnnet.train`` qualify). Keep the
        functions the same objects between calls, or each call compiles anew.
      batch_size: examples per batch (the last one is padded).
      policy: a mixed-precision :class:`Policy`; by default none is applied.

    Returns:
      ``{name: mean}`` as Python floats.
    """
    _check_batch_size(batch_size, "evaluate")
    if not metric_fns:
        raise EvaluationError("evaluate: metric_fns is empty; give at least one {name: fn}")
    for name, fn in metric_fns.items():
        if not isinstance(name, str) or not callable(fn):
            raise EvaluationError(
                f"evaluate: metric_fns must map names to functions fn(output, y), "
                f"got {name!r}: {fn!r}"
            )
    n = _size(dataset)
    check_params(model, params, jax.tree.map(lambda a: a[0], dataset[0]), where="evaluate: params")
    num_batches = math.ceil(n / batch_size)
    total = num_batches * batch_size
    xs, ys = (jax.tree.map(lambda a: _pad(a, total), part) for part in dataset)
    mask = jnp.arange(total) < n  # (total,)
    metrics = tuple(metric_fns.items())

    per_batch = []
    for i in range(num_batches):
        # Dispatch is asynchronous: the loop queues every batch before any finishes.
        rows = slice(i * batch_size, (i + 1) * batch_size)
        batch = jax.tree.map(lambda a, rows=rows: a[rows], (xs, ys, mask))
        per_batch.append(_batch_sums_jit(model, metrics, policy, params, state, *batch))
    per_batch = jax.device_get(per_batch)
    # Sum the per-batch float32 sums in float64, so large N loses no precision.
    return {name: math.fsum(float(s[name]) for s in per_batch) / n for name, _ in metrics}


# Static model and policy, as _batch_sums_jit: one program per batch shape, any N.
_batch_outputs_jit = jax.jit(_batch_outputs, static_argnums=(0, 1))


def predict(
    model: Layer,
    params: Any,
    state: Any,
    x: Any,
    *,
    batch_size: int,
    policy: Policy | None = None,
) -> Any:
    """The model's output for every example of ``x``, in inference mode, in batches.

    As :func:`evaluate`: the model runs with ``train=False`` one example at a
    time under ``jax.vmap``, the last batch is padded to ``batch_size`` (the
    padding's outputs dropped), so one program is compiled for a model, policy
    and batch size and reused for every number of examples.

    Args:
      model: the model, stateful or not.
      params: its params (checked against the model: a missing, extra or
        mis-shaped entry is a ``ParamsError``).
      state: its state (``{}`` for a stateless model).
      x: inputs with a leading axis of ``N`` examples: an array, or a dict
        whose ``"x"`` is the positional input and whose other entries are
        keyword inputs (``{"x": tokens, "lengths": lengths}``).
      batch_size: examples per batch.
      policy: a mixed-precision :class:`Policy`; by default none is applied.

    Returns:
      The outputs stacked on a leading axis of ``N``, as NumPy arrays (one per
      leaf of the model's output).
    """
    _check_batch_size(batch_size, "predict")
    n = _examples(x, "predict", "x", "x")
    check_params(model, params, jax.tree.map(lambda a: a[0], x), where="predict: params")
    num_batches = math.ceil(n / batch_size)
    xs = jax.tree.map(lambda a: _pad(a, num_batches * batch_size), x)
    per_batch = []
    for i in range(num_batches):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        batch = jax.tree.map(lambda a, rows=rows: a[rows], xs)
        per_batch.append(_batch_outputs_jit(model, policy, params, state, batch))
    # Joined on the host: a device-side concatenate would compile once per number of batches.
    per_batch = jax.device_get(per_batch)
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *per_batch)
