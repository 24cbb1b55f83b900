"""The runner's cost per training step: through ``fit`` against its old loop.

``python -m experiments`` used to train with a loop of its own
(``experiments/_train.py`` before commit 2c4244a): the seeds vmapped in one
``make_fused_steps(..., replicated=True)`` program, one evaluation interval per
dispatch, every replica evaluated on the test set after each interval by its own
``evaluate`` call. It now trains through ``fnnet.train.fit``. Both contenders do
the same work on the same data, one architectures run of MNIST-1D (3 seeds, batch
100, evaluation every ``--eval-every`` steps, the final training-set evaluation),
with the step function of today's engine:

- ``old``: the old loop, rebuilt below (no checkpoint; it saved only mid-run);
- ``fit``: ``experiments._train.train_fnnet``, which calls ``fit`` (its one
  checkpoint, at the end, included).

Each (model, contender) runs in a fresh process, contenders alternate and their
order rotates between repeats. A process times the whole run and subtracts the
seconds JAX spent tracing and compiling (``fnnet.train.CompileClock``), so the
first figure is wall time per training step with evaluation, the final
training-set evaluation and (for ``fit``) its end-of-run checkpoint included; the
second counts the training chunks alone (compilation excluded), as each loop
reports its ``train_seconds``. Each ratio ``fit / old`` is the median over
repeats of each repeat's ratio (below 1: fit is cheaper).

Run: ``python -m bench.runner --steps 2000`` (about 4 minutes on two CPU cores), or one
measurement: ``python -m bench.runner --one mlp fit --json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("mlp", "cnn", "gru")
CONTENDERS = ("old", "fit")


def _old_loop(run, task) -> float:
    """The runner's loop before it trained through ``fit`` (one process, one device);
    returns the seconds its training chunks took, compilation excluded, as it did."""
    import jax
    import numpy as np

    from experiments._train import EVAL_BATCH, TRAIN_EVAL_LIMIT, metrics_for, optimizer_for
    from fnnet import train
    from fnnet.train import CompileClock

    s = run.settings
    model = run.build(task)
    optimizer = optimizer_for(s)
    metric_fns = metrics_for(task)
    state = train.init_replicas(model, optimizer, task.example, np.arange(s.seeds))
    step_fn = train.make_train_step(
        model,
        optimizer,
        train.softmax_cross_entropy,
        metric_fns={k: v for k, v in metric_fns.items() if k != "loss"},
        skip_nonfinite=True,
    )
    run_chunk = train.make_fused_steps(
        step_fn, task.train, batch_size=s.batch_size, num_steps=s.eval_every,
        shuffle=s.shuffle, replicated=True, vectorize_replicas=True,
    )  # fmt: skip
    metrics = {"loss": train.softmax_cross_entropy, **metric_fns}

    def scores(data):
        return [
            train.evaluate(
                model,
                jax.tree.map(lambda a, r=r: a[r], state.params),
                jax.tree.map(lambda a, r=r: a[r], state.model_state),
                data,
                metrics,
                batch_size=EVAL_BATCH,
            )
            for r in range(s.seeds)
        ]

    curves = []
    step = 0
    train_seconds = 0.0
    while step < s.steps:
        clock = CompileClock()
        start = time.perf_counter()
        with clock.running():
            state, chunk = run_chunk(state)
            chunk = jax.device_get(chunk)
        train_seconds += time.perf_counter() - start - clock.seconds
        step = int(state.step[0])
        tests = {name: scores(data) for name, data in task.tests.items()}
        bad = np.asarray(state.nonfinite_step)
        for r in range(s.seeds):
            point = {"step": step, "seed": r, "diverged": bool(bad[r] >= 0)}
            point.update({f"train_{k}": float(np.mean(v[r])) for k, v in chunk.items()})
            for name, per_replica in tests.items():
                point.update({f"{name}_{k}": v for k, v in per_replica[r].items()})
            curves.append(point)
    limit = min(TRAIN_EVAL_LIMIT, len(task.train[1]))
    scores((task.train[0][:limit], task.train[1][:limit]))
    return train_seconds


def measure(model: str, contender: str, steps: int, eval_every: int) -> dict:
    """Seconds per training step (compilation excluded) of one contender's run."""
    import jax

    from experiments import _suite
    from experiments._train import train_fnnet
    from fnnet.train import CompileClock

    overrides = {"models": model, "steps": str(steps), "eval_every": str(eval_every)}
    (plan,) = _suite.plan(["architectures"], overrides)
    (run,) = plan.runs
    task = run.task()
    clock = CompileClock()
    start = time.perf_counter()
    with clock.running(), tempfile.TemporaryDirectory() as tmp:
        if contender == "old":
            train_seconds = _old_loop(run, task)
        else:
            rows, _ = train_fnnet(
                run, task, Path(tmp) / "run", checkpoint_seconds=1e9,
                advance=lambda n: None, mesh=None,
            )  # fmt: skip
            train_seconds = rows[0]["train_seconds"]
    wall = time.perf_counter() - start
    return {
        "model": model,
        "contender": contender,
        "seeds": run.settings.seeds,
        "steps": steps,
        "wall_seconds": wall,
        "compile_seconds": clock.seconds,
        "ms_per_step": 1e3 * (wall - clock.seconds) / steps,
        "train_ms_per_step": 1e3 * train_seconds / steps,
        "devices": len(jax.devices()),
    }


def _one_subprocess(model: str, contender: str, steps: int, eval_every: int) -> dict:
    cmd = [sys.executable, "-m", "bench.runner", "--one", model, contender, "--json"]
    cmd += ["--steps", str(steps), "--eval-every", str(eval_every)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CONTENDER"))
    parser.add_argument("--json", action="store_true", help="with --one: one JSON line")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.one:
        model, contender = args.one
        if model not in MODELS or contender not in CONTENDERS:
            parser.error(f"--one takes a model of {MODELS} and a contender of {CONTENDERS}")
        record = measure(model, contender, args.steps, args.eval_every)
        print(json.dumps(record) if args.json else record)
        return
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: {unknown} not among {MODELS}")
    started = time.perf_counter()
    results: dict[tuple[str, str], list[float]] = {}
    chunks: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for model in models:
            order = CONTENDERS[repeat % 2 :] + CONTENDERS[: repeat % 2]
            for contender in order:
                record = _one_subprocess(model, contender, args.steps, args.eval_every)
                results.setdefault((model, contender), []).append(record["ms_per_step"])
                chunks.setdefault((model, contender), []).append(record["train_ms_per_step"])
                ms = record["ms_per_step"]
                print(f"  repeat {repeat}: {model} {contender}: {ms:.3f} ms/step", file=sys.stderr)
    print(f"\nRunner cost per training step, {args.steps} steps, 3 seeds, batch 100, "
          f"evaluation every {args.eval_every} (median of {args.repeats}; "
          f"{time.perf_counter() - started:.0f} s in all):\n")  # fmt: skip
    print("| model | whole run: old, ms/step | fit, ms/step | fit / old "
          "| training chunks: old, ms/step | fit, ms/step | fit / old |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in models:
        cells = []
        for table in (results, chunks):
            old, fit = table[(model, "old")], table[(model, "fit")]
            ratio = statistics.median(f / o for f, o in zip(fit, old))
            cells += [f"{statistics.median(old):.3f}", f"{statistics.median(fit):.3f}",
                      f"{ratio:.2f}"]  # fmt: skip
        print(f"| {model} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
