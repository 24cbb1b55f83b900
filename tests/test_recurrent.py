"""Numerical checks of the recurrent cells and sequence layers.

LSTM and GRU are compared with ``flax.linen`` after copying the weights across
(including Flax's variable-length and reversed modes); the Elman cell with a NumPy
loop. Masking is checked by comparing a padded sequence with the unpadded one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import fnnet

SEQ, FEATURES, HIDDEN = 5, 3, 4


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _random_like(tree, rng):
    """Random values for every parameter: nonzero biases check where biases go."""
    return jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * 0.5), tree
    )


def _random_params(layer, x, rng):
    return _random_like(layer.init(jax.random.key(0), x), rng)


# --- Parity with Flax ---------------------------------------------------------


def _from_flax_lstm(p):
    """Flax's eight Dense layers -> one input and one recurrent matrix, gates i, f, g, o."""
    gates = ("i", "f", "g", "o")
    return {
        "input": {
            "w": jnp.concatenate([p["i" + g]["kernel"] for g in gates], axis=1),
            "b": jnp.concatenate([p["h" + g]["bias"] for g in gates]),
        },
        "recurrent": {"w": jnp.concatenate([p["h" + g]["kernel"] for g in gates], axis=1)},
    }


def _from_flax_gru(p):
    """Flax's six Dense layers -> gates r, z, n; the recurrent bias is Flax's ``hn`` bias."""
    gates = ("r", "z", "n")
    return {
        "input": {
            "w": jnp.concatenate([p["i" + g]["kernel"] for g in gates], axis=1),
            "b": jnp.concatenate([p["i" + g]["bias"] for g in gates]),
        },
        "recurrent": {
            "w": jnp.concatenate([p["h" + g]["kernel"] for g in gates], axis=1),
            "b": p["hn"]["bias"],
        },
    }


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_flax_with_lengths(kind, reverse, rng):
    """Outputs at valid steps and the final carry equal Flax's ``RNN`` with
    ``seq_lengths`` (reversed: ``reverse=True, keep_order=True``)."""
    flax_cell = nn.LSTMCell(HIDDEN) if kind == "lstm" else nn.GRUCell(HIDDEN)
    flax_rnn = nn.RNN(flax_cell, return_carry=True, reverse=reverse, keep_order=True)
    xs = jnp.asarray(rng.standard_normal((2, SEQ, FEATURES)).astype(np.float32))
    lengths = jnp.array([SEQ, 3], jnp.int32)
    variables = flax_rnn.init(jax.random.key(0), xs, seq_lengths=lengths)
    variables = _random_like(variables, rng)  # nonzero biases
    flax_carry, flax_ys = flax_rnn.apply(variables, xs, seq_lengths=lengths)

    convert = _from_flax_lstm if kind == "lstm" else _from_flax_gru
    params = {"cell": convert(variables["params"]["cell"])}
    layer = getattr(fnnet, kind)(HIDDEN, reverse=reverse, return_carry=True)
    ys, carry = jax.vmap(lambda x, n: layer.apply(params, x, lengths=n))(xs, lengths)

    for b, n in enumerate(lengths.tolist()):
        _close(ys[b, :n], flax_ys[b, :n])
    if kind == "lstm":
        flax_carry = {"c": flax_carry[0], "h": flax_carry[1]}
    jax.tree.map(_close, carry, flax_carry)


def test_lstm_initial_carry_matches_flax(rng):
    flax_rnn = nn.RNN(nn.LSTMCell(HIDDEN))
    x = jnp.asarray(rng.standard_normal((SEQ, FEATURES)).astype(np.float32))
    variables = _random_like(flax_rnn.init(jax.random.key(0), x), rng)
    c, h = (jnp.asarray(rng.standard_normal(HIDDEN).astype(np.float32)) for _ in range(2))
    expected = flax_rnn.apply(variables, x, initial_carry=(c, h))

    params = {"cell": _from_flax_lstm(variables["params"]["cell"])}
    ys = fnnet.lstm(HIDDEN).apply(params, x, initial_carry={"h": h, "c": c})
    _close(ys, expected)


# --- The Elman cell against NumPy ----------------------------------------------


def _numpy_elman(params, x, reverse):
    p = jax.tree.map(np.asarray, params["cell"])
    h = np.zeros(HIDDEN, np.float32)
    ys = np.zeros((x.shape[0], HIDDEN), np.float32)
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h = np.tanh(x[t] @ p["input"]["w"] + p["input"]["b"] + h @ p["recurrent"]["w"])
        ys[t] = h
    return ys, h


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_simple_rnn_matches_numpy(reverse, rng):
    x = rng.standard_normal((SEQ, FEATURES)).astype(np.float32)
    layer = fnnet.simple_rnn(HIDDEN, reverse=reverse, return_carry=True)
    params = _random_params(layer, x, rng)
    ys, h = layer.apply(params, jnp.asarray(x))
    expected_ys, expected_h = _numpy_elman(params, x, reverse)
    _close(ys, expected_ys)
    _close(h, expected_h)


# --- Variable lengths -------------------------------------------------------------

# LSTM and GRU in both directions are also run with lengths against Flax above;
# the bidirectional layer here runs an LSTM forwards and a GRU backwards.
LAYERS = {
    "simple_rnn": lambda **kw: fnnet.simple_rnn(HIDDEN, **kw),
    "bidirectional": lambda **kw: fnnet.bidirectional(
        fnnet.lstm_cell(HIDDEN), fnnet.gru_cell(2), **kw
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_padding_is_invisible(name, rng):
    """Padding with junk changes nothing at the valid steps or in the final state,
    and the padded outputs are zero; lengths and a prefix mask agree."""
    n = 3
    x = rng.standard_normal((SEQ, FEATURES)).astype(np.float32)
    layer, last = LAYERS[name](), LAYERS[name](return_sequences=False)
    params = _random_params(layer, x, rng)
    short = jnp.asarray(x[:n])
    padded = jnp.asarray(x)

    @jax.jit  # one compile for the five runs
    def run(params, padded, short):
        return (
            layer.apply(params, padded, lengths=n),
            layer.apply(params, short),
            layer.apply(params, padded, mask=jnp.arange(SEQ) < n),
            last.apply(params, padded, lengths=jnp.int32(n)),
            last.apply(params, short),
        )

    ys, ys_short, ys_mask, final, final_short = run(params, padded, short)
    _close(ys[:n], ys_short)
    _close(ys[n:], np.zeros_like(ys[n:]), 0)
    _close(ys_mask, ys, 0)
    _close(final, final_short)


def test_mask_need_not_be_a_prefix(rng):
    """Masked-out steps are skipped wherever they are, in both directions."""
    x = rng.standard_normal((SEQ, FEATURES)).astype(np.float32)
    mask = np.array([False, True, True, False, True])
    layer = LAYERS["bidirectional"]()
    params = _random_params(layer, x, rng)
    ys = layer.apply(params, jnp.asarray(x), mask=jnp.asarray(mask))
    _close(ys[mask], layer.apply(params, jnp.asarray(x[mask])))
    _close(ys[~mask], np.zeros_like(ys[~mask]), 0)


def test_bidirectional_is_forward_and_reversed_rnn(rng):
    x = jnp.asarray(rng.standard_normal((SEQ, FEATURES)).astype(np.float32))
    layer = fnnet.bidirectional(fnnet.gru_cell(HIDDEN), merge="sum")
    params = _random_params(layer, x, rng)
    forward = fnnet.gru(HIDDEN).apply(params["forward"], x, lengths=4)
    backward = fnnet.gru(HIDDEN, reverse=True).apply(params["backward"], x, lengths=4)
    _close(layer.apply(params, x, lengths=4), forward + backward)

    last = fnnet.bidirectional(fnnet.gru_cell(HIDDEN), return_sequences=False)
    _close(last.apply(params, x, lengths=4), jnp.concatenate([forward[3], backward[0]]))


def test_gradients_through_masked_rnn(rng):
    """Both directions and both gated cells under a length mask, in one compile."""
    x = jnp.asarray(rng.standard_normal((4, 2)).astype(np.float32))
    layer = fnnet.bidirectional(fnnet.lstm_cell(3), fnnet.gru_cell(2))
    params = layer.init(jax.random.key(1), x)

    # jit: the numerical derivative calls f several times, and eagerly each call
    # would compile the scans again.
    @jax.jit
    def f(params, x):
        return layer.apply(params, x, lengths=jnp.int32(3))

    check_grads(f, (params, x), order=1, modes=["rev"], atol=5e-3, rtol=5e-3)


def test_initial_carry_continues_a_sequence(rng):
    x = jnp.asarray(rng.standard_normal((SEQ, FEATURES)).astype(np.float32))
    layer = fnnet.lstm(HIDDEN, return_carry=True)
    params = _random_params(layer, x, rng)
    whole, _ = layer.apply(params, x)
    first, carry = layer.apply(params, x[:2])
    rest, _ = layer.apply(params, x[2:], initial_carry=carry)
    _close(jnp.concatenate([first, rest]), whole)


# --- Structure -------------------------------------------------------------------


def _count(jaxpr, primitive):
    return sum(e.primitive.name == primitive for e in jaxpr.eqns)


@pytest.mark.parametrize("make", [fnnet.simple_cell, fnnet.lstm_cell, fnnet.gru_cell])
def test_input_projection_is_hoisted_out_of_the_scan_unless_the_input_is_narrow(make):
    """An input as wide as the gates: one matmul for the whole sequence outside the
    scan, one (recurrent) inside per step. A narrower input: both inside, so the
    scan never carries the wider projected sequence."""
    gates = make(HIDDEN).init(jax.random.key(0), 1)["input"]["w"].shape[1]
    for features, hoisted in ((gates, True), (gates - 1, False)):
        layer = fnnet.recurrent(make(HIDDEN))
        x = jax.ShapeDtypeStruct((SEQ, features), jnp.float32)
        params = jax.eval_shape(layer.init, jax.random.key(0), x)
        jaxpr = jax.make_jaxpr(layer.apply)(params, x).jaxpr
        (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        outside = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        inside = _count(scan.params["jaxpr"].jaxpr, "dot_general")
        if hoisted:
            assert len(outside) == 1 and inside == 1
            assert outside[0].invars[0].aval.shape == (SEQ, features)
        else:
            assert len(outside) == 0 and inside == 2


@pytest.mark.parametrize("make", [fnnet.simple_cell, fnnet.lstm_cell, fnnet.gru_cell])
def test_narrow_and_hoisted_projections_agree(make):
    # The same layer read through a wider input whose extra features are zero
    # takes the hoisted path; its outputs match the narrow path's.
    x = jax.random.normal(jax.random.key(1), (SEQ, 1))
    cell = make(HIDDEN)
    gates = cell.init(jax.random.key(0), 1)["input"]["w"].shape[1]
    layer = fnnet.recurrent(cell, return_sequences=True)
    narrow = layer.init(jax.random.key(2), x)
    wide_x = jnp.pad(x, ((0, 0), (0, gates - 1)))
    wide = jax.tree.map(lambda a: a, narrow)
    wide["cell"]["input"]["w"] = jnp.pad(narrow["cell"]["input"]["w"], ((0, gates - 1), (0, 0)))
    _close(layer.apply(narrow, x), layer.apply(wide, wide_x))


def test_default_initialization():
    params = fnnet.lstm_cell(HIDDEN).init(jax.random.key(0), FEATURES)
    b = np.asarray(params["input"]["b"]).reshape(4, HIDDEN)  # gates i, f, g, o
    _close(b, np.stack([np.zeros(HIDDEN), np.ones(HIDDEN), np.zeros(HIDDEN), np.zeros(HIDDEN)]))
    w = np.asarray(params["recurrent"]["w"]).reshape(HIDDEN, 4, HIDDEN)
    for g in range(4):  # each gate's recurrent block is orthogonal
        _close(w[:, g] @ w[:, g].T, np.eye(HIDDEN))


def test_computes_in_the_input_dtype():
    x = jnp.ones((SEQ, FEATURES), jnp.bfloat16)
    layer = fnnet.gru(HIDDEN)
    params = layer.init(jax.random.key(0), x)
    assert params["cell"]["input"]["w"].dtype == jnp.float32
    assert layer.apply(params, x).dtype == jnp.bfloat16


# --- Errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fnnet.lstm(0), "lstm: hidden must be a positive integer, got 0"),
        (lambda: fnnet.gru(2.0), "gru: hidden must be a positive integer"),
        (lambda: fnnet.simple_cell(-1), "simple_cell: hidden must be a positive integer"),
        (lambda: fnnet.lstm_cell(4, forget_bias="1"), "forget_bias must be a number"),
        (lambda: fnnet.simple_rnn(4, activation=3), "activation must be a callable"),
        (lambda: fnnet.recurrent(fnnet.lstm(4)), "expected a Cell"),
        (lambda: fnnet.bidirectional(fnnet.gru_cell(4), merge="max"), "merge must be one of"),
        (
            lambda: fnnet.bidirectional(fnnet.gru_cell(4), fnnet.gru_cell(2), merge="sum"),
            "needs equal hidden sizes, got forward 4 and backward 2",
        ),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(fnnet.LayerError, match=match):
        make()


def test_bad_inputs():
    layer = fnnet.lstm(HIDDEN)
    x = jnp.ones((SEQ, FEATURES))
    params = layer.init(jax.random.key(0), x)
    cases = [
        (dict(x=jnp.ones((SEQ, 2))), r"expected input of shape \(seq, 3\), got shape \(5, 2\)"),
        (dict(x=jnp.ones((2, SEQ, FEATURES))), "expected one example of shape"),
        (dict(lengths=jnp.array([3, 4])), "expected lengths to be an integer scalar"),
        (dict(lengths=3.0), "expected lengths to be an integer scalar"),
        (dict(mask=jnp.ones(4, bool)), r"expected mask to be bool of shape \(5,\)"),
        (dict(mask=jnp.ones(SEQ, jnp.int32)), "expected mask to be bool"),
        (dict(lengths=3, mask=jnp.ones(SEQ, bool)), "lengths or mask, not both"),
        (dict(initial_carry=jnp.zeros(HIDDEN)), "expected initial_carry with shapes"),
    ]
    for kwargs, match in cases:
        kwargs = {"x": x, **kwargs}
        with pytest.raises(fnnet.LayerError, match=match):
            layer.apply(params, **kwargs)
    with pytest.raises(fnnet.LayerError, match="expected one example of shape"):
        layer.init(jax.random.key(0), jnp.ones(SEQ))


def test_errors_name_the_direction():
    layer = fnnet.bidirectional(fnnet.gru_cell(HIDDEN))
    params = layer.init(jax.random.key(0), jnp.ones((SEQ, FEATURES)))
    with pytest.raises(fnnet.LayerError, match="gru_cell at 'forward': expected input"):
        layer.apply(params, jnp.ones((SEQ, 2)))
