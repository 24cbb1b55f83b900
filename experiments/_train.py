"""Runs one :class:`~experiments._experiment.Run`: every seed at once, resumably, by ``fit``.

An fnnet run is one call of :func:`fnnet.train.fit` with the run's seeds as
replicas: one compiled program, evaluated on the task's test sets every
``eval_every`` steps (the learning curves), checkpointed at most every
``checkpoint_seconds`` (process 0's clock decides for every process), and
resumed from its newest intact checkpoint when killed part-way. What is left
here is the experiment's own part: the optimizer a configuration describes,
the final metrics on a slice of the training set, and one row per seed.

A replica whose loss, gradient or update turns non-finite stops changing (fit
skips its updates) and is reported as diverged; the others train on.
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from experiments._config import TrainConfig
from experiments._experiment import Run
from experiments._tasks import Task
from fnnet import train

LN2 = math.log(2.0)
# At most this many training examples are re-evaluated at the end for the train
# metrics (a large training set would otherwise cost more than its test set).
TRAIN_EVAL_LIMIT = 4000
# One evaluation batch size for every set, so a run compiles one evaluation program
# per set.
EVAL_BATCH = 250


def _bits_per_char(logits, label):
    return train.softmax_cross_entropy(logits, label) / LN2


# Module-level functions, so evaluation programs are reused between runs.
CLASSIFICATION_METRICS = {"accuracy": train.accuracy}
TEXT_METRICS = {"bits_per_char": _bits_per_char}


def metrics_for(task: Task) -> dict[str, Callable]:
    """The metrics reported beside the loss."""
    return TEXT_METRICS if task.kind == "text" else CLASSIFICATION_METRICS


def optimizer_for(s: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer a configuration describes."""
    if s.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, s.learning_rate, max(s.warmup_steps, 1), s.steps, end_value=0.0
        )
    elif s.warmup_steps:
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, s.learning_rate, s.warmup_steps),
                optax.constant_schedule(s.learning_rate),
            ],
            [s.warmup_steps],
        )
    else:
        lr = s.learning_rate
    if s.optimizer == "adam":
        opt = optax.adam(lr)
    elif s.optimizer == "adamw":
        opt = optax.adamw(lr, weight_decay=s.weight_decay, mask=train.decay_mask)
    else:
        opt = optax.sgd(lr, momentum=0.9)
    if s.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(s.clip_norm), opt)
    return opt


class _Advance:
    """Tells the suite's progress bar of every step done (restored ones included)."""

    def __init__(self, advance: Callable[[int], None]):
        self.advance = advance
        self.done = 0

    def on_start(self, event):
        self.on_chunk_end(event)

    def on_chunk_end(self, event):
        self.advance(event.step - self.done)
        self.done = event.step


def train_fnnet(
    run: Run,
    task: Task,
    checkpoint_dir: pathlib.Path,
    *,
    checkpoint_seconds: float,
    advance: Callable[[int], None],
    mesh: Any = "auto",
) -> tuple[list[dict], list[dict]]:
    """Trains ``run``'s seeds together; returns ``(rows, curves)``.

    ``rows``: one dict per seed with the final metrics; ``curves``: one dict per
    (evaluation, seed). ``advance(n)`` is told of every ``n`` steps done. ``mesh``
    is ``fit``'s: ``"auto"`` spreads the seeds, or else each batch, over every
    device.
    """
    s = run.settings
    model = run.build(task)
    metric_fns = metrics_for(task)
    every = {"every": s.eval_every} if checkpoint_seconds == 0 else {"seconds": checkpoint_seconds}
    result = train.fit(
        model,
        optimizer_for(s),
        train.softmax_cross_entropy,
        task.train,
        steps=s.steps,
        batch_size=s.batch_size,
        seed=list(range(s.seeds)),
        vectorize_replicas=s.vectorize_seeds and s.seeds > 1,
        shuffle=s.shuffle,
        metric_fns=metric_fns,
        eval_data=dict(task.tests),
        eval_every=s.eval_every,
        eval_batch_size=EVAL_BATCH,
        # One dispatch per evaluation interval: the curves' train_* are the mean over
        # the interval, and the host's per-chunk work is paid once per interval.
        steps_per_call=s.eval_every,
        checkpoint=train.Checkpoints(checkpoint_dir, keep=1, **every),
        callbacks=[_Advance(advance)],
        mesh=mesh,
        settings={"run": run.fingerprint()},
        policy=s.compute_dtype,
        progress=False,
    )
    state = result.state
    evaluated = ["loss", *metric_fns]
    curves = []
    for row in result.history:
        if f"{next(iter(task.tests))}_loss" not in row:
            continue  # a chunk without an evaluation
        point = {"step": row["step"], "seed": row["replica"]}
        point.update({f"train_{k}": row[k] for k in evaluated})
        point.update({k: row[k] for k in row if k.split("_")[0] in task.tests})
        point["diverged"] = row["diverged"]
        curves.append(point)

    # The test sets' scores of the final state are the last evaluation's.
    final_tests: dict[str, list[dict]] = {name: [{}] * s.seeds for name in task.tests}
    for row in result.history:
        for name in task.tests:
            if f"{name}_loss" in row:
                final_tests[name][row["replica"]] = {k: row[f"{name}_{k}"] for k in evaluated}
    limit = min(TRAIN_EVAL_LIMIT, len(task.train[1]))
    train_subset = (task.train[0][:limit], task.train[1][:limit])
    final_train = train.evaluate_replicas(
        model, state, train_subset, {"loss": train.softmax_cross_entropy, **metric_fns},
        batch_size=EVAL_BATCH, policy=result.policy,
    )  # fmt: skip
    params = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(state.params))
    timing = {
        "train_seconds": round(result.seconds["train"], 3),
        "compile_seconds": round(result.seconds["compile"], 3),
        "seeds_in_program": s.seeds,
        "precision": result.precision,
        **_rates(result, s, task),
        "resumed_from": result.resumed_from,
    }
    what = np.reshape(_host(state.nonfinite_what), -1)
    steps = np.reshape(_host(state.step), -1)
    rows = []
    for r in range(s.seeds):
        row = {"model": run.model, **run.labels, "seed": r, "status": "ok"}
        bad = result.diverged[r]
        if bad is not None:
            cause = {1: "loss", 2: "gradient"}.get(int(what[r]), "update")
            row["status"] = f"diverged at step {bad} ({cause} not finite)"
        for name, per_replica in {"train": final_train, **final_tests}.items():
            for metric, value in per_replica[r].items():
                value = math.nan if bad is not None or value is None else value
                row[f"{name}_{metric}"] = value
        row["params"] = params
        row["steps"] = int(steps[r])
        rows.append({**row, **timing})
    if run.after is not None:
        for row, extra in zip(rows, run.after(model, state.params, task)):
            row.update(extra)
    return rows, curves


def _host(value):
    """A value that may be split over processes, as one NumPy array."""
    from jax.experimental import multihost_utils

    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def _rates(result, s, task) -> dict:
    """Examples (tokens, for token ids) per second over all seeds' training, and the
    MFU where fit knew the device's peak; absent when there is no time to divide by."""
    seconds = result.seconds["train"]
    if seconds <= 0:
        return {}
    examples = s.steps * s.batch_size * s.seeds / seconds
    rates = {"examples_per_second": round(examples, 1)}
    x = task.train[0]
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.ndim(x) >= 2:
        rates["tokens_per_second"] = round(examples * int(np.prod(np.shape(x)[1:])), 1)
    cost = result.cost
    if cost.get("flops_per_step") is not None:
        flops = cost["flops_per_step"] * s.steps / seconds
        rates["mfu"] = round(flops / (cost["peak_flops"] * cost["devices"]), 6)
    return rates


def count_fitted_numbers(estimator: Any) -> int | None:
    """How many numbers a fitted scikit-learn model holds (tree nodes, or coefficients)."""
    if hasattr(estimator, "estimators_"):
        trees = np.asarray(estimator.estimators_, dtype=object).reshape(-1)
        return int(sum(t.tree_.node_count for t in trees))
    if hasattr(estimator, "tree_"):
        return int(estimator.tree_.node_count)
    if hasattr(estimator, "coef_"):
        return int(np.size(estimator.coef_) + np.size(getattr(estimator, "intercept_", 0)))
    return None


def train_classical(run: Run, task: Task, *, advance: Callable[[int], None]) -> tuple:
    """Fits a scikit-learn model once per seed; returns ``(rows, [])``."""
    rows = []
    for seed in range(run.settings.seeds):
        estimator = run.classical(seed)
        start = time.perf_counter()
        estimator.fit(*task.train)
        seconds = time.perf_counter() - start
        row = {"model": run.model, **run.labels, "seed": seed, "status": "ok"}
        for name, (x, y) in {"train": task.train, **task.tests}.items():
            row[f"{name}_accuracy"] = float(np.mean(estimator.predict(x) == y))
        row["params"] = count_fitted_numbers(estimator)
        row["steps"] = 0
        row["train_seconds"] = round(seconds, 3)
        row["compile_seconds"] = 0.0
        row["seeds_in_program"] = 1
        rows.append(row)
    advance(1)
    return rows, []
