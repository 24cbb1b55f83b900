"""``fit``: the learning loop, repeated until done, without losing work.

Forward pass, error, backpropagation and update happen inside the compiled train
step; this module repeats it. It runs the steps in fused chunks (many steps per
dispatch), checks for non-finite values once per chunk (never a per-step host
sync), evaluates, logs, stops early, and checkpoints, resuming exactly from the
newest intact checkpoint when one exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from fnnet._src.layer import Layer
from fnnet.models import build, config_of
from fnnet.train._checkpoint import CheckpointManager
from fnnet.train._evaluate import evaluate
from fnnet.train._state import TrainState, init_state
from fnnet.train._step import NonFiniteError, check_finite, make_fused_steps, make_train_step


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      state: the final training state.
      history: one dict per chunk of steps: ``step``, the mean training metrics
        over the chunk (``loss``, ...), ``steps_per_second``, and ``eval_*`` metrics
        where evaluation ran.
      stopped_early: whether early stopping ended training.
      resumed_from: the checkpoint step training resumed from, or None.
    """

    state: TrainState
    history: list[dict[str, float]]
    stopped_early: bool = False
    resumed_from: int | None = None


def _chunk_size(steps: int, steps_per_epoch: int, *intervals: int | None) -> int:
    """Steps per dispatch: an epoch, cut so evaluation and checkpoints fall on chunk ends."""
    size = math.gcd(min(steps_per_epoch, steps), steps)
    for interval in intervals:
        if interval:
            size = math.gcd(size, interval)
    return size


def fit(
    model: Layer,
    optimizer,
    loss_fn: Callable,
    train_data: tuple[Any, Any],
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    metric_fns: dict[str, Callable] | None = None,
    eval_data: tuple[Any, Any] | None = None,
    eval_every: int | None = None,
    early_stopping: tuple[str, int] | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    log_path: str | pathlib.Path | None = None,
    steps_per_call: int | None = None,
    policy=None,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> FitResult:
    """Trains ``model`` for ``steps`` steps, in fused chunks, resuming if it can.

    Args:
      model: any fnnet layer or model.
      optimizer: an optax ``GradientTransformation``.
      loss_fn: per-example loss ``loss_fn(output, label) -> scalar``.
      train_data: ``(x, y)`` arrays with the examples on the leading axis; moved to
        the device once, batches drawn there.
      steps: total training steps (including any already done by a checkpoint).
      batch_size: examples per step (the ragged end of an epoch is dropped).
      seed: seeds initialization, dropout and the data order.
      shuffle: reshuffle every epoch (False: batches in dataset order).
      metric_fns: per-example metrics ``fn(output, label)`` averaged over batches,
        logged for training and, with ``eval_data``, for evaluation.
      eval_data: ``(x, y)`` held-out examples, evaluated every ``eval_every`` steps.
      early_stopping: ``(metric, patience)``: stop when evaluation ``metric`` (higher
        is better, e.g. ``"accuracy"``; prefix ``"-"`` for lower-is-better, e.g.
        ``"-loss"``) has not improved for ``patience`` evaluations.
      checkpoint_dir: where checkpoints go; an existing one is resumed from.
      checkpoint_every: steps between checkpoints (default: every evaluation, or
        the end of training).
      keep: how many recent checkpoints to keep (the best is kept too).
      log_path: a JSON-lines file, one line per chunk of ``history`` (written by
        process 0 only when several processes train together).
      steps_per_call: steps per compiled dispatch (default: one epoch, adjusted so
        evaluations and checkpoints fall on chunk boundaries).
      policy: a mixed-precision ``Policy``.
      settings: extra JSON-able facts stored in checkpoints (optimizer and data settings).
      progress: show a progress bar (in process 0 only).

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteError: the loss or gradients became non-finite; the message names the
        step, and ``error.last_finite_state`` holds the state at the start of the
        chunk in which it happened. No checkpoint is written after it.
    """
    x, y = jax.device_put(train_data)
    num_examples = jax.tree.leaves(x)[0].shape[0]
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
    if checkpoint_dir is not None and checkpoint_every is None:
        checkpoint_every = eval_every or steps
    chunk = steps_per_call or _chunk_size(steps, steps_per_epoch, eval_every, checkpoint_every)
    if (
        steps % chunk
        or (eval_every and eval_every % chunk)
        or (checkpoint_every and checkpoint_every % chunk)
    ):
        raise ValueError(
            f"steps_per_call {chunk} must divide steps ({steps}), eval_every ({eval_every}) "
            f"and checkpoint_every ({checkpoint_every})"
        )
    metric_fns = dict(metric_fns or {})
    step_fn = make_train_step(model, optimizer, loss_fn, policy=policy, metric_fns=metric_fns)
    # Already compiled, with the dataset as an argument; an outer jit would bake the
    # dataset into the program as a constant.
    run = make_fused_steps(step_fn, (x, y), batch_size=batch_size, num_steps=chunk, shuffle=shuffle)
    example = jax.tree.map(lambda a: a[0], x)
    state = init_state(model, optimizer, example, seed=seed)

    manager = resumed_from = None
    metadata = {
        "model": config_of(model),
        "fit": {"batch_size": batch_size, "seed": seed, "shuffle": shuffle, "steps": steps},
        "settings": settings or {},
    }
    if checkpoint_dir is not None:
        metric_name = None
        if early_stopping is not None:
            metric_name = "eval_" + early_stopping[0].lstrip("-")
        manager = CheckpointManager(
            checkpoint_dir,
            keep=keep,
            best_metric=metric_name,
            best_mode="min" if early_stopping and early_stopping[0].startswith("-") else "max",
        )
        if manager.latest_step() is not None:
            state, _ = manager.restore(target=state)
            resumed_from = int(state.step)

    # With several processes (jax.distributed) every one trains and checkpoints, but
    # only process 0 shows progress and writes the log.
    primary = jax.process_index() == 0
    progress = progress and primary
    log = open(log_path, "a") if log_path is not None and primary else None  # noqa: SIM115
    history: list[dict[str, float]] = []
    best, since_best, stopped_early = -math.inf, 0, False
    bar = tqdm(total=steps, initial=int(state.step), disable=not progress, unit="step")
    try:
        while int(state.step) < steps:
            start = time.perf_counter()
            checked, (state, metrics) = state, run(state)
            metrics = jax.device_get(metrics)  # one host sync per chunk
            seconds = time.perf_counter() - start
            try:
                check_finite(state)
            except NonFiniteError as error:
                # run() does not donate its input, so the chunk's starting state,
                # checked finite last time, is still there to hand back.
                error.last_finite_state = checked
                raise
            step = int(state.step)
            row: dict[str, float] = {"step": step}
            row.update({k: float(np.mean(v)) for k, v in metrics.items()})
            row["steps_per_second"] = chunk / seconds
            if eval_data is not None and eval_every and step % eval_every == 0:
                scores = evaluate(
                    model,
                    state.params,
                    state.model_state,
                    eval_data,
                    {"loss": loss_fn, **metric_fns},
                    batch_size=batch_size,
                    policy=policy,
                )
                row.update({f"eval_{k}": float(v) for k, v in scores.items()})
                if early_stopping is not None:
                    name, patience = early_stopping
                    score = row[f"eval_{name.lstrip('-')}"]
                    score = -score if name.startswith("-") else score
                    if score > best:
                        best, since_best = score, 0
                    else:
                        since_best += 1
                        stopped_early = since_best >= patience
            history.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.set_postfix(
                {
                    k: f"{v:.4g}"
                    for k, v in row.items()
                    if k in ("loss", "accuracy", "eval_accuracy")
                }
                | {"steps/s": f"{row['steps_per_second']:.0f}"}
            )
            bar.update(chunk)
            if manager is not None and (step % checkpoint_every == 0 or step == steps):
                manager.save(step, state, metadata=metadata, metrics=row)
            if stopped_early:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
    return FitResult(state, history, stopped_early, resumed_from)


def load_model(checkpoint_dir: str | pathlib.Path, step: int | None = None):
    """Rebuilds a shipped model and its trained parameters from a checkpoint alone.

    Returns:
      ``(model, params, model_state, metadata)``.
    """
    tree, metadata = CheckpointManager(checkpoint_dir).restore(step)
    if metadata.get("model") is None:
        raise ValueError(
            f"checkpoint in {checkpoint_dir} has no model configuration (the model was "
            "not one fnnet ships, or was built with arguments JSON cannot hold)"
        )
    model = build(metadata["model"])
    return model, tree.params, tree.model_state, metadata
