"""The recurrent network: a cell scanned over time, carrying a memory of what came before."""

from __future__ import annotations

import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.cells import gru_cell, lstm_cell, simple_cell
from fnnet._src.dense import dense
from fnnet._src.dropout import dropout
from fnnet._src.layer import Layer, composite
from fnnet._src.recurrent import bidirectional as bidirectional_layer
from fnnet._src.recurrent import recurrent as recurrent_layer
from fnnet._src.recurrent import valid_steps
from fnnet.models._config import records_config

CELLS = {"simple": simple_cell, "lstm": lstm_cell, "gru": gru_cell}
OUTPUTS = ("last", "mean", "flatten", "sequence")


@records_config
def rnn(
    out_features: int,
    hidden: int = 64,
    *,
    cell: str = "lstm",
    num_layers: int = 1,
    bidirectional: bool = False,
    output: str = "last",
    dropout_rate: float = 0.0,
) -> Layer:
    """A recurrent network: stacked recurrent layers and a dense read-out.

    Args:
      out_features: size of the output (classes, or values per step).
      hidden: size of each recurrent layer's state (per direction).
      cell: ``"simple"`` (Elman), ``"lstm"`` or ``"gru"``.
      num_layers: recurrent layers stacked; each reads the previous one's outputs.
      bidirectional: run every layer forwards and backwards and concatenate.
      output: how the sequence becomes a prediction:
        ``"last"``: the final state (forwards: after the last valid step; backwards:
        after position 0), a classifier;
        ``"mean"``: the mean of the outputs over the valid steps, a classifier;
        ``"flatten"``: every step's outputs side by side (the MNIST-1D paper's GRU);
        ``"sequence"``: a prediction at every step, sequence to sequence.
      dropout_rate: dropout between recurrent layers and before the read-out.

    Input: ``(seq, features)``, or ``(seq,)`` for one value per step. Keyword
    ``lengths`` (an int: the valid leading steps) or ``mask`` (``(seq,)`` bool)
    handle padded sequences.
    Output: ``(out_features,)``, or ``(seq, out_features)`` for ``"sequence"``.

    Params: ``{"rnn_0": {"cell": ...}, ..., "out": {"w", "b"}}``; bidirectional
    layers hold ``{"forward": {"cell": ...}, "backward": {"cell": ...}}``.
    """
    errors.positive_int(out_features, "rnn model", "out_features")
    errors.positive_int(hidden, "rnn model", "hidden")
    errors.positive_int(num_layers, "rnn model", "num_layers")
    if cell not in CELLS:
        errors.fail("rnn model", f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    if output not in OUTPUTS:
        errors.fail("rnn model", f"output must be one of {list(OUTPUTS)}, got {output!r}")
    if bidirectional:
        recurrent = bidirectional_layer(CELLS[cell](hidden), return_sequences=True)
    else:
        recurrent = recurrent_layer(CELLS[cell](hidden), return_sequences=True)
    readout = dense(out_features)
    drop = dropout(dropout_rate)

    def dropped(call, name, h):  # no dropout child at all when the rate is 0
        return call(name, drop, h) if dropout_rate else h

    def forward(call, x, *, lengths=None, mask=None):
        h = jnp.expand_dims(x, -1) if jnp.ndim(x) == 1 else x  # (seq, features)
        if jnp.ndim(h) != 2:
            errors.fail(
                "rnn model",
                f"expected a sequence (seq, features) or (seq,), got shape {jnp.shape(x)}",
            )
        seq = h.shape[0]
        valid = valid_steps("rnn model", seq, lengths, mask)  # (seq,) bool, or None: all
        for i in range(num_layers):
            h = call(f"rnn_{i}", recurrent, h, lengths=lengths, mask=mask)  # (seq, hidden * dirs)
            h = dropped(call, f"drop_{i}", h)
        steps = jnp.arange(seq)
        if output == "last":
            # Forwards: the state after the last valid step; backwards: after the first.
            last = seq - 1 if valid is None else jnp.max(jnp.where(valid, steps, 0))
            features = jnp.take(h, last, axis=0)  # (hidden * dirs,)
            if bidirectional:
                first = 0 if valid is None else jnp.argmax(valid)
                features = jnp.concatenate([features[:hidden], jnp.take(h, first, axis=0)[hidden:]])
        elif output == "mean":
            if valid is None:
                features = jnp.mean(h, axis=0)
            else:
                total = jnp.sum(jnp.where(valid[:, None], h, jnp.zeros_like(h)), axis=0)
                count = jnp.maximum(jnp.sum(valid), 1).astype(h.dtype)
                features = total / count  # (hidden * dirs,)
        elif output == "flatten":
            features = jnp.reshape(h, (-1,))  # (seq * hidden * dirs,)
        else:
            features = h  # (seq, hidden * dirs)
        return call("out", readout, dropped(call, "drop_out", features))

    return composite(forward, "rnn_model")
