"""The recurrent network: a cell scanned over time, carrying a memory of what came before."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.cells import gru_cell, lstm_cell, simple_cell
from fnnet._src.dense import dense
from fnnet._src.dropout import dropout
from fnnet._src.layer import Layer, apply_child, init_child, split_key
from fnnet._src.recurrent import rnn as rnn_layer
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
    directions = ("forward", "backward") if bidirectional else ("forward",)
    recurrent = {
        d: rnn_layer(CELLS[cell](hidden), return_sequences=True, reverse=d == "backward")
        for d in directions
    }
    readout = dense(out_features)
    drop = dropout(dropout_rate)

    def _as_sequence(x):
        if jnp.ndim(x) == 1:
            return jnp.expand_dims(x, -1)  # (seq, 1)
        if jnp.ndim(x) != 2:
            errors.fail(
                "rnn model",
                f"expected a sequence (seq, features) or (seq,), got shape {jnp.shape(x)}",
            )
        return x

    def _child(i, d):
        """The path of layer i's direction d; a single direction is the layer itself."""
        return f"rnn_{i}/{d}" if bidirectional else f"rnn_{i}"

    def init(key, x):
        h = jax.eval_shape(_as_sequence, x)
        keys = iter(split_key(key, num_layers * len(directions) + 1))
        params = {}
        for i in range(num_layers):
            outs = []
            for d in directions:
                p, _, y = init_child(_child(i, d), recurrent[d], next(keys), h)
                params.setdefault(f"rnn_{i}", {})
                if bidirectional:
                    params[f"rnn_{i}"][d] = p
                else:
                    params[f"rnn_{i}"] = p
                outs.append(y)
            h = jax.ShapeDtypeStruct((h.shape[0], sum(o.shape[-1] for o in outs)), outs[0].dtype)
        features = {
            "last": (h.shape[-1],),
            "mean": (h.shape[-1],),
            "sequence": h.shape,
            "flatten": (h.shape[0] * h.shape[-1],),
        }[output]
        params["out"], _, _ = init_child(
            "out", readout, next(keys), jax.ShapeDtypeStruct(features, h.dtype)
        )
        return params

    def apply(params, x, *, key=None, train=False, lengths=None, mask=None):
        h = _as_sequence(x)  # (seq, features)
        seq = h.shape[0]
        if lengths is not None and mask is not None:
            errors.fail("rnn model", "pass lengths or mask, not both")
        if mask is not None:
            lengths = jnp.sum(mask.astype(jnp.int32))
        extra = {} if lengths is None else {"lengths": lengths}
        keys = split_key(key, num_layers + 1)
        for i in range(num_layers):
            outs = []
            for d in directions:
                p = params[f"rnn_{i}"][d] if bidirectional else params[f"rnn_{i}"]
                y, _ = apply_child(
                    _child(i, d), recurrent[d], p, {}, h, key=None, train=train, **extra
                )
                outs.append(y)  # (seq, hidden)
            h = jnp.concatenate(outs, axis=-1)  # (seq, hidden * directions)
            h = drop.apply({}, h, key=keys[i], train=train)
        valid = seq if lengths is None else lengths
        if output == "last":
            width = h.shape[-1] // len(directions)
            last = jnp.take(h, valid - 1, axis=0)  # forwards: the state after the last valid step
            if bidirectional:  # backwards: the state after reading position 0
                last = jnp.concatenate([last[:width], h[0, width:]])
            features = last
        elif output == "mean":
            steps = jnp.arange(seq) < valid  # (seq,)
            total = jnp.sum(jnp.where(steps[:, None], h, jnp.zeros_like(h)), axis=0)
            features = total / jnp.asarray(valid, h.dtype)
        elif output == "flatten":
            features = jnp.reshape(h, (-1,))  # (seq * hidden * directions,)
        else:
            features = h  # (seq, hidden * directions)
        features = drop.apply({}, features, key=keys[-1], train=train)
        y, _ = apply_child("out", readout, params["out"], {}, features, key=None, train=train)
        return y

    return Layer(init, apply, "rnn_model")
