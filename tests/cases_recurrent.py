"""Conformance cases for the recurrent sequence layers (seq 5, hidden 4)."""

import jax.numpy as jnp

import fnnet

from registry import Case, normal

CASES = [
    Case("simple_rnn", lambda: fnnet.simple_rnn(4), normal(5, 3), ("simple_rnn",)),
    Case(
        "simple_rnn_last",
        lambda: fnnet.simple_rnn(4, return_sequences=False),
        normal(5, 3),
        ("simple_rnn",),
    ),
    Case("lstm", lambda: fnnet.lstm(4), normal(5, 3), ("lstm",)),
    Case("lstm_last", lambda: fnnet.lstm(4, return_sequences=False), normal(5, 3), ("lstm",)),
    Case("gru", lambda: fnnet.gru(4), normal(5, 3), ("gru",)),
    Case("gru_last", lambda: fnnet.gru(4, return_sequences=False), normal(5, 3), ("gru",)),
    Case(
        "rnn_lstm_cell_reverse_carry",
        lambda: fnnet.recurrent(fnnet.lstm_cell(4), reverse=True, return_carry=True),
        normal(5, 3),
        ("recurrent",),
    ),
    Case(
        "bidirectional",
        lambda: fnnet.bidirectional(fnnet.lstm_cell(4), fnnet.gru_cell(2)),
        normal(5, 3),
        ("bidirectional",),
        apply_kwargs={"lengths": jnp.int32(3)},
    ),
    Case(
        "bidirectional_last",
        lambda: fnnet.bidirectional(fnnet.gru_cell(4), return_sequences=False, merge="mean"),
        normal(5, 3),
        ("bidirectional",),
    ),
]
