"""Sequence layers that run a recurrent cell over time: recurrent, lstm, gru, bidirectional.

Each layer takes one example ``(seq, features)``; batch with ``jax.vmap``. When
the input is at least as wide as the gates it feeds, the input projection of
every step is one matmul before a ``jax.lax.scan`` whose body does only the
recurrent part (see :mod:`fnnet._src.cells`). When it is narrower (the MNIST-1D
GRU reads 1 feature into 18 gate values), projecting first would make the
scanned sequence, and the gradient the backward pass carries through it,
wider than the input, so the body projects its own step instead. For that GRU
this made a training step on the CPU roughly a fifth faster at batch 100 and a
quarter faster at batch 1024 (in-process, interleaved timings of the two
formulations; docs/benchmarks.md has the engine's figures).

Variable lengths: ``apply`` takes ``lengths`` (a scalar, the number of valid
leading steps) or ``mask`` (``(seq,)`` bool, True = valid). The recurrence reads
only the valid steps: at an invalid step the carry is left unchanged and the
output is zeros. So a padded sequence gives, at its valid positions and as its
final state, exactly what the unpadded sequence gives, in both directions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fnnet._src import checks, errors
from fnnet._src.cells import Cell, gru_cell, hidden_state, lstm_cell, simple_cell
from fnnet._src.layer import Layer

# --- Running a cell over one sequence ------------------------------------------


def _check_sequence(kind: str, x) -> None:
    checks.sequence(kind, x)


def valid_steps(kind: str, seq: int, lengths, mask) -> jax.Array | None:
    """The ``(seq,)`` bool mask of steps the recurrence reads, or None for all."""
    if lengths is not None and mask is not None:
        errors.fail(kind, "pass lengths or mask, not both")
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if lengths.shape != () or not jnp.issubdtype(lengths.dtype, jnp.integer):
            errors.fail(
                kind,
                "expected lengths to be an integer scalar (one example; batch with "
                f"jax.vmap), got {lengths.dtype} of shape {lengths.shape}",
            )
        return jnp.arange(seq, dtype=lengths.dtype) < lengths  # (seq,)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (seq,) or mask.dtype != jnp.bool_:
            errors.fail(
                kind,
                f"expected mask to be bool of shape ({seq},) like the input's seq axis, "
                f"got {mask.dtype} of shape {mask.shape}",
            )
        return mask
    return None


def _initial_carry(kind: str, cell: Cell, params, given):
    carry = cell.initial_carry(params)
    if given is None:
        return carry
    expected = jax.tree.map(jnp.shape, carry)
    got = jax.tree.map(jnp.shape, given)
    if jax.tree.structure(carry) != jax.tree.structure(given) or expected != got:
        errors.fail(kind, f"expected initial_carry with shapes {expected}, got {got}")
    return jax.tree.map(lambda g, c: jnp.asarray(g).astype(c.dtype), given, carry)


def _prepare(kind, cell, params, x, initial_carry):
    """``(params, carry, inputs, narrow)`` for scanning ``cell`` over ``x`` ``(seq, features)``.

    ``inputs`` is the projected sequence ``(seq, gates * hidden)``, or ``x`` itself
    when ``narrow`` (the input is narrower than the gates; see the module notes).
    """
    # Compute in the input's dtype (a bfloat16 model stays bfloat16); casting is
    # explicit because strict promotion forbids mixing float widths.
    leaf = jax.tree.leaves(params)[0]
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else leaf.dtype
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    carry = _initial_carry(kind, cell, params, initial_carry)
    x = x.astype(dtype)
    width = jax.eval_shape(cell.project, params, x).shape[-1]  # also checks x's shape
    narrow = x.shape[-1] < width
    return params, carry, (x if narrow else cell.project(params, x)), narrow


def _body(cell, narrow, masked):
    """``body(params, carry, xs_t) -> (carry, h_t)``: one step, ``xs_t`` a row of the
    inputs (and, when ``masked``, whether the step is valid)."""

    def body(params, carry, xs_t):
        x_t, ok = xs_t if masked else (xs_t, None)
        new_carry, h = cell.step(params, carry, cell.project(params, x_t) if narrow else x_t)
        if ok is None:
            return new_carry, h
        carry = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_carry, carry)
        return carry, jnp.where(ok, h, jnp.zeros_like(h))

    return body


def _flip(tree):
    return jax.tree.map(lambda a: a[::-1], tree)


def _run(kind, cell, params, x, valid, initial_carry, reverse):
    """Scans ``cell`` over ``x`` ``(seq, features)``; returns ``(carry, ys)``.

    ``ys`` is ``(seq, hidden)`` in the input's order whatever the direction: the
    reverse direction visits steps last to first but stores each output at its own
    position. Skipping invalid steps rather than flipping the valid prefix
    means any mask works, and a right-padded reverse pass starts at the last valid
    step, as Flax's ``RNN(reverse=True, keep_order=True)`` with ``seq_lengths`` does.
    """
    params, carry, inputs, narrow = _prepare(kind, cell, params, x, initial_carry)
    body = _body(cell, narrow, valid is not None)
    xs = inputs if valid is None else (inputs, valid)

    def scanned(carry, xs_t):
        return body(params, carry, xs_t)

    if not reverse:
        return jax.lax.scan(scanned, carry, xs)
    # Flipping around a forward scan gives what lax.scan(reverse=True) gives, and
    # XLA:CPU runs it about 8% faster (measured on the bidirectional MNIST-1D GRU).
    carry, ys = jax.lax.scan(scanned, carry, _flip(xs))
    return carry, ys[::-1]


def _check_cell(kind: str, cell) -> None:
    if not isinstance(cell, Cell):
        errors.fail(kind, f"expected a Cell (fnnet.lstm_cell, ...), got {type(cell).__name__}")


# --- Layers ----------------------------------------------------------------------


def recurrent(
    cell: Cell,
    *,
    return_sequences: bool = True,
    reverse: bool = False,
    return_carry: bool = False,
    kind: str = "recurrent",
) -> Layer:
    """Runs a recurrent cell over a sequence with ``jax.lax.scan``.

    Args:
      cell: the :class:`Cell` to run (``fnnet.lstm_cell(64)``, ...).
      return_sequences: return the output of every step; otherwise only the hidden
        state after the last step read.
      reverse: read the sequence last step to first. Outputs are still returned in
        the input's order, so position ``t`` holds the state after reading steps
        ``seq - 1 .. t``, and the final state is the one after reading step 0.
      return_carry: also return the cell's final carry (an LSTM's ``{"h", "c"}``),
        e.g. to start a decoder from it through ``initial_carry``.
      kind: the kind shown in summaries and errors.

    ``apply(params, x, *, lengths=None, mask=None, initial_carry=None, key=None,
    train=False)`` takes:

    * ``lengths``: integer scalar, the number of valid leading steps; or
    * ``mask``: ``(seq,)`` bool, True marks the steps the recurrence reads. It need
      not be a prefix: invalid steps are skipped wherever they are, in either
      direction, as if they were removed from the sequence.
    * ``initial_carry``: the carry to start from, shaped like
      ``cell.initial_carry(params["cell"])`` (default zeros).

    Invalid steps leave the carry unchanged and output zeros.

    Shapes (one example; batch with ``jax.vmap``):
      input ``(seq, features)``; output ``(seq, hidden)`` when ``return_sequences``,
      else ``(hidden,)``; with ``return_carry``, the pair ``(output, carry)``: output
      first, as every layer returns it (see :class:`fnnet.Layer`).

    Params: ``{"cell": <the cell's params>}``.
    """
    _check_cell(kind, cell)

    def init(key, x):
        _check_sequence(kind, x)
        return {"cell": cell.init(key, x.shape[-1])}

    def apply(params, x, *, lengths=None, mask=None, initial_carry=None, key=None, train=False):
        del key, train
        _check_sequence(kind, x)
        valid = valid_steps(kind, x.shape[0], lengths, mask)
        carry, ys = _run(kind, cell, params["cell"], x, valid, initial_carry, reverse)
        y = ys if return_sequences else hidden_state(carry)  # (seq, hidden) | (hidden,)
        return (y, carry) if return_carry else y

    return Layer(init, apply, kind)


def simple_rnn(
    hidden: int,
    *,
    activation: Callable = jnp.tanh,
    return_sequences: bool = True,
    reverse: bool = False,
    return_carry: bool = False,
    param_dtype=jnp.float32,
) -> Layer:
    """An Elman RNN, ``h_t = activation(W x_t + b + U h_{t-1})``: ``recurrent(simple_cell(...))``.

    Args:
      hidden: the size of the hidden state.
      activation: the cell's nonlinearity.
      return_sequences, reverse, return_carry: as in :func:`recurrent`, and so are
        ``apply``'s ``lengths``, ``mask`` and ``initial_carry``.
      param_dtype: dtype of the parameters.

    Shapes (one example; batch with ``jax.vmap``): input ``(seq, features)``; output
    ``(seq, hidden)``, or ``(hidden,)`` without ``return_sequences``.

    Params: ``{"cell": {"input": {"w": (features, hidden), "b": (hidden,)},
    "recurrent": {"w": (hidden, hidden)}}}``.
    """
    errors.positive_int(hidden, "simple_rnn", "hidden")
    cell = simple_cell(hidden, activation=activation, param_dtype=param_dtype)
    return recurrent(
        cell,
        return_sequences=return_sequences,
        reverse=reverse,
        return_carry=return_carry,
        kind="simple_rnn",
    )


def lstm(
    hidden: int,
    *,
    forget_bias: float = 1.0,
    return_sequences: bool = True,
    reverse: bool = False,
    return_carry: bool = False,
    param_dtype=jnp.float32,
) -> Layer:
    """A long short-term memory layer: :func:`recurrent` of :func:`lstm_cell`.

    Args:
      hidden: the size of the hidden and cell states.
      forget_bias: initial forget-gate bias (see :func:`lstm_cell`).
      return_sequences, reverse, return_carry: as in :func:`recurrent`, and so are
        ``apply``'s ``lengths``, ``mask`` and ``initial_carry`` (here
        ``{"h": (hidden,), "c": (hidden,)}``).
      param_dtype: dtype of the parameters.

    Shapes (one example; batch with ``jax.vmap``): input ``(seq, features)``; output
    ``(seq, hidden)``, or the final ``h``, ``(hidden,)``, without ``return_sequences``.

    Params: ``{"cell": {"input": {"w": (features, 4 * hidden), "b": (4 * hidden,)},
    "recurrent": {"w": (hidden, 4 * hidden)}}}``, gate blocks ``i, f, g, o``.
    """
    errors.positive_int(hidden, "lstm", "hidden")
    cell = lstm_cell(hidden, forget_bias=forget_bias, param_dtype=param_dtype)
    return recurrent(
        cell,
        return_sequences=return_sequences,
        reverse=reverse,
        return_carry=return_carry,
        kind="lstm",
    )


def gru(
    hidden: int,
    *,
    return_sequences: bool = True,
    reverse: bool = False,
    return_carry: bool = False,
    param_dtype=jnp.float32,
) -> Layer:
    """A gated recurrent unit layer: :func:`recurrent` of :func:`gru_cell`.

    Args:
      hidden: the size of the hidden state.
      return_sequences, reverse, return_carry: as in :func:`recurrent`, and so are
        ``apply``'s ``lengths``, ``mask`` and ``initial_carry``.
      param_dtype: dtype of the parameters.

    Shapes (one example; batch with ``jax.vmap``): input ``(seq, features)``; output
    ``(seq, hidden)``, or ``(hidden,)`` without ``return_sequences``.

    Params: ``{"cell": {"input": {"w": (features, 3 * hidden), "b": (3 * hidden,)},
    "recurrent": {"w": (hidden, 3 * hidden), "b": (hidden,)}}}``, gate blocks
    ``r, z, n``.
    """
    errors.positive_int(hidden, "gru", "hidden")
    cell = gru_cell(hidden, param_dtype=param_dtype)
    return recurrent(
        cell,
        return_sequences=return_sequences,
        reverse=reverse,
        return_carry=return_carry,
        kind="gru",
    )


_MERGES = {
    "concat": lambda f, b: jnp.concatenate([f, b], axis=-1),
    "sum": lambda f, b: f + b,
    "mean": lambda f, b: 0.5 * (f + b),
}


def bidirectional(
    cell: Cell,
    backward_cell: Cell | None = None,
    *,
    return_sequences: bool = True,
    merge: str = "concat",
    kind: str = "bidirectional",
) -> Layer:
    """Runs one cell forward and one backward over a sequence and merges them.

    Takes cells rather than layers so that the backward direction is reversed by
    construction. The two directions always have separate parameters.

    Args:
      cell: the forward cell.
      backward_cell: the backward cell; default ``cell`` again (the same kind and
        size, initialized independently).
      return_sequences: return every step's merged outputs; otherwise merge the
        forward state after the last valid step with the backward state after
        step 0.
      merge: ``"concat"`` (forward first), ``"sum"`` or ``"mean"``; the latter two
        need equal hidden sizes.
      kind: the kind shown in summaries and errors.

    ``apply`` takes ``lengths`` or ``mask`` as :func:`recurrent` does; for a right-padded
    sequence the backward direction starts at the last valid step, so both
    directions at position ``t`` have read only valid steps.

    Shapes (one example; batch with ``jax.vmap``):
      input ``(seq, features)``; output ``(seq, out)`` when ``return_sequences``, else
      ``(out,)``, with ``out = hidden_fwd + hidden_bwd`` for ``"concat"`` and
      ``hidden`` otherwise.

    Params: ``{"forward": {"cell": ...}, "backward": {"cell": ...}}``; each direction's
    tree is the params of ``recurrent(cell)`` (resp. ``recurrent(backward_cell, reverse=True)``).
    """
    _check_cell(kind, cell)
    backward_cell = cell if backward_cell is None else backward_cell
    _check_cell(kind, backward_cell)
    if merge not in _MERGES:
        errors.fail(kind, f"merge must be one of {sorted(_MERGES)}, got {merge!r}")
    if merge != "concat" and cell.hidden != backward_cell.hidden:
        errors.fail(
            kind,
            f"merge={merge!r} needs equal hidden sizes, got forward {cell.hidden} and "
            f"backward {backward_cell.hidden}; use merge='concat'",
        )
    merge_fn = _MERGES[merge]
    directions = (("forward", cell, False), ("backward", backward_cell, True))

    def init(key, x):
        _check_sequence(kind, x)
        params = {}
        for (direction, c, _), k in zip(directions, jax.random.split(key), strict=True):
            with errors.scope(direction):
                params[direction] = {"cell": c.init(k, x.shape[-1])}
        return params

    def apply(params, x, *, lengths=None, mask=None, key=None, train=False):
        del key, train
        _check_sequence(kind, x)
        valid = valid_steps(kind, x.shape[0], lengths, mask)
        outs = []
        for direction, c, reverse in directions:
            with errors.scope(direction):
                carry, ys = _run(kind, c, params[direction]["cell"], x, valid, None, reverse)
            outs.append(ys if return_sequences else hidden_state(carry))
        return merge_fn(*outs)  # (seq, out) | (out,)

    return Layer(init, apply, kind)
