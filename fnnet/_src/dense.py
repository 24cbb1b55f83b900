"""Fully connected layers: ``dense`` (many outputs) and ``neuron`` (one output)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.activations import get_activation
from fnnet._src.checks import compute_dtype, feature_axis
from fnnet._src.layer import Layer


def dense(
    features: int,
    *,
    use_bias: bool = True,
    w_init: Callable | None = None,
    b_init: Callable | None = None,
    param_dtype: Any = jnp.float32,
) -> Layer:
    """A fully connected layer: ``y = x @ w + b``.

    Every output is a weighted sum of all inputs plus a bias. The matrix product
    acts on the last axis only, so the same layer maps one vector or every token
    of a sequence.

    Args:
      features: number of outputs.
      use_bias: add the bias ``b``.
      w_init: initializer ``init(key, shape, dtype)`` for ``w`` (default
        ``jax.nn.initializers.lecun_normal()``, variance ``1 / in_features``).
      b_init: initializer for ``b`` (default zeros).
      param_dtype: dtype of the parameters.

    Input: ``(..., in_features)``, e.g. ``(features,)`` or ``(seq, features)``.
    Output: ``(..., features)``, in the common dtype of input and params.

    Params: ``{"w": (in_features, features), "b": (features,)}`` (no ``"b"`` when
    ``use_bias=False``).

    Example:
      >>> layer = fnnet.dense(3)
      >>> params = layer.init(jax.random.key(0), jnp.zeros(5))
      >>> jax.tree.map(jnp.shape, params)
      {'b': (3,), 'w': (5, 3)}
    """
    errors.positive_int(features, "dense", "features")
    w_init = w_init or jax.nn.initializers.lecun_normal()
    b_init = b_init or jax.nn.initializers.zeros

    def init(key, x):
        in_features = feature_axis("dense", x)
        w_key, b_key = jax.random.split(key)
        params = {"w": w_init(w_key, (in_features, features), param_dtype)}
        if use_bias:
            params["b"] = b_init(b_key, (features,), param_dtype)
        return params

    def apply(params, x, *, key=None, train=False):
        del key, train
        w = params["w"]
        in_features = feature_axis("dense", x)
        if w.shape[-1] != features:
            errors.fail(
                "dense",
                f"params 'w' has shape {w.shape}, but this layer has {features} features; "
                "were the params made by a different model?",
            )
        if in_features != w.shape[0]:
            errors.fail(
                "dense",
                f"expected input with last dimension {w.shape[0]}, got {in_features} "
                f"(input shape {jnp.shape(x)})",
            )
        dtype = compute_dtype(x.dtype, w.dtype)
        y = jnp.asarray(x).astype(dtype) @ w.astype(dtype)  # (..., features)
        if use_bias:
            # An explicit reshape, since implicit rank promotion is an error in strict mode.
            b = jnp.reshape(params["b"], (1,) * (y.ndim - 1) + (features,))
            y = y + b.astype(dtype)
        return y

    return Layer(init, apply, "dense")


def neuron(activation: str | Callable = jax.nn.sigmoid, *, param_dtype: Any = jnp.float32) -> Layer:
    """A single artificial neuron: ``y = activation(sum_i w_i * x_i + b)``.

    This is the building block of the explainer's story: the neuron receives its
    inputs, multiplies each by a weight that says how much that input matters,
    adds everything up together with a bias that shifts how easily it fires, and
    passes the sum through an activation function; the result is its one output.
    Learning means adjusting the weights and the bias. A :func:`dense` layer is
    many such neurons side by side.

    Args:
      activation: a function, or a name accepted by :func:`fnnet.get_activation`
        (default: the logistic sigmoid, so the output is in (0, 1)).
      param_dtype: dtype of the parameters.

    Input: ``(features,)``.
    Output: ``()``, a scalar.

    Params: ``{"w": (features,), "b": ()}``.
    """
    act = get_activation(activation)

    def _features(x) -> int:
        shape = jnp.shape(x)
        if len(shape) != 1:
            errors.fail("neuron", f"expected input of shape (features,), got shape {shape}")
        return shape[0]

    def init(key, x):
        features = _features(x)
        # lecun_normal reads fan-in from a matrix; one column of one is this neuron.
        w = jax.nn.initializers.lecun_normal()(key, (features, 1), param_dtype)
        return {"w": w[:, 0], "b": jnp.zeros((), param_dtype)}

    def apply(params, x, *, key=None, train=False):
        del key, train
        w, b = params["w"], params["b"]
        features = _features(x)
        if features != w.shape[0]:
            errors.fail("neuron", f"expected {w.shape[0]} input features, got {features}")
        dtype = compute_dtype(x.dtype, w.dtype)
        z = jnp.dot(jnp.asarray(x).astype(dtype), w.astype(dtype)) + b.astype(dtype)  # ()
        return act(z)

    return Layer(init, apply, "neuron")
