"""The feedforward network: dense layers with an activation between them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.activations import get_activation
from fnnet._src.dense import dense
from fnnet._src.dropout import dropout
from fnnet._src.layer import Layer, composite
from fnnet.models._config import records_config


@records_config
def mlp(
    out_features: int,
    hidden: Sequence[int] = (128,),
    *,
    activation: str | Callable = "relu",
    residual: bool = False,
    dropout_rate: float = 0.0,
    flatten: bool = True,
    w_init: Callable | None = None,
    b_init: Callable | None = None,
) -> Layer:
    """A multilayer perceptron: input layer, hidden layers, output layer.

    Each hidden layer computes ``h = activation(h @ w + b)``; the output layer is
    linear (logits for classification, values for regression). With
    ``residual=True`` every hidden layer after the first whose width matches the
    previous one adds its input back: ``h = h + activation(h @ w + b)`` (the
    MNIST-1D paper's MLP is ``mlp(10, (100, 100), residual=True)``).

    Args:
      out_features: size of the output layer.
      hidden: widths of the hidden layers; ``()`` gives a linear model.
      activation: a name from ``fnnet.activation`` (``"relu"``, ``"gelu"``, ...)
        or a function.
      residual: add skip connections around equal-width hidden layers.
      dropout_rate: probability of dropping each hidden unit while training.
      flatten: flatten the example first, so images and sequences work as vectors.
      w_init, b_init: initializers for every dense layer (default LeCun normal, zeros).

    Input: one example of any shape (``(features,)`` when ``flatten=False``).
    Output: ``(out_features,)``.

    Params: ``{"hidden_0": {"w", "b"}, ..., "out": {"w", "b"}}``.
    """
    errors.positive_int(out_features, "mlp", "out_features")
    for i, width in enumerate(hidden):
        errors.positive_int(width, "mlp", f"hidden[{i}]")
    act = get_activation(activation)
    inits = {"w_init": w_init, "b_init": b_init}
    layers = {f"hidden_{i}": dense(width, **inits) for i, width in enumerate(hidden)}
    layers["out"] = dense(out_features, **inits)
    drop = dropout(dropout_rate)

    def dropped(call, name, h):  # no dropout child at all when the rate is 0
        return call(name, drop, h) if dropout_rate else h

    def forward(call, x):
        h = jnp.reshape(x, (-1,)) if flatten else x  # (features,)
        for i in range(len(hidden)):
            z = dropped(call, f"drop_{i}", act(call(f"hidden_{i}", layers[f"hidden_{i}"], h)))
            h = h + z if residual and i > 0 and z.shape == h.shape else z  # (hidden[i],)
        return call("out", layers["out"], h)  # (out_features,)

    return composite(forward, "mlp")
