"""Normalization layers: layer, RMS, group and batch normalization.

Each one standardizes activations (subtracts a mean, divides by a standard
deviation) and then applies a learned per-feature ``scale`` and ``bias``. They
differ in which numbers the statistics are taken over:

* ``layer_norm``, ``rms_norm``: the features of one position;
* ``group_norm``: every position of one example, within groups of channels;
* ``batch_norm``: the same feature across every example of the batch.

Statistics are computed in at least ``float32`` and the output has the common
dtype of input and params. Defaults for ``epsilon`` and ``momentum`` are Flax's,
so a model moved between the two gives the same numbers: ``epsilon`` is ``1e-6``
for layer, RMS and group norm and ``1e-5`` for batch norm (PyTorch uses ``1e-5``
for all four), added to the variance (or mean square) inside the square root.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.checks import compute_dtype, feature_axis
from fnnet._src.layer import Layer


def _check_params(kind: str, params: dict, x: Any) -> None:
    features = feature_axis(kind, x)
    for name, p in params.items():
        if p.shape != (features,):
            errors.fail(
                kind,
                f"expected input with last dimension {p.shape[0]} (the size of {name!r}), "
                f"got {features} (input shape {jnp.shape(x)})",
            )


def _per_feature(v: jax.Array, ndim: int) -> jax.Array:
    """``(features,)`` reshaped to broadcast against a rank-``ndim`` input.

    Explicit, because implicit rank promotion is an error in strict mode.
    """
    return jnp.reshape(v, (1,) * (ndim - 1) + v.shape)


def _output_dtype(x_dtype: Any) -> jnp.dtype:
    """Norms compute in at least float32 but hand back the input's float dtype, so a
    bfloat16 model stays bfloat16 after each norm (mixed precision relies on it)."""
    return x_dtype if jnp.issubdtype(x_dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _scale_and_shift(y: jax.Array, params: dict) -> jax.Array:
    if "scale" in params:
        y = y * _per_feature(params["scale"], y.ndim).astype(y.dtype)
    if "bias" in params:
        y = y + _per_feature(params["bias"], y.ndim).astype(y.dtype)
    return y


def _epsilon(value, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        errors.fail(kind, f"epsilon must be a positive number, got {value!r}")
    return float(value)


def _affine_params(features: int, use_scale: bool, use_bias: bool) -> dict:
    params = {}
    if use_scale:
        params["scale"] = jnp.ones((features,), jnp.float32)
    if use_bias:
        params["bias"] = jnp.zeros((features,), jnp.float32)
    return params


def layer_norm(*, epsilon: float = 1e-6, use_scale: bool = True, use_bias: bool = True) -> Layer:
    """Normalizes each position over its features (Ba et al., 2016).

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``, with the mean and
    variance taken over the last axis, so every token of a sequence is
    normalized on its own.

    Args:
      epsilon: added to the variance for stability; ``1e-6`` is Flax's default
        (PyTorch uses ``1e-5``).
      use_scale: learn a per-feature ``scale`` (initialized to ones).
      use_bias: learn a per-feature ``bias`` (initialized to zeros).

    Input: ``(..., features)``, e.g. ``(seq, features)``.
    Output: the same shape.

    Params: ``{"scale": (features,), "bias": (features,)}``.
    """
    epsilon = _epsilon(epsilon, "layer_norm")

    def init(key, x):
        del key
        return _affine_params(feature_axis("layer_norm", x), use_scale, use_bias)

    def apply(params, x, *, key=None, train=False):
        del key, train
        _check_params("layer_norm", params, x)
        out = _output_dtype(x.dtype)
        x = jnp.asarray(x).astype(compute_dtype(x.dtype, jnp.float32))
        mean = jnp.mean(x, axis=-1, keepdims=True)  # (..., 1)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return _scale_and_shift((x - mean) * jax.lax.rsqrt(var + epsilon), params).astype(out)

    return Layer(init, apply, "layer_norm")


def rms_norm(*, epsilon: float = 1e-6) -> Layer:
    """Divides each position by the root mean square of its features (Zhang & Sennrich, 2019).

    ``y = x / sqrt(mean(x ** 2) + epsilon) * scale``: layer norm without
    centring and without a bias, as in T5 and Llama.

    Args:
      epsilon: added to the mean square for stability (Flax's default).

    Input: ``(..., features)``. Output: the same shape.

    Params: ``{"scale": (features,)}``.
    """
    epsilon = _epsilon(epsilon, "rms_norm")

    def init(key, x):
        del key
        return _affine_params(feature_axis("rms_norm", x), True, False)

    def apply(params, x, *, key=None, train=False):
        del key, train
        _check_params("rms_norm", params, x)
        out = _output_dtype(x.dtype)
        x = jnp.asarray(x).astype(compute_dtype(x.dtype, jnp.float32))
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)  # (..., 1)
        return _scale_and_shift(x * jax.lax.rsqrt(mean_square + epsilon), params).astype(out)

    return Layer(init, apply, "rms_norm")


def group_norm(num_groups: int, *, epsilon: float = 1e-6) -> Layer:
    """Normalizes groups of channels over the whole example (Wu & He, 2018).

    The channels are split into ``num_groups`` groups of consecutive channels;
    each group is standardized with the mean and variance over all its channels
    at every position of the example, independently of the other examples in a
    batch. One group is layer norm over the whole example; one channel per group
    is instance norm.

    Args:
      num_groups: number of groups; must divide the number of channels.
      epsilon: added to the variance for stability (Flax's default).

    Input: ``(..., channels)``, e.g. ``(length, channels)`` or
    ``(height, width, channels)``; the example has no batch axis.
    Output: the same shape.

    Params: ``{"scale": (channels,), "bias": (channels,)}``.
    """
    errors.positive_int(num_groups, "group_norm", "num_groups")
    epsilon = _epsilon(epsilon, "group_norm")

    def _channels(x) -> int:
        channels = feature_axis("group_norm", x)
        if channels % num_groups:
            errors.fail(
                "group_norm",
                f"channels ({channels}, the last dimension of input shape {jnp.shape(x)}) "
                f"must be divisible by num_groups ({num_groups})",
            )
        return channels

    def init(key, x):
        del key
        return _affine_params(_channels(x), True, True)

    def apply(params, x, *, key=None, train=False):
        del key, train
        channels = _channels(x)
        _check_params("group_norm", params, x)
        shape = jnp.shape(x)
        out = _output_dtype(x.dtype)
        x = jnp.asarray(x).astype(compute_dtype(x.dtype, jnp.float32))
        grouped = jnp.reshape(x, (*shape[:-1], num_groups, channels // num_groups))
        # Every axis except the group axis: positions and channels within the group.
        axes = (*range(grouped.ndim - 2), grouped.ndim - 1)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)  # (1, ..., groups, 1)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        y = jnp.reshape((grouped - mean) * jax.lax.rsqrt(var + epsilon), shape)
        return _scale_and_shift(y, params).astype(out)

    return Layer(init, apply, "group_norm")


def batch_norm(*, momentum: float = 0.99, epsilon: float = 1e-5, axis_name: str = "batch") -> Layer:
    """Normalizes each feature with statistics across the batch (Ioffe & Szegedy, 2015).

    A stateful layer: besides ``params`` it carries ``state``, running averages
    of the mean and variance that are updated in training and used in evaluation.

    * ``train=True``: the mean and variance of each feature are taken over the
      example's leading axes (positions) *and* over the examples of the batch,
      which the layer reaches with ``jax.lax.pmean`` over the vmapped axis named
      ``axis_name``; so it must run under ``jax.vmap(..., axis_name=axis_name)``.
      The running averages move towards them:
      ``running = momentum * running + (1 - momentum) * batch_statistic``.
      The variance is the biased one (divided by the number of values, as Flax
      does); PyTorch's running variance uses the unbiased estimate (divided by
      one less), so running variances differ by that factor between the two.
    * ``train=False``: the running averages are used, and the state is returned
      unchanged; no batch axis is needed.

    The new state is the same for every example, so it can leave the vmap
    unbatched::

      layer = fnnet.batch_norm()
      params, state = layer.init(key, xs[0])
      step = jax.vmap(
          lambda x: layer.apply(params, state, x, train=True),
          axis_name="batch", out_axes=(0, None),
      )
      ys, state = step(xs)  # xs: (batch, features) -> ys: (batch, features)

    Args:
      momentum: decay of the running averages (Flax's default ``0.99``; this is
        ``1 - momentum`` in PyTorch's convention).
      epsilon: added to the variance for stability (Flax's default).
      axis_name: the name of the vmapped batch axis.

    Input: ``(..., features)``, e.g. ``(features,)`` or ``(length, channels)``.
    Output: the same shape.

    Params: ``{"scale": (features,), "bias": (features,)}``.
    State: ``{"mean": (features,), "var": (features,)}``, float32.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        errors.fail("batch_norm", f"momentum must be a number in [0, 1], got {momentum!r}")
    if not 0 <= momentum <= 1:
        errors.fail("batch_norm", f"momentum must be a number in [0, 1], got {momentum!r}")
    momentum = float(momentum)
    epsilon = _epsilon(epsilon, "batch_norm")

    def init(key, x):
        del key
        features = feature_axis("batch_norm", x)
        state = {
            "mean": jnp.zeros((features,), jnp.float32),
            "var": jnp.ones((features,), jnp.float32),
        }
        return _affine_params(features, True, True), state

    def _batch_statistics(x):
        positions = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=positions)  # (features,)
        mean_square = jnp.mean(jnp.square(x), axis=positions)
        try:
            mean, mean_square = jax.lax.pmean((mean, mean_square), axis_name)
        except NameError:
            errors.fail(
                "batch_norm",
                "needs batch statistics in training mode: apply it under "
                f"jax.vmap(..., axis_name={axis_name!r})",
            )
        return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)

    def apply(params, state, x, *, key=None, train=False):
        del key
        _check_params("batch_norm", {**params, **state}, x)
        out = _output_dtype(x.dtype)
        x = jnp.asarray(x).astype(compute_dtype(x.dtype, jnp.float32))
        if train:
            mean, var = _batch_statistics(x)
            # Running averages are statistics, not trained: no gradient flows into them.
            new_state = {
                name: jax.lax.stop_gradient(
                    momentum * state[name] + (1.0 - momentum) * stat.astype(state[name].dtype)
                )
                for name, stat in (("mean", mean), ("var", var))
            }
        else:
            mean, var, new_state = state["mean"], state["var"], state
        mean = _per_feature(mean, x.ndim).astype(x.dtype)
        var = _per_feature(var, x.ndim).astype(x.dtype)
        y = (x - mean) * jax.lax.rsqrt(var + epsilon)
        return _scale_and_shift(y, params).astype(out), new_state

    return Layer(init, apply, "batch_norm", stateful=True)
