"""The arithmetic floor: how fast could the MNIST-1D models train on this machine at all?

The training issue asks fused mode for 1.5x the fastest per-step baseline on the
MLP at batch 100, and 8 vmapped seeds for at most 2.5x the wall time of one.
Both targets assume that a small model's step is bound by dispatch, which fused
and vmapped programs remove. This benchmark measures, in one process, rounds
interleaved, median microseconds per training step:

- ``per-step``: the hand-written step (value_and_grad + Adam, jitted, state
  donated), one call per step: the fastest per-step baseline in ``bench.train``;
- ``scan``: the same step, 40 of them in one ``lax.scan`` over the epoch's
  batches (no engine at all): what fusing alone can give;
- ``matmuls``: the eight matrix products of the MLP's forward and backward pass
  at batch 100 (40x100, 100x100 and 100x10 weights), nothing else, in a scan;
- the last two again for 8 replicas under ``jax.vmap``, each on its own batch.

The ratios printed are upper bounds the hardware sets: ``per-step / matmuls``
is the most any fused mode could gain over per-step if everything but the
matrix products were free, and ``8 x matmuls / 1 x scan`` is the least wall
time 8 seeds can cost relative to one seed's fused run.

Then, for every model of ``bench.train`` (MLP, CNN, GRU, both transformers), at
batch 100, rounds interleaved:

- ``fused``: fnnet's ``make_fused_steps`` over one epoch (40 steps, stored order),
  the program ``fit`` dispatches;
- ``floor``: the model's products alone (matrix products, convolutions, and the
  attention's two batched products), forward and backward, in the shapes of a
  training step, in one ``lax.scan`` over the epoch with the convolutions in
  XLA:CPU's fast layout as fused mode puts them. Everything else (biases,
  activations, normalization, softmax, the loss, Adam) is left out.

``floor / fused`` is the fraction of the floor's speed the fused step reaches:
1 would mean every cost but the products is hidden.

Run: ``python -m bench.floor`` (part of ``make bench``; about 3 minutes on two
CPU cores), ``--models cnn,gru`` for some models.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench._train_baselines import handwritten_step
from bench.train import _choice_list, _fnnet_model, model_input
from fnnet._src.cpu_layout import canonicalize_convolutions
from fnnet.train import init_replicas, init_state, make_fused_steps, make_train_step
from fnnet.train._losses import softmax_cross_entropy
from tests import handwritten

BATCH, EXAMPLES, REPLICAS = 100, 4000, 8
STEPS = EXAMPLES // BATCH  # one epoch per scan


def _data(replicas: int | None):
    rng = np.random.default_rng(0)
    shape = (EXAMPLES, 40) if replicas is None else (replicas, EXAMPLES, 40)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 10, shape[:-1]).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


TX = optax.adam(1e-2)
_step = handwritten_step("mlp", TX)


def _epoch(step):
    """``step`` over the epoch's batches (contiguous slices) in one scan."""

    def run(state, x, y):
        def body(state, i):
            start = i * BATCH
            batch = (
                jax.lax.dynamic_slice_in_dim(x, start, BATCH),
                jax.lax.dynamic_slice_in_dim(y, start, BATCH),
            )
            return step(state, batch)

        return jax.lax.scan(body, state, jnp.arange(STEPS))

    return run


def _matmuls(weights, batch):
    """The MLP step's eight matrix products and nothing else (plus an update that
    keeps each iteration depending on the last, so none can be hoisted or dropped)."""
    w1, w2, w3 = weights
    x, _ = batch
    h1 = x @ w1
    h2 = h1 @ w2
    out = h2 @ w3
    g2 = out @ w3.T
    g1 = g2 @ w2.T
    grads = (x.T @ g1, h1.T @ g2, h2.T @ out)
    return tuple(w - 1e-6 * g for w, g in zip(weights, grads)), out[0, 0]


def _time(fn, state, calls: int, steps_per_call: int) -> float:
    """Microseconds per step of ``calls`` calls of ``fn``, after one warm-up call."""
    state = jax.tree.map(jnp.copy, state)
    state, _ = fn(state)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(calls):
        state, _ = fn(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / (calls * steps_per_call) * 1e6


# --- Every model's products alone ---------------------------------------------------
#
# Each ``products(weights, x) -> (batch, 10)`` is the model with every operation that
# is not a product removed; the floor step differentiates it with respect to the
# weights (as training does: no gradient for the input) with the output itself as
# the cotangent, so the last product is not dead code.

MODELS = ("mlp", "cnn", "gru", "transformer", "transformer_tokens")


def _mlp_products(w, x):  # x (batch, 40)
    return x @ w["hidden_0"] @ w["hidden_1"] @ w["out"]


def _cnn_products(w, x):  # x (batch, 40, 1)
    for i in range(3):
        x = jax.lax.conv_general_dilated(
            x, w[f"conv_{i}"], (2,), ((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
        )  # (batch, 19, 25), (batch, 10, 25), (batch, 5, 25)
    return x.reshape(x.shape[0], -1) @ w["out"]


def _gru_products(w, x):  # x (batch, 40)
    xs = jnp.swapaxes(x, 0, 1)[..., None]  # (seq, batch, 1)

    def direction(cell, xs):
        hidden = cell["recurrent"].shape[0]

        def step(h, xt):
            # Both products of a GRU step, projecting the input inside the loop as
            # fnnet does; the gates' 18 values feed the next state through a slice.
            g = xt @ cell["input"] + h @ cell["recurrent"]  # (batch, 3 * hidden)
            return g[:, :hidden], g[:, :hidden]

        _, hs = jax.lax.scan(step, jnp.zeros((x.shape[0], hidden), x.dtype), xs)
        return hs  # (seq, batch, hidden)

    h = jnp.concatenate([direction(w["forward"], xs), direction(w["backward"], xs[::-1])], -1)
    return jnp.swapaxes(h, 0, 1).reshape(x.shape[0], -1) @ w["out"]


def _transformer_products(w, x):  # x (batch, 40)
    patch = w["embed"].shape[0]
    h = x.reshape(x.shape[0], -1, patch) @ w["embed"]  # (batch, tokens, width)
    for b in w["blocks"]:
        q, k, v = (jnp.einsum("bsf,fhd->bshd", h, b[n]) for n in "qkv")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # (batch, heads, tokens, tokens)
        o = jnp.einsum("bhqk,bkhd->bqhd", scores, v)
        h = jnp.einsum("bshd,hdf->bsf", o, b["o"])
        h = h @ b["up"] @ b["down"]
    return h.mean(axis=1) @ w["out"]


def _product_weights(model: str, params):
    """The weight matrices (and kernels) of fnnet's ``params``, as the products read them."""
    if model == "gru":
        rnn = params["rnn_0"]
        cells = {
            d: {
                "input": rnn[d]["cell"]["input"]["w"],
                "recurrent": rnn[d]["cell"]["recurrent"]["w"],
            }
            for d in ("forward", "backward")
        }
        return {**cells, "out": params["out"]["w"]}
    if model.startswith("transformer"):
        blocks = params["blocks"]
        q = blocks["attn"]["q"]["w"]  # (depth, width, heads, head_dim)
        tokens = 40 // params["embed"]["w"].shape[0]
        # Without softmax and normalization the products would grow or shrink
        # geometrically, to infinity or to subnormal numbers (slow on a CPU). Folding
        # attention's 1/sqrt(head_dim) into q and the softmax's rows summing to one (a
        # 1/tokens) into v keeps every activation and gradient near 1.
        scale = {"q": q.shape[-1] ** -0.5, "k": 1.0, "v": 1.0 / tokens}
        return {
            "embed": params["embed"]["w"],
            "blocks": [
                {
                    **{n: scale[n] * blocks["attn"][n]["w"][i] for n in "qkv"},
                    "o": blocks["attn"]["out"]["w"][i],
                    "up": blocks["mlp"]["up"]["w"][i],
                    "down": blocks["mlp"]["down"]["w"][i],
                }
                for i in range(q.shape[0])
            ],
            "out": params["out"]["w"],
        }
    return {name: layer["w"] for name, layer in params.items()}


PRODUCTS = {
    "mlp": _mlp_products,
    "cnn": _cnn_products,
    "gru": _gru_products,
    "transformer": _transformer_products,
    "transformer_tokens": _transformer_products,
}


def _floor_step(model: str):
    products = PRODUCTS[model]

    def step(weights, batch):
        x, _ = batch
        out, pullback = jax.vjp(lambda w: products(w, x), weights)
        (grads,) = pullback(out)
        # An update the next step depends on, so nothing is hoisted or dropped, but too
        # small to change the weights: a real descent on out**2 would shrink every
        # activation step after step, towards subnormal numbers.
        return jax.tree.map(lambda w, g: w - 1e-12 * g, weights, grads), out[0, 0]

    return step


# Calls per timing: about half a second of each program on the 2-core machine.
CALLS = {"mlp": 25, "cnn": 10, "gru": 5, "transformer": 2, "transformer_tokens": 1}


def model_floors(models, rounds: int, calls: dict[str, int] | None = None) -> dict:
    """Per model, median microseconds per step of ``fused`` and ``floor`` at batch 100."""
    calls = CALLS if calls is None else calls
    rng = np.random.default_rng(0)
    cases = {}
    for model in models:
        layer = _fnnet_model(model)
        x = model_input(model, rng.standard_normal((EXAMPLES, 40)).astype(np.float32))
        y = rng.integers(0, 10, EXAMPLES).astype(np.int32)
        x, y = jnp.asarray(x), jnp.asarray(y)
        state = init_state(layer, TX, x[0], seed=0)
        step = make_train_step(layer, TX, softmax_cross_entropy)
        fused = make_fused_steps(step, (x, y), batch_size=BATCH, num_steps=STEPS, shuffle=False)
        floor = jax.jit(canonicalize_convolutions(_epoch(_floor_step(model))))
        weights = _product_weights(model, state.params)
        _, outs = floor(weights, x, y)
        if not np.isfinite(np.asarray(outs)).all() or not np.abs(np.asarray(outs)).max() > 1e-6:
            raise FloatingPointError(
                f"{model}: the floor's products overflowed or vanished: {outs}"
            )
        cases[model] = {
            "fused": (fused, state),
            "floor": (lambda w, floor=floor, x=x, y=y: floor(w, x, y), weights),
        }
    times = {(m, p): [] for m in cases for p in ("fused", "floor")}
    for _ in range(rounds):
        for model, programs in cases.items():
            for name, (fn, state) in programs.items():
                times[model, name].append(_time(fn, state, calls[model], STEPS))
    return {m: {p: float(np.median(times[m, p])) for p in ("fused", "floor")} for m in cases}


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--models",
        type=_choice_list(MODELS),
        default=list(MODELS),
        help=f"comma-separated, from {','.join(MODELS)} (default: all; '': the MLP table only)",
    )
    parser.add_argument(
        "--model-rounds", type=int, default=3, help="rounds of the per-model floors"
    )
    args = parser.parse_args(argv)

    model = handwritten.CASES[next(k for k in handwritten.CASES if k.startswith("mlp"))][0]
    x, y = _data(None)
    x8, y8 = _data(REPLICAS)
    one = init_state(model, TX, x[0], seed=0)
    many = init_replicas(model, TX, x[0], jnp.arange(REPLICAS))
    state1, state8 = (one.params, one.opt_state), (many.params, many.opt_state)
    weights1 = tuple(one.params[k]["w"] for k in ("hidden_0", "hidden_1", "out"))
    weights8 = tuple(many.params[k]["w"] for k in ("hidden_0", "hidden_1", "out"))

    per_step = jax.jit(_step, donate_argnums=0)
    batch = (x[:BATCH], y[:BATCH])
    scan1 = jax.jit(_epoch(_step))
    scan8 = jax.jit(jax.vmap(_epoch(_step)))
    mm1 = jax.jit(_epoch(_matmuls))
    mm8 = jax.jit(jax.vmap(_epoch(_matmuls)))
    cases = {
        "per-step": (lambda s: per_step(s, batch), state1, 1),
        "scan": (lambda s: scan1(s, x, y), state1, STEPS),
        "matmuls": (lambda s: mm1(s, x, y), weights1, STEPS),
        "scan, 8 replicas": (lambda s: scan8(s, x8, y8), state8, STEPS),
        "matmuls, 8 replicas": (lambda s: mm8(s, x8, y8), weights8, STEPS),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (fn, state, steps_per_call) in cases.items():
            calls = 1000 if steps_per_call == 1 else 25
            times[name].append(_time(fn, state, calls, steps_per_call))
    us = {name: float(np.median(t)) for name, t in times.items()}

    print(f"MNIST-1D MLP, batch {BATCH}, Adam; median of {args.rounds} rounds")
    print()
    print("| program | us per step |")
    print("|---|---:|")
    for name, value in us.items():
        print(f"| {name} | {value:.0f} |")
    print()
    bound = us["per-step"] / us["matmuls"]
    print(f"fused over per-step, if only the matmuls cost: at most {bound:.2f}x")
    print(f"fused over per-step, hand-written scan: {us['per-step'] / us['scan']:.2f}x")
    print(
        f"8 seeds over one (wall time), if only the matmuls cost: at least "
        f"{us['matmuls, 8 replicas'] / us['scan']:.2f}x"
    )
    seeds = us["scan, 8 replicas"] / us["scan"]
    print(f"8 seeds over one (wall time), hand-written scans: {seeds:.2f}x")
    if args.models:
        floors = model_floors(args.models, args.model_rounds)
        print()
        print(
            f"Every model at batch {BATCH}, one epoch per call; median of "
            f"{args.model_rounds} rounds"
        )
        print()
        print("| model | fused us per step | floor us per step | floor / fused |")
        print("|---|---:|---:|---:|")
        for model, t in floors.items():
            print(
                f"| {model} | {t['fused']:.0f} | {t['floor']:.0f} | {t['floor'] / t['fused']:.2f} |"
            )
        us.update({f"{m} {p}": t[p] for m, t in floors.items() for p in t})
    return us


if __name__ == "__main__":
    main()
