"""Functions as parameter-free layers: :func:`fn`, the activations, lookup by name.

Each factory returns a :class:`Layer` with empty params whose kind is the
activation's name, so ``serial(dense(100), relu(), dense(10))`` reads like the
model. :func:`get_activation` gives the plain ``jax.nn`` function instead, for
models that pick their nonlinearity from a config string.

Element-wise activations take one example of any shape and return the same
shape; ``softmax`` and ``log_softmax`` normalize along one axis of it.
Defaults match ``jax.nn`` (so ``gelu`` is the tanh approximation unless
``approximate=False``), and ``activation("gelu")`` equals ``gelu()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.layer import Layer


def fn(f: Callable[[Any], Any], kind: str | None = None) -> Layer:
    """A parameter-free layer that applies ``f`` to its input.

    Args:
      f: any function of one example, e.g. ``jnp.tanh`` or ``lambda x: x[::2]``.
      kind: the kind shown in summaries and errors (default: ``f.__name__``).

    Returns:
      A stateless layer with empty parameters.
    """
    kind = kind or getattr(f, "__name__", "fn")

    def init(key, x):
        del key, x
        return {}

    def apply(params, x, *, key=None, train=False):
        del params, key, train
        return f(x)

    return Layer(init, apply, kind)


def _number(value, kind: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        errors.fail(kind, f"{field} must be a real number, got {value!r}")
    return float(value)


def _along_axis(kind: str, f: Callable, axis: int) -> Callable:
    """``f(x, axis=axis)``, with an out-of-range axis reported against the input shape."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        errors.fail(kind, f"axis must be an integer, got {axis!r}")

    def g(x):
        ndim = jnp.ndim(x)
        if not -ndim <= axis < ndim:
            errors.fail(kind, f"axis {axis} is out of range for an input of shape {jnp.shape(x)}")
        return f(x, axis=axis)

    return g


def relu() -> Layer:
    """The rectified linear unit, ``max(x, 0)``.

    Input: any shape. Output: the same shape.
    """
    return fn(jax.nn.relu, kind="relu")


def gelu(approximate: bool = True) -> Layer:
    """The Gaussian error linear unit, ``x * Phi(x)``.

    Args:
      approximate: use the tanh approximation (``jax.nn``'s default, and GPT-2's);
        ``False`` gives the exact form with ``erf`` (PyTorch's default).

    Input: any shape. Output: the same shape.
    """
    if not isinstance(approximate, bool):
        errors.fail("gelu", f"approximate must be True or False, got {approximate!r}")
    return fn(lambda x: jax.nn.gelu(x, approximate=approximate), kind="gelu")


def sigmoid() -> Layer:
    """The logistic function, ``1 / (1 + exp(-x))``, with outputs in (0, 1).

    Input: any shape. Output: the same shape.
    """
    return fn(jax.nn.sigmoid, kind="sigmoid")


def tanh() -> Layer:
    """The hyperbolic tangent, with outputs in (-1, 1).

    Input: any shape. Output: the same shape.
    """
    return fn(jnp.tanh, kind="tanh")


def softmax(axis: int = -1) -> Layer:
    """Turns scores into probabilities along ``axis``: ``exp(x) / sum(exp(x))``.

    Args:
      axis: the axis that sums to one (default the last, e.g. ``vocab``).

    Input: any shape with ``axis``, e.g. ``(vocab,)`` or ``(seq, vocab)``.
    Output: the same shape.
    """
    return fn(_along_axis("softmax", jax.nn.softmax, axis), kind="softmax")


def log_softmax(axis: int = -1) -> Layer:
    """The logarithm of :func:`softmax`, computed stably as ``x - logsumexp(x)``.

    Args:
      axis: the axis normalized over (default the last).

    Input: any shape with ``axis``. Output: the same shape.
    """
    return fn(_along_axis("log_softmax", jax.nn.log_softmax, axis), kind="log_softmax")


def silu() -> Layer:
    """The sigmoid linear unit (swish), ``x * sigmoid(x)``.

    Input: any shape. Output: the same shape.
    """
    return fn(jax.nn.silu, kind="silu")


def elu(alpha: float = 1.0) -> Layer:
    """The exponential linear unit: ``x`` for ``x > 0``, else ``alpha * (exp(x) - 1)``.

    Args:
      alpha: the negative saturation value is ``-alpha``.

    Input: any shape. Output: the same shape.
    """
    alpha = _number(alpha, "elu", "alpha")
    return fn(lambda x: jax.nn.elu(x, alpha=alpha), kind="elu")


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    """A ReLU with a small slope for negative inputs: ``x`` if ``x >= 0`` else ``slope * x``.

    Args:
      negative_slope: the slope for negative inputs.

    Input: any shape. Output: the same shape.
    """
    slope = _number(negative_slope, "leaky_relu", "negative_slope")
    return fn(lambda x: jax.nn.leaky_relu(x, negative_slope=slope), kind="leaky_relu")


def softplus() -> Layer:
    """A smooth ReLU, ``log(1 + exp(x))``.

    Input: any shape. Output: the same shape.
    """
    return fn(jax.nn.softplus, kind="softplus")


def identity() -> Layer:
    """Returns its input unchanged (a linear "activation", e.g. for an output layer).

    Input: any shape. Output: the same shape.
    """
    return fn(jax.nn.identity, kind="identity")


# The one table of names accepted by `activation` and `get_activation`, with
# defaults as in jax.nn (the factories above give the same functions).
_FUNCTIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
    "softplus": jax.nn.softplus,
    "identity": jax.nn.identity,
}


def _unknown(kind: str, name) -> None:
    if isinstance(name, str):
        errors.fail(kind, f"unknown activation {name!r}; expected one of {sorted(_FUNCTIONS)}")
    errors.fail(
        kind,
        f"expected an activation name (one of {sorted(_FUNCTIONS)}) or a function, "
        f"got {type(name).__name__}",
    )


def activation(name_or_callable: str | Callable) -> Layer:
    """An activation layer chosen by name (``"relu"``) or made from a function.

    Args:
      name_or_callable: one of ``"relu"``, ``"gelu"``, ``"sigmoid"``, ``"tanh"``,
        ``"softmax"``, ``"log_softmax"``, ``"silu"``, ``"elu"``, ``"leaky_relu"``,
        ``"softplus"``, ``"identity"`` (each with its default arguments), or any
        function of one example.

    Input: any shape. Output: whatever the activation gives (the same shape for
    all the named ones).
    """
    if isinstance(name_or_callable, str) and name_or_callable in _FUNCTIONS:
        return fn(_FUNCTIONS[name_or_callable], kind=name_or_callable)
    if callable(name_or_callable):
        return fn(name_or_callable)
    _unknown("activation", name_or_callable)


def get_activation(name_or_callable: str | Callable) -> Callable:
    """The activation function for a name (``"gelu"`` gives ``jax.nn.gelu``).

    Models use this to choose their nonlinearity from a config string. A function
    is returned unchanged.

    Args:
      name_or_callable: a name accepted by :func:`activation`, or a function.

    Returns:
      A function of an array (the ``jax.nn`` one for a name, with its defaults).
    """
    if isinstance(name_or_callable, str) and name_or_callable in _FUNCTIONS:
        return _FUNCTIONS[name_or_callable]
    if callable(name_or_callable):
        return name_or_callable
    _unknown("activation", name_or_callable)
