"""``fit``: the learning loop, repeated until done, for one seed or many, on every device.

Forward pass, error, backpropagation and update happen inside the compiled train
step; this module repeats it. It runs the steps in fused chunks (many steps per
dispatch), checks for non-finite values once per chunk (never a per-step host
sync), evaluates, stops early, checkpoints and tells its callbacks, and resumes
exactly from the newest intact checkpoint of the same run, refusing one that
belongs to another.

Several seeds train as stacked replicas of one compiled program; on several
devices the replicas, or else each batch, are split over a ``data`` axis. Every
decision that must agree across processes (checkpoint now, stop, resume from
which step) is taken by process 0 and broadcast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh

from fnnet._src.layer import Layer
from fnnet.models import build, config_of
from fnnet.train import _callbacks, _cost, _stream
from fnnet.train._checkpoint import CheckpointStore, load_metadata
from fnnet.train._checkpoint_errors import CheckpointError
from fnnet.train._clock import CompileClock
from fnnet.train._evaluate import _batch_sums
from fnnet.train._fingerprint import data_fingerprint, differences, fingerprint
from fnnet.train._inputs import ParamsError, check_labels, check_params, init_example
from fnnet.train._lock import DirectoryLock, check_checkpoint_dir, check_shared
from fnnet.train._precision import Policy, describe_policy, resolve_policy
from fnnet.train._sharding import make_sharded_steps, replicate, shard_state
from fnnet.train._state import TrainState, init_replicas, init_state, set_hyperparams
from fnnet.train._step import NonFiniteError, make_fused_steps, make_train_step

_WHAT = {1: "loss", 2: "gradient", 3: "update"}


class ResumeError(CheckpointError):
    """``checkpoint`` holds a run that is not the one ``fit`` was asked for.

    Attributes:
      differences: one line per setting that differs.
    """

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when an evaluation value has not improved for ``patience`` evaluations.

    Attributes:
      monitor: a history key of an evaluation: ``"eval_loss"``,
        ``"eval_accuracy"``, or ``"NAME_metric"`` for a named set of ``eval_data``.
      patience: evaluations without improvement before stopping (per replica:
        a replica that stops keeps its weights while the others train on).
      mode: ``"min"`` or ``"max"``; may be left out only for a loss (``"min"``).
    """

    monitor: str
    patience: int
    mode: str | None = None

    def resolved_mode(self) -> str:
        if self.mode is None:
            if self.monitor.endswith("loss"):
                return "min"
            raise ValueError(
                f"EarlyStopping({self.monitor!r}): say whether larger or smaller is better, "
                "mode='max' or mode='min' (only a loss defaults to 'min')"
            )
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {self.mode!r}")
        return self.mode


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Where and how often ``fit`` checkpoints.

    Attributes:
      directory: the run's directory; a checkpoint of the same run there is
        resumed from, one of another run is refused (:class:`ResumeError`).
      every: steps between checkpoints.
      seconds: checkpoint at the first chunk end this many seconds after the
        last save (process 0's clock decides for every process).
      keep: how many of the newest checkpoints to keep.
      async_save: write each checkpoint in the background while training goes
        on (the next save, and the end of ``fit``, wait for it); False blocks
        at each save until it is committed.

    With neither ``every`` nor ``seconds`` a checkpoint follows every
    evaluation; there is always one at the end of training. ``directory`` may
    be a bucket (``gs://bucket/run``, with ``gcsfs`` installed); there ``fit``
    takes no lock (an object store has none), and says so.
    """

    directory: str | os.PathLike
    every: int | None = None
    seconds: float | None = None
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      state: the final training state (stacked on a leading replica axis when
        ``fit`` was given several seeds).
      history: one dict per chunk of steps (per replica and chunk for
        replicas, with ``"replica"``): ``step``, the mean training metrics over
        the chunk (``loss``, ...), ``steps_per_second``, ``eval_*`` (or
        ``NAME_*``) metrics where evaluation ran, and ``diverged`` for replicas.
        A non-finite number is None, so every row is plain JSON.
      stopped_early: whether early stopping ended training (a list, per replica,
        for replicas).
      resumed_from: the checkpoint step training resumed from, or None.
      replicas: how many replicas trained, or None for one run.
      diverged: per replica, the first step whose loss, gradient or update was
        not finite, or None (None for one run, which raises instead).
      best_step: where :class:`RestoreBest` took the weights from, else None.
      seconds: ``train`` (chunks, compilation excluded), ``compile`` and
        ``evaluate`` wall seconds.
      notices: the one-line notices ``fit`` printed (a reduced mesh, ...).
      policy: the mixed-precision :class:`Policy` it trained and evaluated with
        (``policy="auto"`` resolved), or None: no casts.
      precision: that in words, ``"float32"`` or ``"bfloat16 compute, float32
        params, float32 outputs"``.
      cost: ``flops_per_step`` (the matrix products of one step of every
        replica, forward and backward, from the step's jaxpr; counted only when
        a peak is known, else None), ``peak_flops`` of one device (or None),
        ``peak_source`` (where the peak came from, or why there is none) and
        ``devices``.
    """

    state: TrainState
    history: list[dict[str, Any]]
    stopped_early: bool | list[bool] = False
    resumed_from: int | None = None
    replicas: int | None = None
    diverged: list[int | None] | None = None
    best_step: Any = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    notices: list[str] = dataclasses.field(default_factory=list)
    policy: Policy | None = None
    precision: str = ""
    cost: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- Checking what came, before any work -------------------------------------------------


def _positive_int(value: Any, name: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"fit: {name} must be a positive integer, got {value!r}")
    return int(value)


def _seeds(seed: Any) -> tuple[np.ndarray | int, int | None]:
    """``(seed, replicas)``: an int and None, or an int array of seeds and its length."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed), None
    try:
        seeds = np.asarray(seed)
    except Exception:  # noqa: BLE001 (reported below by name)
        seeds = None
    if seeds is None or seeds.ndim != 1 or seeds.size == 0 or seeds.dtype.kind not in "iu":
        raise ValueError(
            f"fit: seed must be an int, or a 1-D sequence of ints (one replica each, e.g. "
            f"seed=range(4)), got {seed!r}"
        )
    return seeds.astype(np.int32), int(seeds.size)


def _pair(data: Any, name: str) -> tuple[Any, Any, int]:
    """``(x, y, N)`` from an ``(x, y)`` pair whose leaves share a leading axis N."""
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise ValueError(
            f"fit: {name} must be a pair (x, y) (x an array or a dict of arrays), got "
            f"{type(data).__name__}"
        )
    x, y = data
    leaves = jax.tree_util.tree_leaves_with_path((x, y))
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for _, leaf in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        shapes = {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in leaves}
        raise ValueError(
            f"fit: every array of {name} needs the same leading example axis, got shapes {shapes}"
        )
    (n,) = sizes
    if n == 0:
        raise ValueError(f"fit: {name} is empty")
    return x, y, n


def _eval_sets(eval_data: Any) -> dict[str, tuple[Any, Any]]:
    """``{name: (x, y)}``; one pair is named ``eval``."""
    if eval_data is None:
        return {}
    if isinstance(eval_data, Mapping):
        sets = {}
        for name, data in eval_data.items():
            if not isinstance(name, str) or not name.isidentifier() or name == "train":
                raise ValueError(
                    f"fit: eval_data's names become metric prefixes ({name!r}_loss), so each "
                    f"must be an identifier other than 'train', got {name!r}"
                )
            x, y, _ = _pair(data, f"eval_data[{name!r}]")
            sets[name] = (x, y)
        if not sets:
            raise ValueError("fit: eval_data is an empty dict; give (x, y) or {name: (x, y)}")
        return sets
    x, y, _ = _pair(eval_data, "eval_data")
    return {"eval": (x, y)}


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_early_stopping(early_stopping: Any, known: list[str]) -> str | None:
    if early_stopping is None:
        return None
    if not isinstance(early_stopping, EarlyStopping):
        raise TypeError(
            f"fit: early_stopping must be an EarlyStopping(monitor, patience), got "
            f"{early_stopping!r}; e.g. EarlyStopping('eval_loss', patience=3)"
        )
    if not known:
        raise ValueError(
            "fit: early_stopping needs evaluations to watch, and no eval_data was given"
        )
    if early_stopping.monitor not in known:
        raise ValueError(
            f"fit: early_stopping monitors {early_stopping.monitor!r}, which no evaluation "
            f"reports{_did_you_mean(early_stopping.monitor, known)}; it could watch one of "
            f"{', '.join(known)}"
        )
    _positive_int(early_stopping.patience, "early_stopping.patience")
    return early_stopping.resolved_mode()


def _check_checkpoints(checkpoint: Any) -> Checkpoints | None:
    if checkpoint is None:
        return None
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = Checkpoints(checkpoint)
    if not isinstance(checkpoint, Checkpoints):
        raise TypeError(
            f"fit: checkpoint must be a directory or Checkpoints(directory, every=..., "
            f"seconds=..., keep=...), got {checkpoint!r}"
        )
    _positive_int(checkpoint.every, "checkpoint.every", optional=True)
    _positive_int(checkpoint.keep, "checkpoint.keep")
    if not isinstance(checkpoint.async_save, bool):
        raise TypeError(
            f"fit: checkpoint.async_save must be True or False, got {checkpoint.async_save!r}"
        )
    if checkpoint.seconds is not None and not (
        isinstance(checkpoint.seconds, numbers.Real)
        and math.isfinite(checkpoint.seconds)
        and checkpoint.seconds >= 0
    ):
        raise ValueError(
            f"fit: checkpoint.seconds must be a finite number >= 0, got {checkpoint.seconds!r}"
        )
    return checkpoint


# --- Where the work goes ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
    """How a run uses the devices: a mesh and which of its ``data`` axis splits what."""

    mesh: Mesh | None
    replica_axis: str | None = None
    batch_axis: str | None = None
    notice: str | None = None


def _devices_of(mesh: Mesh, count: int) -> list:
    """``count`` devices of ``mesh``, the same number from every process."""
    processes = sorted({d.process_index for d in mesh.devices.flat})
    per = count // len(processes)
    chosen = []
    for p in processes:
        chosen += [d for d in mesh.devices.flat if d.process_index == p][:per]
    return chosen


def place_run(mesh: Any, replicas: int | None, batch_size: int) -> Placement:
    """Whole replicas per device when they divide over the devices (no communication
    at all), else every batch split over them; when neither divides, the largest
    number of the devices that one of them divides, with a one-line notice.

    Args:
      mesh: ``"auto"`` (every device, on a ``data`` axis), None (no mesh: the
        default device), or a ``Mesh`` with a ``data`` axis.
    """
    if mesh is None:
        return Placement(None)
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"fit: mesh must be 'auto', None or a jax Mesh, got {mesh!r}")
        devices = jax.devices()
        if len(devices) == 1:
            return Placement(None)
        mesh = Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))
    if not isinstance(mesh, Mesh):
        raise TypeError(f"fit: mesh must be 'auto', None or a jax Mesh, got {mesh!r}")
    if "data" not in mesh.axis_names:
        raise ValueError(
            f"fit: mesh has axes {tuple(mesh.axis_names)}; fit splits work over one named "
            "'data' (use fnnet.distributed.mesh_from_spec('data'))"
        )
    others = {n: s for n, s in mesh.shape.items() if n != "data" and s > 1}
    if others:
        raise ValueError(
            f"fit: mesh axes other than 'data' would hold copies of the work, got {others}; "
            "fit splits over 'data' only (for other layouts, see fnnet.distributed)"
        )
    ways = mesh.shape["data"]
    if ways == 1:
        return Placement(None)
    processes = len({d.process_index for d in mesh.devices.flat})

    def fits(d):
        if d % processes:
            return None
        if replicas and replicas > 1 and replicas % d == 0:
            return "replica"
        return "batch" if batch_size % d == 0 else None

    for d in range(ways, processes - 1, -1):
        how = fits(d)
        if how is None:
            continue
        notice = None
        if d < ways:
            what = f"the {replicas} replicas nor " if replicas else ""
            notice = (
                f"fit: the {ways} devices of the mesh divide neither {what}the batch of "
                f"{batch_size}; training on {d} of them ("
                + ("one replica group per device" if how == "replica" else "each batch split")
                + f"). A batch size divisible by {ways} would use them all."
            )
            mesh = Mesh(np.asarray(_devices_of(mesh, d)), ("data",), axis_types=(AxisType.Auto,))
        if d == 1:
            return Placement(None, notice=notice)
        if how == "replica":
            return Placement(mesh, replica_axis="data", notice=notice)
        return Placement(mesh, batch_axis="data", notice=notice)
    raise ValueError(
        f"fit: {processes} processes cannot share a batch of {batch_size}"
        + (f" or {replicas} replicas" if replicas else "")
        + f"; use a batch size divisible by {processes}"
    )


# --- Values that may span processes ---------------------------------------------------


def _host(tree: Any) -> Any:
    """``tree`` as NumPy arrays; a value split over processes is gathered first."""

    def one(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(one, tree)


def _agree(value: Any) -> Any:
    """Process 0's ``value`` in every process (an int or bool, or an int array)."""
    if jax.process_count() == 1:
        return value
    shared = multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64))
    return type(value)(shared) if isinstance(value, bool | int) else np.asarray(shared)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- Evaluation, replicated or not, in one program per set -----------------------------


_EVAL_PROGRAMS: dict[Any, Callable] = {}


def _eval_program(model, metrics, policy, batch_size: int, replicated: bool) -> Callable:
    key = (model, metrics, policy, batch_size, replicated)
    if key in _EVAL_PROGRAMS:
        return _EVAL_PROGRAMS[key]

    def sums(params, model_state, xs, ys, n):
        batches = jax.tree.leaves(xs)[0].shape[0] // batch_size

        def one(i):
            start = i * batch_size

            def rows(a):
                return jax.lax.dynamic_slice_in_dim(a, start, batch_size)

            mask = start + jnp.arange(batch_size) < n
            return _batch_sums(
                model, metrics, policy, params, model_state,
                jax.tree.map(rows, xs), jax.tree.map(rows, ys), mask,
            )  # fmt: skip

        per_batch = jax.lax.map(one, jnp.arange(batches))  # {name: (batches,)}
        return {name: jnp.sum(v) for name, v in per_batch.items()}

    if replicated:
        sums = jax.vmap(sums, in_axes=(0, 0, None, None, None))
    program = _EVAL_PROGRAMS[key] = jax.jit(sums)
    return program


def _padded(tree: Any, total: int) -> Any:
    def pad(a):
        a = np.asarray(a)
        extra = total - a.shape[0]
        return a if extra == 0 else np.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1), mode="edge")

    return jax.tree.map(pad, tree)


def _evaluate_placed(evaluator, state, placed, n: int) -> list[dict[str, float | None]]:
    sums = _host(evaluator(state.params, state.model_state, *placed, n))
    count = np.size(next(iter(sums.values())))
    return [
        {
            metric: _json_number(float(np.reshape(total, -1)[r]) / n)
            for metric, total in sums.items()
        }
        for r in range(count)
    ]


def evaluate_replicas(
    model: Layer,
    state: TrainState,
    dataset: tuple[Any, Any],
    metric_fns: Mapping[str, Callable],
    *,
    batch_size: int,
    policy=None,
) -> list[dict[str, float | None]]:
    """Each replica's mean metrics over ``dataset``, as one compiled program.

    ``state`` is stacked replicas (from ``init_replicas`` or a replicated
    ``fit``), placed anywhere, on one process or several: the data is placed
    beside the parameters. A non-finite mean is None, as in ``fit``'s history.

    Returns:
      One ``{name: mean}`` per replica.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    x, y, n = _pair(dataset, "dataset")
    evaluator = _eval_program(model, tuple(metric_fns.items()), policy, batch_size, True)
    padded = _padded((x, y), math.ceil(n / batch_size) * batch_size)
    leaf = jax.tree.leaves(state.params)[0]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        placed = replicate(padded, sharding.mesh)
    else:
        placed = jax.device_put(padded)
    return _evaluate_placed(evaluator, state, placed, n)


# --- The loop -----------------------------------------------------------------------------


def _chunk_length(steps: int, per_epoch: int, intervals: list[int]) -> int:
    """Steps per dispatch: an epoch (or the shortest interval, if shorter), or a
    divisor of every interval near it, so chunks land on evaluations and
    checkpoints with one compiled program."""
    base = min([per_epoch, steps, *intervals])
    common = math.gcd(steps, *intervals)
    divisor = max(d for d in range(1, math.isqrt(common) + 1) for d in (d, common // d)
                  if common % d == 0 and d <= base)  # fmt: skip
    return divisor if 2 * divisor >= base else base


def _next_length(done: int, chunk: int, steps: int, intervals: list[int]) -> int:
    target = min([steps] + [(done // i + 1) * i for i in intervals])
    return min(chunk, target - done)


def fit(
    model: Layer,
    optimizer,
    loss_fn: Callable,
    train_data: tuple[Any, Any],
    *,
    steps: int,
    batch_size: int,
    seed: int | Sequence[int] = 0,
    hyperparams: Mapping[str, Any] | None = None,
    vectorize_replicas: bool = False,
    shuffle: bool = True,
    metric_fns: Mapping[str, Callable] | None = None,
    eval_data: Any = None,
    eval_every: int | None = None,
    eval_batch_size: int | None = None,
    early_stopping: EarlyStopping | None = None,
    checkpoint: str | os.PathLike | Checkpoints | None = None,
    callbacks: Sequence[Any] = (),
    mesh: Any = "auto",
    steps_per_call: int | None = None,
    donate: bool | None = None,
    policy: Any = "auto",
    settings: Mapping[str, Any] | None = None,
    peak_flops: float | None = None,
    progress: bool = True,
) -> FitResult:
    """Trains ``model`` for ``steps`` steps, in fused chunks, resuming if it can.

    Args:
      model: any fnnet layer or model.
      optimizer: an optax ``GradientTransformation``.
      loss_fn: per-example loss ``loss_fn(output, label) -> scalar``.
      train_data: ``(x, y)`` with the examples on the leading axis; ``x`` may be
        a dict of arrays, whose entries reach the model as keyword inputs (see
        ``fnnet.train.split_inputs``: e.g. ``{"x": tokens, "lengths": lengths}``).
        Moved to the devices once; batches are drawn there. Or a source of host
        batches, for data that does not fit there (:class:`NpyBatches`, or any
        iterator of ``(x, y)`` NumPy batches; see ``fnnet.train._stream``):
        each chunk of steps then moves its batches at once, the next chunk's
        while the devices compute; the order is the source's (``shuffle`` is
        unused), every replica sees the same batches, and a checkpoint saves
        and restores the source's ``get_state()`` (one without
        ``get_state``/``set_state`` is refused with ``checkpoint``). A source
        that ends before ``steps`` is an error naming the step.
      steps: total training steps (including any a checkpoint already holds).
      batch_size: examples per step (the ragged end of an epoch is dropped).
      seed: an int for one run, or a sequence of ints for as many replicas,
        trained side by side as one compiled program (``init_replicas``);
        replica ``r`` equals a separate run with ``seed[r]``. A replica whose
        loss, gradient or update turns non-finite stops changing and is
        reported in ``FitResult.diverged`` while the others train on.
      hyperparams: values for ``optax.inject_hyperparams`` names, a scalar or one
        per replica (``set_hyperparams``).
      vectorize_replicas: train replicas on one device side by side with
        ``jax.vmap`` instead of one after another (``jax.lax.map``). On the CPU
        this is faster for small dense models (the MNIST-1D MLP's 3 seeds: 10%)
        and slower for convolutions; replica ``r`` then equals ``seed[r]``'s own
        run to float32 rounding, not bit for bit. Replicas split over devices
        always run side by side.
      shuffle: reshuffle every epoch (False: batches in dataset order).
      metric_fns: per-example metrics ``fn(output, label)`` averaged over batches,
        logged for training and for every evaluation set.
      eval_data: ``(x, y)`` held-out examples (metrics ``eval_*``), or
        ``{name: (x, y)}`` for several sets (metrics ``name_*``).
      eval_every: steps between evaluations (default with ``eval_data``: every
        epoch); there is always one after the last step.
      eval_batch_size: examples per evaluation batch (default ``batch_size``).
      early_stopping: an :class:`EarlyStopping`.
      checkpoint: a directory or :class:`Checkpoints`. A checkpoint of the same
        run is resumed from; one of a different run (model, optimizer, data,
        batch size, seeds, ...) is a :class:`ResumeError` naming what differs.
        The directory is locked while ``fit`` runs.
      callbacks: objects with ``on_start``, ``on_chunk_end``, ``on_evaluation``,
        ``on_checkpoint`` and ``on_end`` hooks (``fnnet.train.JsonLog``,
        ``TensorBoard``, ``RestoreBest``; see ``fnnet.train._callbacks``).
      mesh: ``"auto"``: every device on a ``data`` axis (nothing to do on one
        device); None: the default device only; or a ``jax.sharding.Mesh`` with
        a ``data`` axis. Replicas are split over it when they divide, else each
        batch; when neither divides, fewer devices are used, with a notice.
      steps_per_call: steps per compiled dispatch (default: about an epoch, cut
        so chunks end where evaluations and checkpoints fall).
      donate: give each chunk the training state's buffers (the state then
        takes its memory once instead of twice; results bitwise the same).
        None (the default): on GPUs and TPUs, not on the CPU. A donated state
        lives only until the next chunk: a callback that keeps something of
        ``event.state`` must copy it (``RestoreBest`` does), and a
        :class:`NonFiniteError` carries no ``last_finite_state`` (restore the
        last checkpoint instead).
      policy: the precision: ``"auto"`` (bfloat16 compute with float32
        parameters, outputs and normalization statistics on GPUs and TPUs;
        float32 on the CPU), ``"float32"``, ``"bfloat16"``, a mixed-precision
        ``Policy``, or None (no casts). The result's ``precision`` says which ran.
      settings: extra JSON-able facts stored in checkpoints and compared on resume.
      peak_flops: one device's peak FLOP/s, for the history's ``mfu`` (default:
        ``FNNET_PEAK_FLOPS``, else the vendor's dense bfloat16 figure for a known
        GPU or TPU; the CPU has none, so its rows carry no ``mfu``).
      progress: a bar on a terminal, else a line every 30 seconds (process 0 only).

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteError: (one run) the loss, a gradient or the update became
        non-finite; the message names the step, and ``error.last_finite_state``
        holds the state at the start of that chunk, finite in every value. No
        checkpoint is written after it.
      ResumeError: ``checkpoint`` holds another run.
      ValueError, TypeError: an argument no run could use, before any work.
    """
    # Everything is checked before anything is compiled or written.
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch_size")
    steps_per_call = _positive_int(steps_per_call, "steps_per_call", optional=True)
    seed, replicas = _seeds(seed)
    if not isinstance(vectorize_replicas, bool):
        raise TypeError(
            f"fit: vectorize_replicas must be True or False, got {vectorize_replicas!r}"
        )
    if vectorize_replicas and replicas is None:
        raise ValueError(
            "fit: vectorize_replicas=True has no effect on one run; give several seeds "
            "(seed=[0, 1, 2]) or leave it out"
        )
    feed = None
    if _stream.is_source(train_data):
        feed, per_epoch = _stream.open_source(train_data, batch_size, checkpoint)
        x, y = feed.first_batch
    else:
        x, y, num_examples = _pair(train_data, "train_data")
        if batch_size > num_examples:
            raise ValueError(
                f"fit: batch_size {batch_size} exceeds the {num_examples} examples of train_data"
            )
        per_epoch = num_examples // batch_size
    sets = _eval_sets(eval_data)
    if eval_every is not None and not sets:
        raise ValueError(f"fit: eval_every={eval_every!r} was given without eval_data to evaluate")
    if eval_batch_size is not None and not sets:
        raise ValueError("fit: eval_batch_size was given without eval_data to evaluate")
    eval_every = _positive_int(eval_every, "eval_every", optional=True)
    if sets and eval_every is None:
        if per_epoch is None:
            raise ValueError(
                "fit: train_data is a source without steps_per_epoch, so say how often to "
                "evaluate eval_data: eval_every=STEPS"
            )
        eval_every = per_epoch
    eval_batch_size = _positive_int(eval_batch_size or batch_size, "eval_batch_size")
    metric_fns = dict(metric_fns or {})
    if "loss" in metric_fns:
        raise ValueError('fit: metric_fns must not use the name "loss"; fit reports it itself')
    evaluated = ["loss", *metric_fns]
    known = [f"{name}_{m}" for name in sets for m in evaluated]
    mode = _check_early_stopping(early_stopping, known)
    checkpoint = _check_checkpoints(checkpoint)
    callbacks = _callbacks.check_callbacks(list(callbacks))
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if isinstance(callback, _callbacks.RestoreBest) and monitor not in known:
            raise ValueError(
                f"fit: RestoreBest monitors {monitor!r}, which no evaluation reports"
                f"{_did_you_mean(str(monitor), known)}; it could watch one of "
                f"{', '.join(known) or '(nothing: no eval_data)'}"
            )
    if not isinstance(progress, bool):
        raise TypeError(f"fit: progress must be True or False, got {progress!r}")
    if hyperparams is not None and not isinstance(hyperparams, Mapping):
        raise TypeError(f"fit: hyperparams must be a dict name -> value, got {hyperparams!r}")
    where = place_run(mesh, replicas, batch_size)
    if feed is not None:
        _stream.check_shared(feed, where.mesh, "fit")
    platform = jax.default_backend() if where.mesh is None else where.mesh.devices.flat[0].platform
    first_device = jax.devices()[0] if where.mesh is None else where.mesh.devices.flat[0]
    peak = _cost.peak_flops(first_device, override=peak_flops)
    policy = resolve_policy(policy, platform, argument="fit: policy")
    if donate is None:
        donate = platform != "cpu"
    elif not isinstance(donate, bool):
        raise TypeError(f"fit: donate must be True, False or None (by platform), got {donate!r}")
    example = jax.tree.map(lambda a: np.asarray(a[0]), x)
    check_labels(model, example, y, where="train_data")
    for name, (_, labels) in sets.items():
        check_labels(
            model, example, labels, where="eval_data" if name == "eval" else f"eval_data[{name!r}]"
        )
    primary = jax.process_index() == 0
    notices = []
    if where.notice is not None:
        notices.append(where.notice)
        if primary:
            print(where.notice, file=sys.stderr)

    run_identity = {
        "model": _model_identity(model, example),
        "optimizer": fingerprint(optimizer),
        "loss": fingerprint(loss_fn),
        "metrics": sorted(metric_fns),
        "data": data_fingerprint((x, y)) if feed is None else _stream.identity(train_data, feed),
        "batch_size": batch_size,
        "seed": seed if replicas is None else seed.tolist(),
        "vectorize_replicas": vectorize_replicas,
        "shuffle": bool(shuffle),
        "hyperparams": fingerprint(dict(hyperparams or {})),
        "policy": fingerprint(policy),
        "settings": fingerprint(dict(settings or {})),
    }

    directory = lock = None
    if checkpoint is not None:
        directory = check_checkpoint_dir(checkpoint.directory, argument="checkpoint")
        check_shared(directory, argument="checkpoint")
        if primary and isinstance(directory, pathlib.Path):
            lock = DirectoryLock(directory)
            lock.acquire()
        elif primary:
            notice = (
                f"fit: {directory} is a bucket, where no lock can be taken: make sure no "
                "other run trains into it"
            )
            notices.append(notice)
            print(notice, file=sys.stderr)
    manager = None
    try:
        if checkpoint is not None:
            # fit holds the directory's lock: no save of another run is under way.
            manager = CheckpointStore(
                directory, keep=checkpoint.keep, async_save=checkpoint.async_save,
                remove_unfinished=True,
            )  # fmt: skip
            for path in manager.removed:
                notice = f"fit: removed {path}, the unfinished save of an interrupted run"
                notices.append(notice)
                print(notice, file=sys.stderr)
        return _train(
            model, optimizer, loss_fn, (x, y) if feed is None else feed, sets, steps=steps,
            batch_size=batch_size, per_epoch=per_epoch, seed=seed, replicas=replicas,
            hyperparams=hyperparams, vectorize_replicas=vectorize_replicas, shuffle=shuffle,
            metric_fns=metric_fns, eval_every=eval_every,
            eval_batch_size=eval_batch_size, early_stopping=early_stopping, mode=mode,
            checkpoint=checkpoint, directory=directory, manager=manager, callbacks=callbacks,
            where=where,
            steps_per_call=steps_per_call, donate=donate, policy=policy, peak=peak,
            run_identity=run_identity,
            settings=dict(settings or {}), progress=progress, notices=notices,
        )  # fmt: skip
    finally:
        if manager is not None:
            manager.close()  # the last save is committed before fit returns (or raises)
        if lock is not None:
            lock.release()


def _train(
    model, optimizer, loss_fn, data, sets, *, steps, batch_size, per_epoch, seed, replicas,
    hyperparams, vectorize_replicas, shuffle, metric_fns, eval_every, eval_batch_size,
    early_stopping, mode,
    checkpoint, directory, manager, callbacks, where, steps_per_call, donate, policy, peak,
    run_identity, settings, progress, notices,
) -> FitResult:  # fmt: skip
    primary = jax.process_index() == 0
    replicated = replicas is not None
    count = replicas or 1
    clock = CompileClock()
    feed, data = (data, data.first_batch) if isinstance(data, _stream.Feed) else (None, data)
    x, _ = data
    example = jax.tree.map(lambda a: np.asarray(a[0]), x)
    with clock.running():
        if replicated:
            state = init_replicas(model, optimizer, example, seed)
        else:
            state = init_state(model, optimizer, example, seed=seed)
        if hyperparams:
            state = set_hyperparams(state, **dict(hyperparams))
    _check_initial(state)
    # A replica whose step is not finite must keep finite values while the others
    # train on: the whole stacked state is checkpointed, and checkpoints refuse NaN.
    step_fn = make_train_step(
        model, optimizer, loss_fn, policy=policy, metric_fns=metric_fns,
        skip_nonfinite=replicated, spmd_axis_name=where.batch_axis,
    )  # fmt: skip
    cost = _step_cost(step_fn, state, data, batch_size, replicated, peak, where)
    intervals = [i for i in (eval_every, checkpoint and checkpoint.every) if i]
    if feed is not None:  # a chunk of batches is on the devices: keep it small
        per_epoch = min(per_epoch or math.inf, _stream.default_chunk(feed))
    chunk = steps_per_call or _chunk_length(steps, per_epoch, intervals)
    fused = {"batch_size": batch_size, "shuffle": shuffle, "replicated": replicated,
             "vectorize_replicas": vectorize_replicas, "donate": donate}  # fmt: skip
    if where.mesh is not None:
        state = shard_state(state, where.mesh, replica_axis=where.replica_axis)
        placed_data = replicate(data, where.mesh) if feed is None else feed
    else:
        placed_data = jax.device_put(data) if feed is None else feed
    if feed is not None:  # each chunk reads the next one ahead
        feed.plan = lambda at: _next_length(at, chunk, steps, intervals) if at < steps else 0
    programs: dict[int, Callable] = {}

    def program(length: int) -> Callable:
        if length not in programs:
            if where.mesh is not None:
                programs[length] = make_sharded_steps(
                    step_fn, placed_data, where.mesh, batch_axis=where.batch_axis,
                    replica_axis=where.replica_axis, num_steps=length, **fused,
                )  # fmt: skip
            else:
                programs[length] = make_fused_steps(step_fn, placed_data, num_steps=length, **fused)
        return programs[length]

    # The evaluation sets, padded to whole batches and placed once.
    metrics = tuple({"loss": loss_fn, **metric_fns}.items())
    evaluator = _eval_program(model, metrics, policy, eval_batch_size, replicated)
    placed_sets = {}
    for name, (ex, ey) in sets.items():
        n = jax.tree.leaves((ex, ey))[0].shape[0]
        total = math.ceil(n / eval_batch_size) * eval_batch_size
        padded = _padded((ex, ey), total)
        placed = replicate(padded, where.mesh) if where.mesh is not None else jax.device_put(padded)
        placed_sets[name] = (placed, n)

    def evaluate_all(state) -> list[dict[str, float]]:
        rows = [{} for _ in range(count)]
        for name, (placed, n) in placed_sets.items():
            for r, scores in enumerate(_evaluate_placed(evaluator, state, placed, n)):
                rows[r].update({f"{name}_{metric}": value for metric, value in scores.items()})
        return rows

    # Resume: process 0 says from which step, every process restores it.
    history: list[dict[str, Any]] = []
    stopping = {"best": [None] * count, "since": [0] * count, "stopped": [False] * count}
    diverged: list[int | None] = [None] * count
    done = 0
    resumed_from = None
    seconds = {"train": 0.0, "compile": 0.0, "evaluate": 0.0}
    saved_callbacks = [c for c in callbacks if hasattr(c, "save")]
    event = _callbacks.Event(
        step=0, steps=steps, state=state, rows=[], history=history, replicas=replicas,
        primary=primary, sets=tuple(sets),
    )  # fmt: skip
    # A resumable callback starts fresh first: its tree shapes the restore's target.
    _callbacks.call(saved_callbacks, "on_start", event)
    if manager is not None:
        latest = manager.latest_step() if primary else None
        latest = _agree(-1 if latest is None else latest)
        if latest >= 0:
            record = load_metadata(directory, latest)
            _check_same_run(directory, latest, record.get("run"), run_identity)
            target = {"state": state, "callbacks": [c.save() for c in saved_callbacks]}
            tree, record = manager.restore(latest, target=target)
            state = tree["state"]
            for callback, saved in zip(saved_callbacks, tree["callbacks"]):
                callback.load(saved)
            loop = record["loop"]
            done, resumed_from = int(loop["step"]), latest
            if feed is not None:
                feed.restore(loop["data"], done)
            history[:] = loop["history"]
            stopping = loop["stopping"]
            diverged = loop["diverged"]
            seconds = loop["seconds"]
            if where.mesh is not None:
                state = shard_state(state, where.mesh, replica_axis=where.replica_axis)
            if done >= steps or all(
                s or d is not None for s, d in zip(stopping["stopped"], diverged)
            ):
                how = "finished" if done >= steps else "stopped early or diverged"
                notice = (
                    f"fit: the run in {directory} has {how} (step {done} of steps={steps}); "
                    "returning it. To train on, pass a larger steps= (a finished run) or "
                    "another checkpoint directory to start afresh."
                )
                notices.append(notice)
                if primary:
                    print(notice, file=sys.stderr)
    event.step, event.state = done, state
    if progress:
        callbacks = [*callbacks, _callbacks.Progress()]
    _callbacks.call([c for c in callbacks if c not in saved_callbacks], "on_start", event)

    def finished() -> bool:
        ended = [s or d is not None for s, d in zip(stopping["stopped"], diverged)]
        return done >= steps or all(ended)

    def save(state, rows) -> pathlib.Path:
        loop = {
            "step": done, "history": history, "stopping": stopping, "diverged": diverged,
            "seconds": seconds,
        }  # fmt: skip
        if feed is not None:
            loop["data"] = feed.saved()  # where the source stands after step `done`
        tree = {"state": state, "callbacks": [c.save() for c in saved_callbacks]}
        metadata = {
            "run": run_identity,
            "loop": loop,
            "model": config_of(model),
            "example": _example_spec(example),
            "settings": settings,
            "fit": {"batch_size": batch_size, "steps": steps, "replicas": replicas},
        }
        return manager.save(done, tree, metadata=metadata, metrics=None if replicated else rows[0])

    last_save = time.monotonic()
    while not finished():
        length = _next_length(done, chunk, steps, intervals)
        chunk_clock = CompileClock()
        start = time.perf_counter()
        stopped_now = np.asarray(stopping["stopped"]) if replicated else np.zeros(1, bool)
        if not donate:
            before = state
        elif stopped_now.any():
            # The chunk takes the state's buffers: keep a copy of the stopped replicas'.
            before = _rows_of(state, np.flatnonzero(stopped_now))
        else:
            before = None
        with chunk_clock.running(), clock.running():
            state, chunk_metrics = program(length)(state)
            chunk_metrics = _host(chunk_metrics)
        elapsed = time.perf_counter() - start
        # JAX's compile events can nest (a lowering that traces inner functions), so
        # their sum may exceed a short chunk whose programs came from the cache.
        seconds["train"] += max(0.0, elapsed - chunk_clock.seconds)
        done += length
        bad = np.reshape(_host(state.nonfinite_step), -1)
        what = np.reshape(_host(state.nonfinite_what), -1)
        if not replicated and bad[0] >= 0:
            error = NonFiniteError(int(bad[0]), _WHAT.get(int(what[0]), "update"))
            error.last_finite_state = before  # None when the chunk was given it (donate)
            raise error
        if replicated and stopped_now.any():
            state = _freeze(state, before, stopped_now, where, kept_rows=donate)
        rows = []
        for r in range(count):
            if stopping["stopped"][r]:
                continue
            row: dict[str, Any] = {"step": done}
            if replicated:
                row["replica"] = r
            for name, values in chunk_metrics.items():
                row[name] = _json_number(float(np.mean(np.reshape(values, (count, -1))[r])))
            row["steps_per_second"] = length / max(elapsed, 1e-9)
            row.update(_throughput(row["steps_per_second"], batch_size, cost, count))
            if replicated:
                if bad[r] >= 0 and diverged[r] is None:
                    diverged[r] = int(bad[r])
                    notice = (
                        f"fit: replica {r} (seed {int(np.asarray(seed)[r])}) diverged at step "
                        f"{int(bad[r])} ({_WHAT.get(int(what[r]), 'update')} not finite); it "
                        "keeps its last finite values, the others train on"
                    )
                    notices.append(notice)
                    if primary:
                        print(notice, file=sys.stderr)
                row["diverged"] = diverged[r] is not None
            rows.append(row)
        evaluate_now = bool(sets) and (done % eval_every == 0 or done >= steps)
        if evaluate_now:
            eval_start = time.perf_counter()
            with clock.running():
                scores = evaluate_all(state)
            seconds["evaluate"] += time.perf_counter() - eval_start
            for row in rows:
                row.update(scores[row.get("replica", 0)])
            if early_stopping is not None:
                _update_stopping(stopping, rows, early_stopping, mode, diverged)
        history.extend(rows)
        event.step, event.state, event.rows = done, state, rows
        event.compile_seconds = chunk_clock.seconds
        _callbacks.call(callbacks, "on_chunk_end", event)
        if evaluate_now:
            _callbacks.call(callbacks, "on_evaluation", event)
        if manager is not None:
            waited = time.monotonic() - last_save
            due = (
                finished()
                or (checkpoint.every is not None and done % checkpoint.every == 0)
                or (checkpoint.seconds is not None and waited >= checkpoint.seconds)
                or (checkpoint.every is None and checkpoint.seconds is None and evaluate_now)
            )
            if _agree(bool(due)):
                seconds["compile"] = clock.seconds
                event.checkpoint = save(state, rows)
                _callbacks.call(callbacks, "on_checkpoint", event)
                event.checkpoint = None
                last_save = time.monotonic()
        stop = _agree(bool(finished()))
        if stop:
            break
    if manager is not None:
        manager.wait()  # the last checkpoint is on disk before the result is handed out
    seconds["compile"] = clock.seconds
    stopped = [bool(s) for s in stopping["stopped"]]
    result = FitResult(
        state=state,
        history=history,
        stopped_early=stopped if replicated else stopped[0],
        resumed_from=resumed_from,
        replicas=replicas,
        diverged=diverged if replicated else None,
        seconds={k: round(v, 6) for k, v in seconds.items()},
        notices=notices,
        policy=policy,
        precision=describe_policy(policy, state.params),
        cost={k: v for k, v in cost.items() if k != "tokens_per_example"},
    )
    for callback in callbacks:
        on_end = getattr(callback, "on_end", None)
        if on_end is not None:
            replaced = on_end(result)
            if replaced is not None:
                result = replaced
    return result


def _check_initial(state: TrainState) -> None:
    """The initial values must be finite, so every state ``fit`` hands back is."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        {"params": state.params, "model_state": state.model_state}
    ):
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(
                f"fit: the model's initial {jax.tree_util.keystr(path)} is not finite; "
                "check its layer's initializer"
            )


def _model_identity(model: Layer, example: Any) -> dict:
    """What the resume check compares of a model: its configuration when fnnet can
    rebuild it, and in any case its kind and every parameter's path and shape."""
    shapes = jax.eval_shape(lambda: init_example(model, jax.random.key(0), example))
    return {
        "config": config_of(model),
        "kind": model.kind,
        "shapes": {
            jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
        },
    }


def _step_cost(step_fn, state, data, batch_size, replicated, peak, where) -> dict[str, Any]:
    """What ``_throughput`` needs: the step's FLOPs (when a peak makes them useful),
    the peak, the devices, and the tokens in one example (None: not token ids)."""
    first = jax.tree.leaves(data[0])[0]
    tokens = None
    if jnp.issubdtype(first.dtype, jnp.integer) and first.ndim >= 2:
        tokens = int(np.prod(first.shape[1:]))  # an example of token ids (seq,)
    devices = 1 if where.mesh is None else int(where.mesh.devices.size)
    flops, source = None, peak.source
    if peak.flops is not None:

        def struct(a, lead=(), drop=0):
            return jax.ShapeDtypeStruct((*lead, *np.shape(a)[drop:]), a.dtype)

        one = jax.tree.map(lambda a: struct(a, drop=int(replicated)), state)
        batch = jax.tree.map(lambda a: struct(a, (batch_size,), drop=1), data)
        replicas = np.shape(state.step)[0] if replicated else 1
        try:
            flops = _cost.matmul_flops(step_fn, one, batch) * replicas
        except ValueError as e:  # a while_loop: no trip count, so no count and no MFU
            source = f"{peak.source}; the step's FLOPs are unknown: {e}"
    return {
        "flops_per_step": flops, "peak_flops": peak.flops, "peak_source": source,
        "devices": devices, "tokens_per_example": tokens,
    }  # fmt: skip


def _throughput(steps_per_second: float, batch_size: int, cost, replicas: int) -> dict:
    """A history row's rates: examples (and tokens) per second of one replica, and
    the MFU of the whole program where the step's FLOPs and a peak are known."""
    rates = {"examples_per_second": steps_per_second * batch_size}
    if cost["tokens_per_example"] is not None:
        rates["tokens_per_second"] = rates["examples_per_second"] * cost["tokens_per_example"]
    if cost["flops_per_step"] is not None:
        rates["mfu"] = _cost.mfu(
            cost["flops_per_step"], 1.0 / max(steps_per_second, 1e-12), cost["peak_flops"],
            cost["devices"],
        )  # fmt: skip
    return rates


def _frozen_leaf(leaf) -> bool:
    """Whether ``_freeze`` restores this leaf (arrays; PRNG keys stay as they are)."""
    return hasattr(leaf, "ndim") and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _rows_of(state, rows: np.ndarray):
    """Copies of the replicas ``rows`` of a stacked state (what ``_freeze`` restores)."""
    return jax.tree.map(lambda a: a[rows] if _frozen_leaf(a) else a, state)


def _freeze(state, before, stopped: np.ndarray, where: Placement, *, kept_rows: bool = False):
    """The stopped replicas as they were before the chunk, the others as they are now.

    ``before`` is the whole state before the chunk, or with ``kept_rows`` only the
    stopped replicas' rows of it (``_rows_of``: the chunk was given the state).
    """
    mask = jnp.asarray(stopped)
    rows = np.flatnonzero(stopped)

    def pick(new, old):
        if not _frozen_leaf(new):
            return new
        if kept_rows:
            return new.at[rows].set(old)
        m = mask.reshape(mask.shape + (1,) * (new.ndim - 1))
        return jnp.where(m, old, new)

    frozen = jax.tree.map(pick, state, before)
    if where.mesh is not None:
        frozen = shard_state(frozen, where.mesh, replica_axis=where.replica_axis)
    return frozen


def _update_stopping(stopping, rows, early_stopping, mode, diverged) -> None:
    for row in rows:
        r = row.get("replica", 0)
        value = row.get(early_stopping.monitor)
        if value is None or diverged[r] is not None:
            continue
        score = value if mode == "max" else -value
        best = stopping["best"][r]
        if best is None or score > best:
            stopping["best"][r], stopping["since"][r] = score, 0
        else:
            stopping["since"][r] += 1
            if stopping["since"][r] >= early_stopping.patience:
                stopping["stopped"][r] = True


def _check_same_run(directory, step: int, saved: Any, now: dict) -> None:
    if saved is None:
        raise ResumeError(
            f"checkpoint: {directory} holds a checkpoint (step {step}) that fit did not write "
            "(its record has no run description); give fit another directory",
            [],
        )
    lines = differences(saved, now)
    if lines:
        shown = "\n".join(f"  - {line}" for line in lines[:20])
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        raise ResumeError(
            f"checkpoint: {directory} holds a different run (step {step}), so fit will not "
            f"resume it:\n{shown}{more}\nTo start afresh, give another checkpoint directory "
            "or delete this one; to resume it, pass the settings it was trained with.",
            lines,
        )


def load_model(checkpoint_dir: str | pathlib.Path, step: int | None = None):
    """Rebuilds a shipped model and its trained parameters from a checkpoint of ``fit``.

    Returns:
      ``(model, params, model_state, metadata)``; ``params`` keep a leading
      replica axis when the run trained several seeds (``metadata["fit"]["replicas"]``).

    Raises:
      ValueError: the model is not one fnnet ships (or the checkpoint is not
        ``fit``'s); the message says how to restore it into your own model.
    """
    metadata = load_metadata(checkpoint_dir, step)
    if metadata.get("model") is None:
        raise ValueError(
            f"the checkpoint in {checkpoint_dir} holds a model fnnet cannot rebuild from its "
            "record (not one of fnnet.models, or built with arguments JSON cannot hold). "
            "Build the model as you did for training, then restore its weights with "
            f"tree, record = fnnet.train.CheckpointStore({str(checkpoint_dir)!r}).restore(); "
            "params = tree['state'].params (or pass target= to restore onto devices)."
        )
    tree, metadata = CheckpointStore(checkpoint_dir).restore(step)
    model = build(metadata["model"])
    state = tree["state"]
    _check_rebuilt(model, state, metadata, checkpoint_dir)
    return model, state.params, state.model_state, metadata


def _example_spec(example: Any) -> Any:
    """One input's shapes and dtypes as JSON (a dict of inputs stays a dict)."""
    if isinstance(example, Mapping):
        return {str(k): _example_spec(v) for k, v in example.items()}
    return {"shape": list(np.shape(example)), "dtype": str(np.asarray(example).dtype)}


def _example_struct(spec: Any) -> Any:
    if set(spec) == {"shape", "dtype"} and isinstance(spec["shape"], list):
        return jax.ShapeDtypeStruct(tuple(spec["shape"]), np.dtype(spec["dtype"]))
    return {k: _example_struct(v) for k, v in spec.items()}


def _check_rebuilt(model: Layer, state: Any, metadata: dict, directory: Any) -> None:
    """The model rebuilt from the record must have exactly the restored parameters: a
    record that says another model than the weights were trained for is refused."""
    params = state.params
    if metadata["fit"]["replicas"] is not None:  # one replica's shapes
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params)
    try:
        check_params(model, params, _example_struct(metadata["example"]), where="load_model")
    except ParamsError as e:
        raise ParamsError(
            f"the checkpoint in {directory} holds weights that do not fit the model its "
            f"record describes: {e}"
        ) from None
