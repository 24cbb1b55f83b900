"""The benchmark's baselines: each fnnet model's math written out by hand in jax.numpy.

Each ``forward(params, x)`` takes the fnnet parameter tree and a whole batch, as a
person writing the model directly in JAX would (no vmap, batch axis explicit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import fnnet


def mlp_forward(params, x):
    # (batch, 40) -> two hidden layers, the second residual -> (batch, 10)
    h = jax.nn.relu(x @ params["hidden_0"]["w"] + params["hidden_0"]["b"])
    h = h + jax.nn.relu(h @ params["hidden_1"]["w"] + params["hidden_1"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def cnn_forward(params, x):
    h = x  # (batch, length, channels)
    for i, k in enumerate((5, 3, 3)):
        del k
        p = params[f"conv_{i}"]
        h = jax.lax.conv_general_dilated(
            h, p["w"], window_strides=(2,), padding=((1, 1),),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        h = jax.nn.relu(h + p["b"])
    h = h.reshape(h.shape[0], -1)  # (batch, positions * channels)
    return h @ params["out"]["w"] + params["out"]["b"]


def _signals(rng, batch):
    return rng.standard_normal((batch, 40)).astype("float32")


def _signals_with_channel(rng, batch):
    return rng.standard_normal((batch, 40, 1)).astype("float32")


CASES = {
    "mlp (MNIST-1D, 15k params)": (
        fnnet.models.mlp(10, (100, 100), residual=True), mlp_forward, _signals,
    ),
    "cnn (MNIST-1D, 5k params)": (
        fnnet.models.cnn(10, (25, 25, 25), kernel_size=(5, 3, 3), strides=2, padding=1, pool=None),
        cnn_forward, _signals_with_channel,
    ),
}
