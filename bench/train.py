"""Training speed: fnnet's engine against hand-written JAX, Flax Linen, Flax NNX and PyTorch.

Every contender trains the same MNIST-1D model (``tests/handwritten.py``'s five:
MLP, CNN, bidirectional GRU, a small transformer on patches of 4 samples, and
the same transformer with one token per sample) with Adam (learning rate 1e-2)
on the mean softmax cross-entropy, at batch 100 (the paper's) and 1024:

- ``jnp``: the model hand-written in jax.numpy, a ``jax.jit`` step
  (value_and_grad + optax update);
- ``jnp_donate``: the same step jitted with its state donated
  (``donate_argnums=0``), so each step reuses the previous one's buffers;
- ``linen``: Flax Linen modules, ``flax.training.train_state.TrainState``;
- ``nnx``: Flax NNX modules, ``nnx.jit`` + ``nnx.Optimizer`` (the tutorials' way);
- ``nnx_split``: NNX split once into graphdef + state, a ``jax.jit`` step that
  merges inside (NNX's documented fast pattern);
- ``nnx_cached``: NNX with ``nnx.cached_partial`` (the other documented cure;
  not in the default list, add it with ``--contenders``);
- ``fnnet``: ``jax.jit(make_train_step(...), donate_argnums=0)`` from ``fnnet.train``,
  one step per call, the state donated as ``make_train_step`` documents;
- ``fused``: ``make_fused_steps`` with K = steps per epoch (40 at batch 100, 3 at
  1024), the chunk ``fnnet.train.fit`` dispatches, batches drawn on the device;
- ``fused8``: 8 seeds of ``fused`` as one program, ``make_fused_steps(...,
  replicated=True)`` (MLP, batch 100);
- ``torch``: the same models in PyTorch eager (``bench/_torch_baselines.py``),
  float32, ``torch.optim.Adam``, on all the machine's cores; it needs PyTorch,
  which the ``bench`` extra installs (``pip install -e ".[bench]"``);
- ``torch1``: the same on one thread (not in the default list). On a machine
  whose cores other jobs share, PyTorch's OpenMP threads wait for each other
  at every operator, and one thread can be several times faster than two.

The input is the same for every contender: the training set is put on the
device once and cut into the epoch's batches (in stored order, no shuffling, as
the paper trains) before timing; a per-step contender is handed batch
``i % steps_per_epoch`` at step ``i``, which costs the host nothing; the fused
contenders draw the same batches inside their program. Only ``jnp_donate`` and
``fnnet`` donate buffers; no contender fetches the loss during the timed loop.
PyTorch gets the same batches in the same order, as tensors made before timing.
``fnnet / jax.numpy`` compares fnnet with the faster of ``jnp`` and ``jnp_donate``
in each repeat; ``fnnet / PyTorch`` and ``fused / PyTorch`` with the faster of
``torch`` and ``torch1``.

Timing, per (model, batch, contender), each in a fresh process: the first call
(trace + compile + one step or one fused chunk), a warm-up, then ``--steps``
timed steps ending with ``jax.block_until_ready`` (PyTorch:
``torch.cpu.synchronize``). Speed is steps per second;
compile time is the first call minus one steady call. Contenders are
interleaved and rotated within each repeat, and the tables report medians over
repeats; each ratio is the median over repeats of that repeat's ratio.

Run: ``python -m bench.train`` (the four models of ``DEFAULT_MODELS``, every default
contender: about 25 minutes on two CPU cores; ``--models transformer_tokens`` adds
the token transformer, whose 1024-batch cells take a minute each), or
``python -m bench.train --models mlp --repeats 1 --steps 20`` to try it.
One measurement: ``python -m bench.train --one mlp 100 fnnet --steps 200 --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

MODELS = ("mlp", "cnn", "gru", "transformer", "transformer_tokens")
# The token transformer's cells take minutes; make bench runs them in a grid of their own.
DEFAULT_MODELS = ("mlp", "cnn", "gru", "transformer")
BATCHES = (100, 1024)
CONTENDERS = (
    "jnp",
    "jnp_donate",
    "linen",
    "nnx",
    "nnx_split",
    "nnx_cached",
    "fnnet",
    "fused",
    "fused8",
    "torch",
    "torch1",
)
DEFAULT_CONTENDERS = (
    "jnp",
    "jnp_donate",
    "linen",
    "nnx",
    "nnx_split",
    "fnnet",
    "fused",
    "fused8",
    "torch",
)
HANDWRITTEN = ("jnp", "jnp_donate")
FLAX = ("linen", "nnx", "nnx_split", "nnx_cached")
PER_STEP_BASELINES = (*HANDWRITTEN, *FLAX)
TORCH = ("torch", "torch1")
SEEDS = 8
LEARNING_RATE = 1e-2

# Timed steps per measurement, rounded up to a whole number of fused chunks:
# about a second of each cell (shorter windows let the shared machine's noise
# swamp the comparison). Start-up, model initialization and compilation (5 to
# 12 s a process) still dominate; the default run (3 repeats of 57 processes)
# takes about 20 minutes on two CPU cores.
DEFAULT_STEPS = {  # about a second of timed steps per cell on the 2-core development machine
    ("mlp", 100): 6000,
    ("mlp", 1024): 1000,
    ("cnn", 100): 1600,
    ("cnn", 1024): 240,
    ("gru", 100): 1000,
    ("gru", 1024): 120,
    ("transformer", 100): 120,
    ("transformer", 1024): 9,
    ("transformer_tokens", 100): 40,
    ("transformer_tokens", 1024): 4,
}

LABELS = {
    "jnp": "jax.numpy",
    "jnp_donate": "jax.numpy donated",
    "linen": "Linen",
    "nnx": "NNX",
    "nnx_split": "NNX split",
    "nnx_cached": "NNX cached",
    "fnnet": "fnnet",
    "fused": "fnnet fused",
    "fused8": "fnnet fused, 8 seeds",
    "torch": "PyTorch",
    "torch1": "PyTorch, 1 thread",
}


def applies(model: str, batch: int, contender: str) -> bool:
    """Whether the grid measures this cell: 8 seeds only for the MLP at batch 100."""
    return contender != "fused8" or (model == "mlp" and batch == 100)


# --- Data ---------------------------------------------------------------------------


def mnist1d() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST-1D training set: x ``(4000, 40)`` float32, y ``(4000,)`` int32."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int32)


def load_data(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    if path is None:
        return mnist1d()
    with np.load(path) as f:  # an .npz written by main(); allow_pickle stays False
        return f["x"], f["y"]


def model_input(model: str, x: np.ndarray) -> np.ndarray:
    """Every contender of a model sees the same layout: the CNN a channel axis."""
    return x[..., None] if model == "cnn" else x  # (n, 40, 1) or (n, 40)


# --- One measurement, in this process ----------------------------------------------


def _fnnet_model(model: str):
    from tests import handwritten

    for name, (layer, _, _) in handwritten.CASES.items():
        if name.split(" ")[0] == model:  # "transformer (patches ...)", "transformer_tokens (...)"
            return layer
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")


def _per_step(model, contender, x_all, batches, seed):
    """A ``Contender`` (state, step, ready) for the per-step contenders."""
    import jax
    import optax

    from bench import _train_baselines as base

    tx = optax.adam(LEARNING_RATE)
    if contender in HANDWRITTEN:
        params = _fnnet_model(model).init(jax.random.key(seed), x_all[0])
        return base.handwritten_contender(model, params, tx, donate=contender == "jnp_donate")
    if contender == "linen":
        return base.linen_contender(model, batches[0][0], tx, seed)
    if contender == "nnx":
        return base.nnx_contender(model, tx, seed)
    if contender == "nnx_cached":
        return base.nnx_cached_contender(model, tx, seed)
    if contender == "nnx_split":
        return base.nnx_split_contender(model, tx, seed)
    if contender == "fnnet":
        from fnnet.train._losses import softmax_cross_entropy
        from fnnet.train._state import init_state
        from fnnet.train._step import make_train_step

        layer = _fnnet_model(model)
        state = init_state(layer, tx, x_all[0], seed=seed)
        step = jax.jit(make_train_step(layer, tx, softmax_cross_entropy), donate_argnums=0)

        def fnnet_step(state, batch):
            state, metrics = step(state, batch)
            return state, metrics["loss"]

        return base.Contender(state, fnnet_step, lambda s: s, base.count_params(state.params))
    raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS}")


def _fused(model, contender, dataset, batch, chunk, seed):
    """``(state, run)`` for the fused contenders; ``run(state) -> (state, losses)``."""
    import jax.numpy as jnp
    import optax

    from fnnet.train._losses import softmax_cross_entropy
    from fnnet.train._state import init_replicas, init_state
    from fnnet.train._step import make_fused_steps, make_train_step

    tx = optax.adam(LEARNING_RATE)
    layer = _fnnet_model(model)
    step = make_train_step(layer, tx, softmax_cross_entropy)
    replicated = contender == "fused8"
    run = make_fused_steps(
        step, dataset, batch_size=batch, num_steps=chunk, shuffle=False, replicated=replicated
    )
    example = dataset[0][0]
    if replicated:
        state = init_replicas(layer, tx, example, jnp.arange(seed, seed + SEEDS))
    else:
        state = init_state(layer, tx, example, seed=seed)

    def run_losses(state):
        state, metrics = run(state)
        return state, metrics["loss"]

    return state, run_losses


class _Timed(NamedTuple):
    """A contender ready to time: ``advance(calls) -> loss`` runs ``calls`` dispatches
    (steps, or fused chunks of ``chunk`` steps) and returns the last loss unfetched;
    ``wait(loss)`` blocks until all of it has run."""

    advance: Callable[[int], Any]
    wait: Callable[[Any], None]
    chunk: int
    params: int
    backend: str


def _jax_timed(model, batch, contender, x, y, per_epoch, seed) -> _Timed:
    import jax

    from bench import _train_baselines as base

    dataset = jax.device_put((x, y))
    fused = contender in ("fused", "fused8")
    if fused:
        state, run = _fused(model, contender, dataset, batch, per_epoch, seed)
        one_step = None
        params = base.count_params(state.params) // (SEEDS if contender == "fused8" else 1)
        ready = _same
    else:
        # The epoch's batches, put on the device before any timing (cut on the host:
        # slicing on the device would compile one program per offset).
        batches = [
            jax.device_put((x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]))
            for i in range(per_epoch)
        ]
        state, one_step, ready, params = _per_step(model, contender, x, batches, seed)
    i = 0

    def advance(calls):
        nonlocal state, i
        for _ in range(calls):
            if fused:
                state, losses = run(state)
                loss = losses[..., -1]
            else:
                state, loss = one_step(state, batches[i % per_epoch])
                i += 1
        return loss

    def wait(loss):
        jax.block_until_ready((ready(state), loss))

    wait(dataset)
    return _Timed(advance, wait, per_epoch if fused else 1, params, jax.default_backend())


def _fnnet_params(model, example) -> int:
    """The fnnet model's parameter count, from shapes alone (nothing is computed)."""
    import jax

    layer = _fnnet_model(model)
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), example))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def _torch_timed(model, batch, x, y, seed, threads) -> _Timed:
    from bench import _torch_baselines as tb

    contender = tb.torch_contender(model, LEARNING_RATE, seed, threads=threads)
    expected = _fnnet_params(model, x[0]) + tb.EXTRA_PARAMS.get(model, 0)
    if contender.params != expected:
        raise AssertionError(
            f"the PyTorch {model} has {contender.params:,} parameters, fnnet's {expected:,}"
            f" (with PyTorch's {tb.EXTRA_PARAMS.get(model, 0)} extra): not the same model"
        )
    batches = tb.torch_batches(model, x, y, batch)
    i = 0

    def advance(calls):
        nonlocal i
        for _ in range(calls):
            loss = contender.step(batches[i % len(batches)])
            i += 1
        return loss

    def wait(loss):
        contender.sync()

    backend = f"cpu (PyTorch eager, {contender.threads} threads)"
    return _Timed(advance, wait, 1, contender.params, backend)


def _same(state):
    return state


def measure(
    model: str,
    batch: int,
    contender: str,
    steps: int,
    data: tuple[np.ndarray, np.ndarray],
    *,
    seed: int = 0,
    warmup: int | None = None,
) -> dict:
    """Trains one contender and times it, in this process.

    Args:
      model, batch, contender: the cell of the grid.
      steps: timed steps (rounded up to whole fused chunks).
      data: x ``(n, 40)`` float32, y ``(n,)`` int32, with ``n >= batch``.
      warmup: steps run between the first call and the timed loop, rounded up
        to whole fused chunks; default ``min(10, steps // 4)``.

    Returns:
      A JSON-able dict: ``steps``, ``steps_per_s``, ``compile_s`` (first call
      minus one steady call), ``first_call_s``, ``setup_s`` (initialization,
      before the first call), ``final_loss`` (the mean loss of
      the last step, over seeds for ``fused8``), ``params`` (the contender's own
      model: PyTorch's GRU has 24 more than fnnet's), and the cell.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    if contender not in CONTENDERS:
        raise ValueError(f"unknown contender {contender!r}; choose from {CONTENDERS}")
    setup = time.perf_counter()
    x, y = data
    x = model_input(model, x)
    per_epoch = len(x) // batch
    if per_epoch < 1:
        raise ValueError(f"batch {batch} is larger than the dataset ({len(x)} examples)")
    if contender in TORCH:
        threads = 1 if contender == "torch1" else None
        timed = _torch_timed(model, batch, x, y, seed, threads)
    else:
        timed = _jax_timed(model, batch, contender, x, y, per_epoch, seed)
    chunk = timed.chunk
    steps = -(-steps // chunk) * chunk
    warmup = min(10, steps // 4) if warmup is None else warmup
    warmup = max(1, -(-warmup // chunk)) * chunk
    setup = time.perf_counter() - setup

    start = time.perf_counter()
    timed.wait(timed.advance(1))
    first = time.perf_counter() - start

    timed.wait(timed.advance(warmup // chunk))

    start = time.perf_counter()
    loss = timed.advance(steps // chunk)
    timed.wait(loss)
    wall = time.perf_counter() - start

    return {
        "model": model,
        "batch": batch,
        "contender": contender,
        "steps": steps,
        "steps_per_call": chunk,
        "steps_per_s": steps / wall,
        "compile_s": first - wall * chunk / steps,
        "first_call_s": first,
        "setup_s": setup,
        "final_loss": float(np.mean(np.asarray(loss))),
        "params": timed.params,
        "backend": timed.backend,
    }


# --- The grid, each cell in a fresh process ----------------------------------------


def run_one_subprocess(model, batch, contender, steps, data_path, timeout=600) -> dict:
    """Runs ``python -m bench.train --one ...`` and returns its JSON line (or an error)."""
    cmd = [sys.executable, "-m", "bench.train", "--one", model, str(batch), contender]
    cmd += ["--steps", str(steps), "--json", "--data", data_path]
    root = Path(__file__).resolve().parent.parent
    cell = {"model": model, "batch": batch, "contender": contender}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return {**cell, "error": " | ".join(tail) or f"exit status {done.returncode}"}
    # The whole process: start-up, imports, initialization, compile and timing.
    return {**json.loads(lines[-1]), "process_s": time.perf_counter() - start}


def run_grid(models, batches, contenders, repeats, steps, data_path, log=print) -> list[dict]:
    """Every applicable (model, batch, contender), ``repeats`` times, each in a fresh
    process; within a repeat the contenders of a cell run back to back, in an
    order rotated by one each repeat so no contender always goes first."""
    records = []
    for r in range(repeats):
        for model in models:
            for batch in batches:
                cell = [c for c in contenders if applies(model, batch, c)]
                shift = r % len(cell)
                for contender in cell[shift:] + cell[:shift]:
                    n = steps or DEFAULT_STEPS.get((model, batch), 50)
                    rec = run_one_subprocess(model, batch, contender, n, data_path)
                    rec["repeat"] = r
                    records.append(rec)
                    log(json.dumps(rec))
    return records


# --- Summary ------------------------------------------------------------------------


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict]) -> list[dict]:
    """Per (model, batch): median steps/s and compile time per contender, and ratios.

    Ratios are of speeds (steps per second; above 1 means the numerator is
    faster), each the median over repeats of the repeat's own ratio:
    ``fnnet_vs_jnp`` (against the repeat's faster hand-written step),
    ``fnnet_vs_flax`` (the repeat's fastest Flax contender), ``fused_vs_baseline``
    (fused against the repeat's fastest per-step baseline, hand-written or Flax),
    ``fused_vs_fnnet``, ``fnnet_vs_torch`` and ``fused_vs_torch`` (against PyTorch
    eager), and ``seeds_time`` (wall time of 8 vmapped seeds over the
    wall time of one seed, the same steps: the MLP). ``compile_vs_jnp`` and
    ``compile_vs_flax`` are fnnet's per-step compile time over the quickest
    hand-written and Flax ones (a time ratio: above 1 means fnnet compiles slower).
    """
    cells: dict[tuple, dict] = {}
    for rec in records:
        if "error" in rec:
            continue
        cell = cells.setdefault((rec["model"], rec["batch"]), {})
        cell.setdefault(rec["repeat"], {})[rec["contender"]] = rec

    def ratio(runs, num, den):
        out = []
        for by in runs.values():
            a = by.get(num)
            speeds = [by[c]["steps_per_s"] for c in den if c in by]
            if a is not None and speeds:
                out.append(a["steps_per_s"] / max(speeds))
        return _median(out)

    def compile_ratio(runs, num, den):
        # Compile seconds of ``num`` over the quickest of ``den`` in each repeat.
        out = []
        for by in runs.values():
            a = by.get(num)
            times = [by[c]["compile_s"] for c in den if c in by and by[c]["compile_s"] > 0]
            if a is not None and times:
                out.append(a["compile_s"] / min(times))
        return _median(out)

    rows = []
    for (model, batch), runs in cells.items():
        present = {c for by in runs.values() for c in by}
        row = {"model": model, "batch": batch, "speed": {}, "compile": {}}
        for c in (c for c in CONTENDERS if c in present):
            row["speed"][c] = _median([by[c]["steps_per_s"] for by in runs.values() if c in by])
            row["compile"][c] = _median([by[c]["compile_s"] for by in runs.values() if c in by])
        # fnnet's count; PyTorch's GRU has more, reported apart.
        own = [by[c]["params"] for by in runs.values() for c in by if c not in TORCH]
        theirs = [by[c]["params"] for by in runs.values() for c in TORCH if c in by]
        row["params"] = own[0] if own else theirs[0]
        row["torch_params"] = theirs[0] if theirs else None
        row["fnnet_vs_jnp"] = ratio(runs, "fnnet", HANDWRITTEN)
        row["fnnet_vs_flax"] = ratio(runs, "fnnet", FLAX)
        row["fused_vs_baseline"] = ratio(runs, "fused", PER_STEP_BASELINES)
        row["fused_vs_fnnet"] = ratio(runs, "fused", ["fnnet"])
        row["fnnet_vs_torch"] = ratio(runs, "fnnet", TORCH)
        row["fused_vs_torch"] = ratio(runs, "fused", TORCH)
        row["compile_vs_jnp"] = compile_ratio(runs, "fnnet", HANDWRITTEN)
        row["compile_vs_flax"] = compile_ratio(runs, "fnnet", FLAX)
        seeds = ratio(runs, "fused", ["fused8"])  # 1-seed speed / 8-seed speed = time8 / time1
        row["seeds_time"] = seeds
        rows.append(row)
    return rows


RATIO_LABELS = {
    "fnnet_vs_jnp": "fnnet / jax.numpy",
    "fnnet_vs_flax": "fnnet / best Flax",
    "fused_vs_baseline": "fused / best per-step baseline",
    "fused_vs_fnnet": "fused / fnnet",
    "fnnet_vs_torch": "fnnet / PyTorch",
    "fused_vs_torch": "fused / PyTorch",
}


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _speed(value):
    """Steps per second to three significant figures (a transformer at batch 1024
    on a CPU takes a few steps a second, an MLP thousands)."""
    if value is None:
        return "-"
    return format(value, ".0f" if value >= 100 else ".1f" if value >= 10 else ".2f")


def markdown(rows: list[dict], contenders) -> str:
    """Two markdown tables (speed and ratios; compile times) and the 8-seed line."""
    shown = [c for c in CONTENDERS if c in contenders and c != "fused8"]
    ratios = ["fnnet_vs_jnp", "fnnet_vs_flax", "fused_vs_baseline", "fused_vs_fnnet"]
    if any(c in TORCH for c in shown):
        ratios += ["fnnet_vs_torch", "fused_vs_torch"]
    head = " | ".join(LABELS[c] for c in shown)
    ratio_head = " | ".join(RATIO_LABELS[k] for k in ratios)
    out = [
        "Training steps per second (median; higher is faster) and speed ratios:",
        "",
        f"| model | params | batch | {head} | {ratio_head} |",
        "|---|---:|---:|" + "---:|" * (len(shown) + len(ratios)),
    ]
    for r in rows:
        cells = [_speed(r["speed"].get(c)) for c in shown] + [_fmt(r[k], ".2f") for k in ratios]
        out.append(f"| {r['model']} | {r['params']:,} | {r['batch']} | {' | '.join(cells)} |")
    out += [
        "",
        "Compile time in seconds (first call minus one steady call; median) and "
        "fnnet's per-step compile time over the quickest hand-written and Flax ones "
        "(below 1: fnnet compiles faster):",
        "",
        f"| model | batch | {head} | fnnet / jax.numpy | fnnet / quickest Flax |",
        "|---|---:|" + "---:|" * (len(shown) + 2),
    ]
    for r in rows:
        times = " | ".join(_fmt(r["compile"].get(c), ".2f") for c in shown)
        ratios = f"{_fmt(r['compile_vs_jnp'], '.2f')} | {_fmt(r['compile_vs_flax'], '.2f')}"
        out.append(f"| {r['model']} | {r['batch']} | {times} | {ratios} |")
    differ = {
        r["model"]: r["torch_params"]
        for r in rows
        if r.get("torch_params") is not None and r["torch_params"] != r["params"]
    }
    if differ:
        counts = ", ".join(f"{m} {n:,}" for m, n in differ.items())
        out += [
            "",
            f"PyTorch's parameter counts where they differ from fnnet's: {counts} "
            "(nn.GRU keeps a recurrent bias for each gate; the extra ones only add to "
            "the input biases).",
        ]
    for r in rows:
        if r["seeds_time"] is not None:
            out += [
                "",
                f"{SEEDS} seeds vmapped in one fused program ({r['model']}, batch {r['batch']}): "
                f"{_speed(r['speed']['fused8'])} steps/s, each step training all {SEEDS}; "
                f"wall time {r['seeds_time']:.2f}x one seed's for the same steps "
                f"({SEEDS / r['seeds_time']:.1f}x the throughput of separate runs).",
            ]
    return "\n".join(out)


def _environment(contenders=()) -> str:
    import flax
    import jax
    import optax

    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    torch = ""
    if set(TORCH) & set(contenders):
        from bench._torch_baselines import torch as torch_module

        torch = f", torch {torch_module.__version__}"
    return (
        f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}{torch}; "
        f"{device.platform} ({device.device_kind}); {cpu}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}"
    )


# --- Command line -------------------------------------------------------------------


def _choice_list(allowed):
    def parse(text):
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(allowed)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--one",
        nargs=3,
        metavar=("MODEL", "BATCH", "CONTENDER"),
        help="measure one cell in this process",
    )
    parser.add_argument("--json", action="store_true", help="with --one: print one JSON line")
    parser.add_argument("--data", help="an .npz with x and y (default: generate MNIST-1D)")
    parser.add_argument(
        "--models",
        type=_choice_list(MODELS),
        default=list(DEFAULT_MODELS),
        help=f"comma-separated, from {','.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",")], default=list(BATCHES)
    )
    parser.add_argument(
        "--contenders",
        type=_choice_list(CONTENDERS),
        default=list(DEFAULT_CONTENDERS),
        help=f"comma-separated, from {','.join(CONTENDERS)} "
        f"(default: {','.join(DEFAULT_CONTENDERS)}); torch and torch1 need PyTorch",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per cell, rounded up to whole fused chunks (default: per cell)",
    )
    parser.add_argument("--out", help="also write every record and the summary to this JSON file")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)

    if set(TORCH) & set([args.one[2]] if args.one else args.contenders):
        # A clear message, and before minutes of other contenders in a grid.
        try:
            import bench._torch_baselines  # noqa: F401
        except ImportError as error:
            parser.error(f"{error} (or leave torch out of --contenders)")
    if args.one:
        model, batch, contender = args.one
        steps = args.steps or DEFAULT_STEPS.get((model, int(batch)), 50)
        rec = measure(model, int(batch), contender, steps, load_data(args.data))
        print(json.dumps(rec) if args.json else rec, flush=True)
        return

    command = "python -m bench.train " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {command.strip()}", flush=True)
    print(f"# {_environment(args.contenders)}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "mnist1d.npz")
        x, y = mnist1d()
        np.savez(data_path, x=x, y=y)
        records = run_grid(
            args.models,
            args.batches,
            args.contenders,
            args.repeats,
            args.steps,
            data_path,
            log=lambda line: print(line, flush=True),
        )
    rows = summarize(records)
    errors = [r for r in records if "error" in r]
    print()
    print(f"Command: `{command.strip()}`  ")
    print(f"Machine: {_environment(args.contenders)}  ")
    print(f"Total time: {time.perf_counter() - start:.0f} s for {len(records)} processes")
    print()
    print(markdown(rows, args.contenders))
    for e in errors:
        print(f"\nFAILED {e['model']} {e['batch']} {e['contender']}: {e['error']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"records": records, "summary": rows}, indent=1))


if __name__ == "__main__":
    main()
