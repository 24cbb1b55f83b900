"""Fused training from batches streamed off disk against the same training in memory.

``python -m bench.stream`` times, for the MNIST-1D MLP and CNN of ``bench.train``
(``tests/handwritten.py``'s, Adam at learning rate 1e-2) at batch 100 and 1024,
microseconds per training step of two contenders:

- ``memory``: ``make_fused_steps`` on ``(x, y)`` put on the device once, every
  batch drawn inside the program (what ``fit`` does with arrays);
- ``stream``: ``make_fused_steps`` on :class:`fnnet.train.NpyBatches` over the
  same examples saved as ``.npy`` files and memory-mapped: each call takes the
  chunk of batches read ahead and reads the next while the devices compute
  (what ``fit`` does with a source).

Both shuffle every epoch with the same seed, so they train on the same batches,
and each call runs one epoch of steps (40 at batch 100, 3 at 1024: ``fit``'s
default chunk). The benchmark checks that both end with the same loss to the
last bit, so they did the same arithmetic. The files are read through the page
cache (they were just written): this measures the feed, not the disk.

Each round builds both contenders afresh (a new program, state and source; one
call compiles, one warms up), then times them in turn, ``--slices`` slices of
each, the first one swapped every slice, ``--steps`` timed steps in all for each
(rounded up to whole calls); a slice ends with ``jax.block_until_ready``. Short
alternating slices give both the same share of a shared machine's load. The
table gives the medians over ``--rounds`` rounds of each contender's time per
step and the median of the rounds' own ``stream / memory`` ratios (above 1:
streaming is slower).

Run: ``python -m bench.stream`` (part of ``make bench``; about 2 minutes on two
CPU cores), ``--models mlp --batches 100 --rounds 3`` for less.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

from bench.train import DEFAULT_STEPS, _choice_list, _fnnet_model, mnist1d, model_input
from fnnet import train

MODELS = ("mlp", "cnn")
BATCHES = (100, 1024)
CONTENDERS = ("memory", "stream")
SEED = 0


def write_npy(folder: Path, model: str, data: tuple[np.ndarray, np.ndarray]) -> dict[str, Path]:
    """The model's inputs and the labels as ``.npy`` files in ``folder``."""
    x, y = data
    paths = {"x": folder / f"{model}_x.npy", "y": folder / "y.npy"}
    np.save(paths["x"], model_input(model, x))
    np.save(paths["y"], y)
    return paths


class Contender:
    """One contender built afresh: its program compiled and warmed up, ready to time.

    ``advance(calls)`` runs ``calls`` calls of one epoch each and waits for them.
    """

    def __init__(self, model, batch, contender, data, paths):
        if contender not in CONTENDERS:
            raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS}")
        x, y = model_input(model, data[0]), data[1]
        self.per_call = len(x) // batch
        if self.per_call < 1:
            raise ValueError(f"batch {batch} is larger than the dataset ({len(x)} examples)")
        layer, tx = _fnnet_model(model), optax.adam(1e-2)
        step = train.make_train_step(layer, tx, train.softmax_cross_entropy)
        if contender == "memory":
            source = (x, y)
        else:
            source = train.NpyBatches(paths["x"], paths["y"], batch_size=batch, seed=SEED)
        self.run = train.make_fused_steps(step, source, batch_size=batch, num_steps=self.per_call)
        self.state = train.init_state(layer, tx, x[0], seed=SEED)
        start = time.perf_counter()
        self.advance(1)
        self.first_call_s = time.perf_counter() - start
        self.advance(1)  # warm-up: the stream's first read ahead is taken here
        self.steps = 0

    def advance(self, calls: int) -> None:
        for _ in range(calls):
            self.state, self.metrics = self.run(self.state)
        jax.block_until_ready((self.state, self.metrics))

    @property
    def loss(self) -> float:
        return float(self.metrics["loss"][-1])


def measure(model, batch, data, paths, steps: int, slices: int, first: str = "memory") -> dict:
    """One round: both contenders built afresh, then ``slices`` timed slices of
    each in turn (the first one swapped every slice), ``steps`` steps in all per
    contender (rounded up to whole calls).

    Returns:
      ``{contender: {"us_per_step", "steps", "first_call_s"}, "final_loss": ...}``.
    """
    order = [first, *(c for c in CONTENDERS if c != first)]
    built = {c: Contender(model, batch, c, data, paths) for c in order}
    per_call = built["memory"].per_call
    calls = max(1, -(-steps // (per_call * slices)))
    seconds = dict.fromkeys(CONTENDERS, 0.0)
    for s in range(slices):
        for c in order if s % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            built[c].advance(calls)
            seconds[c] += time.perf_counter() - start
    losses = {c: built[c].loss for c in CONTENDERS}
    if losses["memory"] != losses["stream"]:
        raise AssertionError(
            f"{model} at batch {batch}: the streamed run ended with loss {losses['stream']!r}, "
            f"the in-memory one with {losses['memory']!r}; they must train on the same batches"
        )
    done = calls * slices * per_call
    out = {
        c: {
            "us_per_step": seconds[c] / done * 1e6,
            "steps": done,
            "first_call_s": built[c].first_call_s,
        }
        for c in CONTENDERS
    }
    return {**out, "steps_per_call": per_call, "final_loss": losses["memory"]}


def compare(models, batches, rounds: int, data, steps=None, slices: int = 10, log=print) -> list:
    """Every (model, batch), ``rounds`` rounds of :func:`measure`, the contender that
    starts swapped every round.

    Returns:
      One row per (model, batch): ``{"model", "batch", "memory", "stream"}`` (median
      microseconds per step), ``"ratio"`` (the median over rounds of stream /
      memory), ``"ratios"`` (each round's) and ``"records"``.
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as folder:
        for model in models:
            paths = write_npy(Path(folder), model, data)
            for batch in batches:
                n = steps or DEFAULT_STEPS[(model, batch)]
                records = []
                for r in range(rounds):
                    rec = measure(model, batch, data, paths, n, slices, CONTENDERS[r % 2])
                    records.append(rec)
                    log(
                        f"{model} batch {batch} round {r}: memory "
                        f"{rec['memory']['us_per_step']:.1f} us, stream "
                        f"{rec['stream']['us_per_step']:.1f} us per step"
                    )
                ratios = [r["stream"]["us_per_step"] / r["memory"]["us_per_step"] for r in records]
                medians = {
                    c: statistics.median(r[c]["us_per_step"] for r in records) for c in CONTENDERS
                }
                rows.append(
                    {
                        "model": model,
                        "batch": batch,
                        **medians,
                        "ratio": statistics.median(ratios),
                        "ratios": ratios,
                        "records": records,
                    }
                )
    return rows


def markdown(rows: list[dict]) -> str:
    out = [
        "| model | batch | steps per call | in memory, us/step | streamed, us/step "
        "| stream / memory | each round |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        per_call = row["records"][0]["steps_per_call"]
        each = ", ".join(f"{r:.2f}" for r in row["ratios"])
        out.append(
            f"| {row['model']} | {row['batch']} | {per_call} | {row['memory']:.1f} | "
            f"{row['stream']:.1f} | {row['ratio']:.2f} | {each} |"
        )
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--slices", type=int, default=10, help="timed slices of each contender, in turn, a round"
    )
    parser.add_argument("--models", type=_choice_list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",") if b], default=list(BATCHES)
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps a measurement (default: bench.train's)"
    )
    parser.add_argument(
        "--examples", type=int, default=None, help="the first N MNIST-1D signals (default: all)"
    )
    args = parser.parse_args(argv)
    x, y = mnist1d()
    data = (x[: args.examples], y[: args.examples])
    start = time.perf_counter()
    rows = compare(args.models, args.batches, args.rounds, data, args.steps, args.slices)
    print()
    print(
        f"Fused training, {len(data[0])} MNIST-1D signals, shuffled; median of "
        f"{args.rounds} rounds of {args.slices} slices each ({time.perf_counter() - start:.0f} s)"
    )
    print()
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
