"""Recurrent cells: one time step of an Elman RNN, an LSTM and a GRU.

A cell is not a layer: it is the body of a recurrence, which :func:`fnnet.recurrent`
runs over a sequence with ``jax.lax.scan``. Every cell splits its update into

* ``project``: the input term of every gate, for all time steps at once. It does
  not depend on the carry, so it is one ``(seq, features) @ (features, gates * hidden)``
  matmul outside the scan instead of ``seq`` small ones inside it;
* ``step``: the recurrent term and the gate arithmetic, one time step at a time,
  with a single ``(hidden,) @ (hidden, gates * hidden)`` matmul.

Parameters of a cell with ``G`` gates::

    {"input":     {"w": (features, G * hidden), "b": (G * hidden,)},
     "recurrent": {"w": (hidden, G * hidden)}}            # GRU adds "b": (hidden,)

The ``G`` blocks of ``hidden`` columns are the gates in the order each factory
documents (LSTM ``i, f, g, o``; GRU ``r, z, n``), the order PyTorch and Flax use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnnet._src import errors

Carry = Any


class Cell(NamedTuple):
    """One step of a recurrence as pure functions; :func:`fnnet.recurrent` runs it over time.

    Attributes:
      init: ``init(key, input_features) -> params``.
      initial_carry: ``initial_carry(params) -> carry``, zeros in the params' dtype.
        The carry is either the hidden state ``(hidden,)`` itself or a dict whose
        ``"h"`` entry is the hidden state (the LSTM's carry is ``{"h", "c"}``).
      project: ``project(params, xs) -> projected``: the input term of every gate for
        all steps at once, ``(seq, features) -> (seq, gates * hidden)``, and for one
        step, ``(features,) -> (gates * hidden,)``: for inputs narrower than the
        gates :func:`fnnet.recurrent` projects each step inside its loop.
      step: ``step(params, carry, projected_t) -> (carry, h_t)``: one time step from
        one row ``(gates * hidden,)`` of ``project``'s output; ``h_t`` is ``(hidden,)``.
      hidden: the size of the hidden state.
      name: the kind of cell, used in error messages.
    """

    init: Callable[[jax.Array, int], dict]
    initial_carry: Callable[[dict], Carry]
    project: Callable[[dict, jax.Array], jax.Array]
    step: Callable[[dict, Carry, jax.Array], tuple[Carry, jax.Array]]
    hidden: int
    name: str


def hidden_state(carry: Carry) -> jax.Array:
    """The hidden state ``(hidden,)`` held in a cell's carry."""
    return carry["h"] if isinstance(carry, dict) else carry


_lecun_normal = jax.nn.initializers.lecun_normal()
_orthogonal = jax.nn.initializers.orthogonal()


def _init_weights(key, features: int, gates: int, hidden: int, dtype) -> dict:
    """Input kernel, zero input bias and recurrent kernel of a ``gates``-gate cell.

    The defaults follow Flax's cells: LeCun-normal input kernels (the fan-in is
    ``features`` whether the gates are initialized together or apart) and an
    orthogonal recurrent kernel per gate. Each ``(hidden, hidden)`` block is made
    orthogonal on its own, because one orthogonal ``(hidden, G * hidden)`` matrix
    would only have orthonormal rows, and it is each gate's map of ``h`` whose
    norm-preservation keeps gradients through time from exploding or vanishing.
    """
    k_in, k_rec = jax.random.split(key)
    blocks = jax.vmap(lambda k: _orthogonal(k, (hidden, hidden), dtype))(
        jax.random.split(k_rec, gates)
    )  # (gates, hidden, hidden)
    recurrent = jnp.transpose(blocks, (1, 0, 2)).reshape(hidden, gates * hidden)
    return {
        "input": {
            "w": _lecun_normal(k_in, (features, gates * hidden), dtype),
            "b": jnp.zeros((gates * hidden,), dtype),
        },
        "recurrent": {"w": recurrent},
    }


def _checked_features(kind: str, input_features) -> int:
    if isinstance(input_features, bool) or not isinstance(input_features, int):
        errors.fail(kind, f"input_features must be an integer, got {input_features!r}")
    if input_features <= 0:
        errors.fail(kind, f"expected input with at least one feature, got {input_features}")
    return input_features


def _make_project(kind: str) -> Callable[[dict, jax.Array], jax.Array]:
    def project(params, xs):
        w = params["input"]["w"]  # (features, gates * hidden)
        if xs.ndim not in (1, 2) or xs.shape[-1] != w.shape[0]:
            errors.fail(
                kind,
                f"expected input of shape (seq, {w.shape[0]}), got shape {tuple(xs.shape)}",
            )
        b = params["input"]["b"]
        return xs @ w + (b if xs.ndim == 1 else b[None, :])  # ([seq,] gates * hidden)

    return project


def _zeros_carry(params) -> jax.Array:
    w = params["recurrent"]["w"]  # (hidden, gates * hidden)
    return jnp.zeros((w.shape[0],), w.dtype)


def _check_activation(kind: str, activation) -> None:
    if not callable(activation):
        errors.fail(kind, f"activation must be a callable, got {activation!r}")


def simple_cell(hidden: int, *, activation: Callable = jnp.tanh, param_dtype=jnp.float32) -> Cell:
    """An Elman cell: ``h' = activation(W x + b + U h)``.

    Args:
      hidden: the size of the hidden state.
      activation: applied to the pre-activation, ``(hidden,) -> (hidden,)``.
      param_dtype: dtype of the parameters.

    Returns:
      A :class:`Cell` with one gate block; its carry is ``h``, ``(hidden,)``.
      Params: ``{"input": {"w": (features, hidden), "b": (hidden,)},
      "recurrent": {"w": (hidden, hidden)}}``.
    """
    kind = "simple_cell"
    errors.positive_int(hidden, kind, "hidden")
    _check_activation(kind, activation)

    def init(key, input_features):
        features = _checked_features(kind, input_features)
        return _init_weights(key, features, 1, hidden, param_dtype)

    def step(params, h, projected_t):
        h = activation(projected_t + h @ params["recurrent"]["w"])  # (hidden,)
        return h, h

    return Cell(init, _zeros_carry, _make_project(kind), step, hidden, kind)


def lstm_cell(hidden: int, *, forget_bias: float = 1.0, param_dtype=jnp.float32) -> Cell:
    """A long short-term memory cell (Hochreiter & Schmidhuber, 1997), as in Flax::

        i, f, g, o = split(W x + b + U h)        # gate blocks in this order
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(c')

    Args:
      hidden: the size of the hidden and cell states.
      forget_bias: initial value of the forget gate's bias. The default 1.0 starts
        the cell remembering (Jozefowicz et al., 2015; Keras' ``unit_forget_bias``);
        0.0 gives Flax's and PyTorch's initialization.
      param_dtype: dtype of the parameters.

    Returns:
      A :class:`Cell` with four gate blocks; its carry is ``{"h": (hidden,),
      "c": (hidden,)}``. Params: ``{"input": {"w": (features, 4 * hidden),
      "b": (4 * hidden,)}, "recurrent": {"w": (hidden, 4 * hidden)}}``; a single bias
      suffices because the input and recurrent terms are summed.
    """
    kind = "lstm_cell"
    errors.positive_int(hidden, kind, "hidden")
    if isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float)):
        errors.fail(kind, f"forget_bias must be a number, got {forget_bias!r}")

    def init(key, input_features):
        features = _checked_features(kind, input_features)
        params = _init_weights(key, features, 4, hidden, param_dtype)
        b = params["input"]["b"]
        params["input"]["b"] = b.at[hidden : 2 * hidden].set(forget_bias)
        return params

    def initial_carry(params):
        h = _zeros_carry(params)
        return {"h": h, "c": h}

    def step(params, carry, projected_t):
        gates = projected_t + carry["h"] @ params["recurrent"]["w"]  # (4 * hidden,)
        i, f, g, o = jnp.split(gates, 4)
        c = jax.nn.sigmoid(f) * carry["c"] + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return {"h": h, "c": c}, h

    return Cell(init, initial_carry, _make_project(kind), step, hidden, kind)


def gru_cell(hidden: int, *, param_dtype=jnp.float32) -> Cell:
    """A gated recurrent unit (Cho et al., 2014) in the PyTorch and Flax form::

        xr, xz, xn = split(W x + b)              # gate blocks in this order
        hr, hz, hn = split(U h)
        r = sigmoid(xr + hr);  z = sigmoid(xz + hz)
        n = tanh(xn + r * (hn + b_hn))
        h' = (1 - z) * n + z * h

    Args:
      hidden: the size of the hidden state.
      param_dtype: dtype of the parameters.

    Returns:
      A :class:`Cell` with three gate blocks; its carry is ``h``, ``(hidden,)``.
      Params: ``{"input": {"w": (features, 3 * hidden), "b": (3 * hidden,)},
      "recurrent": {"w": (hidden, 3 * hidden), "b": (hidden,)}}``, where
      ``recurrent.b`` is ``b_hn``: the reset gate scales the candidate's recurrent
      term including its bias, so that bias cannot be folded into ``input.b``.
    """
    kind = "gru_cell"
    errors.positive_int(hidden, kind, "hidden")

    def init(key, input_features):
        features = _checked_features(kind, input_features)
        params = _init_weights(key, features, 3, hidden, param_dtype)
        params["recurrent"]["b"] = jnp.zeros((hidden,), param_dtype)
        return params

    def step(params, h, projected_t):
        xr, xz, xn = jnp.split(projected_t, 3)
        hr, hz, hn = jnp.split(h @ params["recurrent"]["w"], 3)  # 3 x (hidden,)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * (hn + params["recurrent"]["b"]))
        h = (1.0 - z) * n + z * h
        return h, h

    return Cell(init, _zeros_carry, _make_project(kind), step, hidden, kind)
