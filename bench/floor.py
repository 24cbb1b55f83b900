"""The arithmetic floor: how fast could the MNIST-1D MLP train on this machine at all?

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

Run: ``python -m bench.floor`` (part of ``make bench``; about 20 s).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench._train_baselines import handwritten_step
from fnnet.train import init_replicas, init_state
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


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
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
    return us


if __name__ == "__main__":
    main()
