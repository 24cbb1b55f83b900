"""Activation layers against NumPy formulas, lookup by name, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import erf

import fnnet

X = np.array([[-3.0, -0.5, 0.0], [0.25, 1.0, 4.0]], np.float32)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# test id: (kind, layer factory, the same function in NumPy)
REFERENCES = {
    "relu": ("relu", fnnet.relu, lambda x: np.maximum(x, 0)),
    "gelu": (
        "gelu",
        fnnet.gelu,
        lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    ),
    "gelu_exact": (
        "gelu",
        lambda: fnnet.gelu(approximate=False),
        lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
    ),
    "sigmoid": ("sigmoid", fnnet.sigmoid, _sigmoid),
    "tanh": ("tanh", fnnet.tanh, np.tanh),
    "softmax": ("softmax", fnnet.softmax, lambda x: _softmax(x, -1)),
    "softmax_axis0": ("softmax", lambda: fnnet.softmax(axis=0), lambda x: _softmax(x, 0)),
    "log_softmax": ("log_softmax", fnnet.log_softmax, lambda x: np.log(_softmax(x, -1))),
    "silu": ("silu", fnnet.silu, lambda x: x * _sigmoid(x)),
    "elu": ("elu", fnnet.elu, lambda x: np.where(x > 0, x, np.exp(x) - 1)),
    "elu_alpha": (
        "elu",
        lambda: fnnet.elu(alpha=2.0),
        lambda x: np.where(x > 0, x, 2 * (np.exp(x) - 1)),
    ),
    "leaky_relu": ("leaky_relu", fnnet.leaky_relu, lambda x: np.where(x >= 0, x, 0.01 * x)),
    "leaky_relu_slope": (
        "leaky_relu",
        lambda: fnnet.leaky_relu(negative_slope=0.2),
        lambda x: np.where(x >= 0, x, 0.2 * x),
    ),
    "softplus": ("softplus", fnnet.softplus, lambda x: np.log1p(np.exp(x))),
    "identity": ("identity", fnnet.identity, lambda x: x),
}


@pytest.mark.parametrize("case", REFERENCES)
def test_activation_matches_numpy(case):
    kind, make, ref = REFERENCES[case]
    layer = make()
    assert layer.kind == kind
    assert layer.init(jax.random.key(0), X) == {}
    np.testing.assert_allclose(layer.apply({}, X), ref(X.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_lookup_by_name_matches_the_factories():
    x = jnp.asarray(X)
    for name in (
        "relu",
        "gelu",
        "sigmoid",
        "tanh",
        "softmax",
        "log_softmax",
        "silu",
        "elu",
        "leaky_relu",
        "softplus",
        "identity",
    ):
        layer = fnnet.activation(name)
        assert layer.kind == name
        expected = getattr(fnnet, name)().apply({}, x)
        np.testing.assert_array_equal(layer.apply({}, x), expected)
        np.testing.assert_array_equal(fnnet.get_activation(name)(x), expected)
    assert fnnet.get_activation("gelu") is jax.nn.gelu
    assert fnnet.get_activation(jnp.sin) is jnp.sin
    layer = fnnet.activation(jnp.sin)
    assert layer.kind == "sin"
    np.testing.assert_allclose(layer.apply({}, x), np.sin(X), rtol=1e-6)


def test_log_softmax_and_softmax_gradients():
    x = jnp.asarray(X)
    check_grads(lambda x: fnnet.log_softmax().apply({}, x), (x,), order=2, modes=["rev"])
    check_grads(lambda x: fnnet.softmax(axis=0).apply({}, x), (x,), order=1, modes=["rev"])
    # Large scores do not overflow: log_softmax subtracts the maximum first.
    big = fnnet.log_softmax().apply({}, jnp.array([1000.0, 0.0]))
    np.testing.assert_allclose(big, [0.0, -1000.0])


def test_activation_errors():
    with pytest.raises(fnnet.LayerError, match=r"unknown activation 'relu6'; expected one of \["):
        fnnet.activation("relu6")
    with pytest.raises(fnnet.LayerError, match=r"'gelu', 'identity', 'leaky_relu'"):
        fnnet.get_activation("swish")
    with pytest.raises(fnnet.LayerError, match=r"or a function, got Layer"):
        fnnet.activation(fnnet.relu())
    with pytest.raises(fnnet.LayerError, match=r"^leaky_relu: negative_slope must be a real"):
        fnnet.leaky_relu(negative_slope="0.1")
    with pytest.raises(fnnet.LayerError, match=r"^elu: alpha must be a real number"):
        fnnet.elu(alpha=None)
    with pytest.raises(fnnet.LayerError, match=r"^gelu: approximate must be True or False"):
        fnnet.gelu("tanh")
    with pytest.raises(fnnet.LayerError, match=r"^softmax: axis must be an integer"):
        fnnet.softmax(axis=1.0)
    with pytest.raises(
        fnnet.LayerError,
        match=r"^softmax at 'probs': axis 2 is out of range for an input of shape \(2, 3\)",
    ):
        fnnet.serial(probs=fnnet.softmax(axis=2)).apply({}, jnp.asarray(X))
