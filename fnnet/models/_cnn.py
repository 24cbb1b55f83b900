"""The convolutional network: convolutions that scan for local patterns, then a classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.activations import get_activation
from fnnet._src.conv import conv
from fnnet._src.dense import dense
from fnnet._src.dropout import dropout
from fnnet._src.layer import Layer, composite
from fnnet._src.normalization import batch_norm, group_norm, layer_norm
from fnnet._src.pooling import global_avg_pool, max_pool
from fnnet.models._config import records_config

_NORMS: dict[str, Callable[[], Layer]] = {
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "group_norm": lambda: group_norm(1),
}


def _per_layer(value: Any, n: int, field: str) -> list:
    """An int (or padding string) for every layer, or one value per layer."""
    if isinstance(value, (int, str)) or value is None:
        return [value] * n
    values = list(value)
    if len(values) != n:
        errors.fail("cnn", f"{field} needs one value per conv layer ({n}), got {len(values)}")
    return values


@records_config
def cnn(
    out_features: int,
    channels: Sequence[int] = (32, 64),
    *,
    kernel_size: int | Sequence[int] = 3,
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence[str | int] = "SAME",
    pool: int | None = 2,
    norm: str | None = None,
    activation: str | Callable = "relu",
    global_pool: bool = False,
    hidden: Sequence[int] = (),
    dropout_rate: float = 0.0,
    spatial_dims: int | None = None,
) -> Layer:
    """A convolutional network for 1D signals or 2D images.

    Each stage is ``conv -> [norm] -> activation -> [max pool]``; then the feature
    map is flattened, in ``(position..., channel)`` order as :func:`fnnet.flatten` does
    (or averaged over space with ``global_pool=True``), passed
    through optional hidden dense layers, and mapped to ``out_features``.

    The MNIST-1D paper's CNN is ``cnn(10, (25, 25, 25), kernel_size=(5, 3, 3),
    strides=2, padding=1, pool=None)``.

    Args:
      out_features: size of the output.
      channels: output channels of each convolution.
      kernel_size, strides, padding: one value for every convolution or one per
        convolution (padding as in ``fnnet.conv``: ``"SAME"``, ``"VALID"``, ``"CAUSAL"``
        or an int of zeros on each side).
      pool: max-pooling window (and stride) after each stage, or None.
      norm: None, ``"batch_norm"`` (makes the model stateful), ``"layer_norm"`` or
        ``"group_norm"``.
      activation: a name from ``fnnet.activation`` or a function.
      global_pool: average over space instead of flattening.
      hidden: widths of dense layers between the features and the output.
      dropout_rate: dropout before each dense layer while training.
      spatial_dims: 1 or 2; by default the example's rank minus one (channels
        last). An example with exactly ``spatial_dims`` axes gets a channel axis.

    Input: ``(length, channels)`` or ``(length,)`` for 1D; ``(height, width,
    channels)`` for 2D (``(height, width)`` with ``spatial_dims=2``).
    Output: ``(out_features,)``.

    Params: ``{"conv_0": {"w", "b"}, ["norm_0": ...], ..., ["hidden_0": ...], "out": ...}``.
    """
    errors.positive_int(out_features, "cnn", "out_features")
    for i, c in enumerate(channels):
        errors.positive_int(c, "cnn", f"channels[{i}]")
    if not channels:
        errors.fail("cnn", "needs at least one convolution in channels")
    if norm is not None and norm not in _NORMS:
        errors.fail("cnn", f"norm must be None or one of {sorted(_NORMS)}, got {norm!r}")
    if spatial_dims not in (None, 1, 2, 3):
        errors.fail("cnn", f"spatial_dims must be 1, 2, 3 or None, got {spatial_dims!r}")
    n = len(channels)
    kernels = _per_layer(kernel_size, n, "kernel_size")
    stride_list = _per_layer(strides, n, "strides")
    paddings = _per_layer(padding, n, "padding")
    act = get_activation(activation)
    drop = dropout(dropout_rate)

    def dropped(call, name, h):  # no dropout child at all when the rate is 0
        return call(name, drop, h) if dropout_rate else h

    layers: dict[str, Layer] = {}
    for i in range(n):
        with errors.scope(f"conv_{i}"):
            layers[f"conv_{i}"] = conv(
                channels[i], kernels[i], strides=stride_list[i], padding=paddings[i]
            )
        if norm is not None:
            layers[f"norm_{i}"] = _NORMS[norm]()
    pooling = max_pool(pool) if pool is not None else None
    to_vector = global_avg_pool() if global_pool else None
    heads = {f"hidden_{i}": dense(w) for i, w in enumerate(hidden)}
    heads["out"] = dense(out_features)

    def _with_channels(x):
        rank = jnp.ndim(x)
        dims = spatial_dims if spatial_dims is not None else max(rank - 1, 1)
        if rank == dims:
            return jnp.expand_dims(x, -1)
        if rank != dims + 1:
            errors.fail(
                "cnn",
                f"expected an example with {dims} spatial axes and a channel "
                f"axis, got shape {jnp.shape(x)}",
            )
        return x

    def forward(call, x):
        h = _with_channels(x)  # (*spatial, channels)
        for i in range(n):
            h = call(f"conv_{i}", layers[f"conv_{i}"], h)
            if norm is not None:
                h = call(f"norm_{i}", layers[f"norm_{i}"], h)
            h = act(h)
            if pooling is not None:
                h = call(f"pool_{i}", pooling, h)
        # Average over space, (channels,); or flatten, (positions * channels,) in (h, w, c) order.
        pooled = to_vector is not None
        h = call("global_pool", to_vector, h) if pooled else jnp.reshape(h, (-1,))
        for name, layer in heads.items():
            h = call(name, layer, dropped(call, f"drop_{name}", h))
            if name != "out":
                h = act(h)
        return h  # (out_features,)

    return composite(forward, "cnn", stateful=norm == "batch_norm")
