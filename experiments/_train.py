"""Runs one :class:`~experiments._experiment.Run`: every seed at once, resumably.

An fnnet run trains its seeds as vmapped replicas in one compiled program
(``fnnet.train.make_fused_steps(..., replicated=True)``), one evaluation interval
per dispatch. After each interval every replica is evaluated on the task's test
sets (the learning curves), checked for divergence, and, every
``checkpoint_seconds``, checkpointed together with the curves so far. A run
killed part-way resumes from its newest intact checkpoint.

A replica whose loss or gradients turn non-finite stops changing (the engine
skips its updates) and is reported as diverged; the others train on.
"""

from __future__ import annotations

import contextlib
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
from fnnet import distributed, train
from fnnet.train import CheckpointManager

LN2 = math.log(2.0)
# At most this many training examples are re-evaluated at the end for the train
# metrics (a large training set would otherwise cost more than its test set).
TRAIN_EVAL_LIMIT = 4000


def _bits_per_char(logits, label):
    return train.softmax_cross_entropy(logits, label) / LN2


# Module-level functions, so evaluate's compiled programs are reused between runs.
CLASSIFICATION_METRICS = {"loss": train.softmax_cross_entropy, "accuracy": train.accuracy}
TEXT_METRICS = {"loss": train.softmax_cross_entropy, "bits_per_char": _bits_per_char}


def metrics_for(task: Task) -> dict[str, Callable]:
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


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while it is active."""

    _EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )
    _active: list[CompileClock] = []
    _installed = False

    def __init__(self):
        self.seconds = 0.0

    @classmethod
    def _listen(cls, event, seconds, **_):
        if event in cls._EVENTS:
            for clock in cls._active:
                clock.seconds += seconds

    @contextlib.contextmanager
    def running(self):
        if not CompileClock._installed:
            jax.monitoring.register_event_duration_secs_listener(CompileClock._listen)
            CompileClock._installed = True
        CompileClock._active.append(self)
        try:
            yield self
        finally:
            CompileClock._active.remove(self)


def _replica(tree: Any, r: int) -> Any:
    return jax.tree.map(lambda a: a[r], tree)


# One evaluation batch size for every set, so a run compiles one evaluation program
# (``evaluate`` pads the last batch; any number of examples reuses it).
EVAL_BATCH = 250


def _evaluate_replicas(model, state, data, metric_fns, replicas) -> list[dict[str, float]]:
    return [
        train.evaluate(
            model,
            _replica(state.params, r),
            _replica(state.model_state, r),
            data,
            metric_fns,
            batch_size=EVAL_BATCH,
        )
        for r in range(replicas)
    ]


def placement(mesh, seeds: int, batch_size: int) -> dict[str, Any]:
    """How a run uses a mesh's ``data`` axis: whole replicas per device when the
    seeds divide evenly over it (no communication between devices at all), else
    every replica's batch split over the devices (data parallelism).

    Raises:
      ValueError: neither the seeds nor the batch divide over the axis.
    """
    ways = mesh.shape["data"]
    if seeds % ways == 0:
        return {"replica_axis": "data", "batch_axis": None}
    if batch_size % ways == 0:
        return {"replica_axis": None, "batch_axis": "data"}
    raise ValueError(
        f"the mesh's data axis has {ways} devices, which divide neither the {seeds} seeds "
        f"nor the batch of {batch_size}; choose --mesh data=N with N dividing one of them"
    )


def train_fnnet(
    run: Run,
    task: Task,
    checkpoint_dir: pathlib.Path,
    *,
    checkpoint_seconds: float,
    advance: Callable[[int], None],
    mesh=None,
) -> tuple[list[dict], list[dict]]:
    """Trains ``run``'s seeds together; returns ``(rows, curves)``.

    ``rows``: one dict per seed with the final metrics; ``curves``: one dict per
    (evaluation, seed). ``advance(n)`` is told of every ``n`` steps done. With a
    ``mesh`` (a ``data`` axis of more than one device) the program runs over it:
    see :func:`placement`.
    """
    s = run.settings
    model = run.build(task)
    optimizer = optimizer_for(s)
    metric_fns = metrics_for(task)
    clock = CompileClock()
    seeds = np.arange(s.seeds)
    with clock.running():
        state = train.init_replicas(model, optimizer, task.example, seeds)
    params = sum(int(np.prod(a.shape[1:])) for a in jax.tree.leaves(state.params))
    step_fn = train.make_train_step(
        model,
        optimizer,
        train.softmax_cross_entropy,
        metric_fns={k: v for k, v in metric_fns.items() if k != "loss"},
        # A diverged seed must keep finite parameters while the others train on:
        # the whole replicated state is checkpointed, and checkpoints refuse NaN.
        skip_nonfinite=True,
    )
    fused = {
        "batch_size": s.batch_size,
        "num_steps": s.eval_every,
        "shuffle": s.shuffle,
        "replicated": True,
    }
    if mesh is not None and mesh.size > 1:
        where = placement(mesh, s.seeds, s.batch_size)
        state = distributed.shard_state(state, mesh, replica_axis=where["replica_axis"])
        run_chunk = distributed.make_sharded_steps(step_fn, task.train, mesh, **where, **fused)
    else:
        run_chunk = train.make_fused_steps(step_fn, task.train, **fused)
    manager = CheckpointManager(checkpoint_dir, keep=1)
    curves: list[dict] = []
    train_seconds = compile_seconds = 0.0
    resumed_from = None
    fingerprint = run.fingerprint()
    if manager.latest_step() is not None:
        state, record = manager.restore(target=state)
        if record.get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"checkpoint in {checkpoint_dir} belongs to another configuration "
                f"({record.get('fingerprint')} != {fingerprint}); delete it to start over"
            )
        resumed_from = int(state.step[0])
        curves = list(record["curves"])
        train_seconds = float(record["train_seconds"])
        compile_seconds = float(record["compile_seconds"])
        advance(int(state.step[0]))

    last_save = time.monotonic()
    step = int(state.step[0])
    scores = None  # the test sets' evaluation of the current state, once there is one
    while step < s.steps:
        chunk_clock = CompileClock()
        start = time.perf_counter()
        with chunk_clock.running(), clock.running():
            state, chunk_metrics = run_chunk(state)
            chunk_metrics = jax.device_get(chunk_metrics)
        train_seconds += time.perf_counter() - start - chunk_clock.seconds
        step = int(state.step[0])
        bad = np.asarray(state.nonfinite_step)
        with clock.running():
            scores = {
                name: _evaluate_replicas(model, state, data, metric_fns, s.seeds)
                for name, data in task.tests.items()
            }
        for r in range(s.seeds):
            point = {"step": step, "seed": r}
            point.update({f"train_{k}": float(np.mean(v[r])) for k, v in chunk_metrics.items()})
            for name, per_replica in scores.items():
                point.update({f"{name}_{k}": v for k, v in per_replica[r].items()})
            point["diverged"] = bool(bad[r] >= 0)
            curves.append(point)
        advance(s.eval_every)
        if bool(np.all(bad >= 0)):
            advance(s.steps - step)  # every seed diverged: nothing left to learn
            break
        if step < s.steps and time.monotonic() - last_save >= checkpoint_seconds:
            manager.save(
                step,
                state,
                metadata={
                    "fingerprint": fingerprint,
                    "curves": curves,
                    "train_seconds": train_seconds,
                    "compile_seconds": compile_seconds + clock.seconds,
                },
            )
            last_save = time.monotonic()
    compile_seconds += clock.seconds

    limit = min(TRAIN_EVAL_LIMIT, len(task.train[1]))
    train_subset = (task.train[0][:limit], task.train[1][:limit])
    final_train = _evaluate_replicas(model, state, train_subset, metric_fns, s.seeds)
    # The loop's last evaluation was of this very state; only a run resumed at its
    # last step has none.
    final_tests = scores or {
        name: _evaluate_replicas(model, state, data, metric_fns, s.seeds)
        for name, data in task.tests.items()
    }
    timing = {
        "train_seconds": round(train_seconds, 3),
        "compile_seconds": round(compile_seconds, 3),
        "seeds_in_program": s.seeds,
        "resumed_from": resumed_from,
    }
    rows = _seed_rows(run, state, {"train": final_train, **final_tests}, params, timing)
    if run.after is not None:
        for row, extra in zip(rows, run.after(model, state.params, task)):
            row.update(extra)
    return rows, curves


def _seed_rows(run: Run, state, scores: dict, params: int, timing: dict) -> list[dict]:
    """One results row per seed: its status, final metrics (NaN once diverged), size
    and timing. ``scores``: ``{set name: [per-replica {metric: value}]}``."""
    bad_steps = np.asarray(state.nonfinite_step)
    bad_what = np.asarray(state.nonfinite_what)
    rows = []
    for r in range(len(bad_steps)):
        diverged = bool(bad_steps[r] >= 0)
        row = {"model": run.model, **run.labels, "seed": r, "status": "ok"}
        if diverged:
            what = "loss" if int(bad_what[r]) == 1 else "gradient"
            row["status"] = f"diverged at step {int(bad_steps[r])} ({what} not finite)"
        for name, per_replica in scores.items():
            for metric, value in per_replica[r].items():
                row[f"{name}_{metric}"] = math.nan if diverged else value
        row["params"] = params
        row["steps"] = int(state.step[r])
        rows.append({**row, **timing})
    return rows


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
