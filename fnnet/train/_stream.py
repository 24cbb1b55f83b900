"""Training data streamed from the host: sources of batches, a reader of ``.npy`` files,
and the fused program that runs on batches it is handed.

A **source** is an iterator of host batches. ``next(source)`` gives ``(x, y)``:
NumPy arrays (``x`` may be a dict of them, as for in-memory data) whose leading
axis holds this process's rows of one global batch, ``batch_size //
process_count`` of them. A source may also have

* ``batch_size``: the global batch size; ``fit`` checks it against its own;
* ``get_state() -> JSON-able`` and ``set_state(state)``: where it stands, so a
  checkpoint resumes the data exactly (``fit`` refuses a checkpoint without them);
* ``steps_per_epoch``: ``fit``'s default for ``eval_every`` and its chunk length;
* ``fingerprint() -> JSON-able``: what the resume check compares of the data
  (default: the batches' shapes and dtypes and the source's type);
* ``next_batches(count)``: the next ``count`` batches at once, every leaf
  stacked ``(count, rows, ...)``, as ``count`` calls of ``next`` would give
  them; a chunk is then read with one call instead of ``count``.

Each fused call stacks ``K`` batches into ``(K, batch, ...)`` arrays, moves them
to the devices in one transfer (split over the mesh's batch axis, each process
giving its own rows), and runs ``K`` steps as a ``jax.lax.scan`` over them. The
next ``K`` are read and transferred right after the call is dispatched, while
the devices compute. The device never holds more than two chunks of batches.

:class:`NpyBatches` reads memory-mapped ``.npy`` files, only the rows of each
batch, in the order ``fit`` draws in-memory data with the same seed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fnnet._src.cpu_layout import canonicalize_convolutions
from fnnet.train._data import epoch_order
from fnnet.train._fingerprint import data_fingerprint

# The default chunk is cut so its batches take at most this much device memory
# (and twice that with the next chunk in flight).
_CHUNK_BYTES = 2**28
_NPY_MAGIC = b"\x93NUMPY"


class SourceError(ValueError):
    """A source of batches that ``fit`` cannot train on: a wrong batch, an early end."""


def is_source(data: Any) -> bool:
    """Whether ``data`` is a source of host batches (an iterator, or a :class:`Feed`
    of one) rather than ``(x, y)`` arrays."""
    if isinstance(data, Feed):
        return True
    return hasattr(data, "__next__") and not isinstance(data, tuple | list | Mapping)


def resumable(source: Any) -> bool:
    return callable(getattr(source, "get_state", None)) and callable(
        getattr(source, "set_state", None)
    )


# --- Reading .npy files -----------------------------------------------------------------


def _host_cpu() -> jax.Device:
    """This process's own CPU device. ``jax.devices("cpu")`` lists every process's
    under ``jax.distributed``, and the first belongs to process 0: another process
    computing there could not read the result back."""
    return jax.local_devices(backend="cpu")[0]


def _open_npy(path: str | os.PathLike, role: str) -> np.memmap:
    """``path`` memory-mapped read-only; every way it can be unreadable names it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"NpyBatches: {role} file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"NpyBatches: {role} path {path!r} is a directory, not a .npy file")
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise ValueError(
                f"NpyBatches: {role} file {path!r} is not a .npy file (no NumPy header; "
                "write it with numpy.save; .npz archives are not memory-mappable)"
            )
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:  # 2.0, or 3.0: the same header with a longer length field
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as error:
            raise ValueError(
                f"NpyBatches: {role} file {path!r} has a broken header: {error}"
            ) from None
        offset = f.tell()
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise ValueError(
            f"NpyBatches: {role} file {path!r} holds {dtype}; training reads numbers "
            "(bool, integer or floating arrays)"
        )
    if fortran:
        raise ValueError(
            f"NpyBatches: {role} file {path!r} is stored in Fortran order, so a row is not "
            "contiguous; save numpy.ascontiguousarray of it"
        )
    if len(shape) == 0:
        raise ValueError(f"NpyBatches: {role} file {path!r} holds a scalar, not rows of examples")
    need = offset + math.prod(shape) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        raise ValueError(
            f"NpyBatches: {role} file {path!r} is truncated: its header says {dtype}"
            f"{list(shape)} ({need} bytes with the header), the file has {size}"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


# One compiled program, not a dozen dispatches of single operations (7 ms for 4,000
# examples on the CPU); integer arithmetic and a sort, so the same order to the bit.
_epoch_order_program = jax.jit(epoch_order, static_argnames=("num_examples", "shuffle"))


class NpyBatches:
    """Batches read from memory-mapped ``.npy`` files, only the rows each one needs.

    Epoch ``e`` visits the examples in the order ``fit`` draws in-memory data
    with ``seed`` (``permutation(fold_in(data_key, e))`` with the data key of
    ``init_state(seed=seed)``, computed on the CPU), so ``fit(model, ...,
    NpyBatches(x, y, batch_size=B, seed=s), seed=s)`` trains as ``fit`` on the
    arrays themselves does. The ragged end of each epoch is dropped, and epochs
    repeat without end. Where it stands is the step alone (``get_state()`` is
    ``{"step": n}``), so a checkpoint resumes it exactly.

    Args:
      x: the path of the inputs' ``.npy``, or a dict of paths (``{"x": ...,
        "lengths": ...}``, which reach the model as keyword inputs).
      y: the path of the labels' ``.npy``.
      batch_size: the global batch size.
      seed: the shuffle's seed (give ``fit`` the same one for its order).
      shuffle: reshuffle every epoch (False: the files' order).
      process_index, process_count: this process's share of each batch, rows
        ``[i * B/n, (i + 1) * B/n)`` of it (default: JAX's process index and count).

    Raises:
      FileNotFoundError, ValueError: a missing file, one that is not ``.npy``,
        is truncated or holds no numbers, or files whose row counts differ;
        each names the file.
    """

    def __init__(
        self,
        x: str | os.PathLike | Mapping[str, str | os.PathLike],
        y: str | os.PathLike,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(
                f"NpyBatches: batch_size must be a positive integer, got {batch_size!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"NpyBatches: seed must be an int, got {seed!r}")
        paths = {"y": y}
        if isinstance(x, Mapping):
            paths.update({f"x[{k!r}]": v for k, v in x.items()})
            self._x_keys = list(x)
        else:
            paths["x"] = x
            self._x_keys = None
        self._arrays = {role: _open_npy(path, role) for role, path in paths.items()}
        self._paths = {role: os.fspath(path) for role, path in paths.items()}
        rows = {role: a.shape[0] for role, a in self._arrays.items()}
        if len(set(rows.values())) != 1:
            listed = ", ".join(f"{self._paths[r]!r} ({n})" for r, n in rows.items())
            raise ValueError(f"NpyBatches: the files' row counts differ: {listed}")
        self.num_examples = rows["y"]
        if batch_size > self.num_examples:
            raise ValueError(
                f"NpyBatches: batch_size {batch_size} exceeds the {self.num_examples} rows of "
                f"{self._paths['y']!r}"
            )
        count = jax.process_count() if process_count is None else process_count
        index = jax.process_index() if process_index is None else process_index
        if not 0 <= index < count or batch_size % count:
            raise ValueError(
                f"NpyBatches: process {index} of {count} cannot take an equal share of a "
                f"batch of {batch_size}; use a batch size divisible by {count}"
            )
        share = batch_size // count
        self._rows = slice(index * share, (index + 1) * share)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.steps_per_epoch = self.num_examples // batch_size
        self._step = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order)
        self._next_order: tuple[int, jax.Array] | None = None  # (epoch, its order, under way)
        # The data key of init_state(seed=seed), whose epochs fit shuffles in memory.
        with jax.default_device(_host_cpu()):
            self._data_key = jax.random.split(jax.random.key(seed), 3)[2]

    def __iter__(self) -> NpyBatches:
        return self

    def _start_order(self, epoch: int) -> jax.Array:
        with jax.default_device(_host_cpu()):
            return _epoch_order_program(self._data_key, epoch, num_examples=self.num_examples)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order; the next epoch's is started as this one is fetched.

        On the CPU backend the order is computed on the device that trains, after
        the programs already queued there: fetched at once, it would keep the read
        ahead waiting for the chunk it should overlap. Started an epoch early it
        runs between two chunks and is there when the next epoch begins.
        """
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        if not self.shuffle:
            self._order = (epoch, np.arange(self.num_examples, dtype=np.int32))
            return self._order[1]
        ahead = self._next_order
        order = ahead[1] if ahead is not None and ahead[0] == epoch else self._start_order(epoch)
        self._order = (epoch, np.asarray(order))
        self._next_order = (epoch + 1, self._start_order(epoch + 1))
        return self._order[1]

    def _rows_of(self, step: int) -> np.ndarray:
        """The example indices of this process's share of batch ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self._epoch_order(epoch)[start : start + self.batch_size][self._rows]

    def _read_rows(self, rows: np.ndarray) -> tuple[Any, np.ndarray]:
        # Fancy indexing reads just these rows of the mapped file (as a copy).
        batch = {role: np.asarray(a[rows]) for role, a in self._arrays.items()}
        if self._x_keys is None:
            return batch["x"], batch["y"]
        return {k: batch[f"x[{k!r}]"] for k in self._x_keys}, batch["y"]

    def __next__(self) -> tuple[Any, np.ndarray]:
        rows = self._rows_of(self._step)  # (rows,)
        self._step += 1
        return self._read_rows(rows)

    def next_batches(self, count: int) -> tuple[Any, np.ndarray]:
        """The next ``count`` batches, every leaf ``(count, rows, ...)``: what ``count``
        calls of ``next`` give, stacked, read with one gather a file.

        ``fit`` reads its chunks this way. A batch at a time, the host's work (two
        small gathers a step, their checks, then a stack) came to a fifth of the
        MNIST-1D MLP's step at batch 100 on two CPU cores, where it competes with
        the step itself for the cores.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise ValueError(
                f"NpyBatches.next_batches: count must be a positive int, got {count!r}"
            )
        rows = np.stack([self._rows_of(self._step + i) for i in range(count)])  # (count, rows)
        self._step += count
        return self._read_rows(rows)

    def get_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_state(self, state: Any) -> None:
        step = state.get("step") if isinstance(state, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"NpyBatches.set_state: expected {{'step': n >= 0}}, got {state!r}")
        self._step = step

    def fingerprint(self) -> dict[str, Any]:
        """The files' shapes, dtypes, sizes and first and last rows, and the batching."""
        files = {}
        for role, array in self._arrays.items():
            entry = data_fingerprint(array)["(root)"]
            entry["bytes"] = os.path.getsize(self._paths[role])
            files[role] = entry
        return {
            "kind": "NpyBatches", "files": files, "batch_size": self.batch_size,
            "seed": self.seed, "shuffle": self.shuffle,
        }  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"NpyBatches({self._paths}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle}, step={self._step})"
        )


# --- Feeding the devices ------------------------------------------------------------------


def _gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int64(raw.size)))  # (procs,)
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(padded))  # (procs, longest)
    return [json.loads(bytes(row[:length]).decode()) for row, length in zip(every, lengths)]


class Feed:
    """Reads a source's batches, checks them, and puts them on the devices a chunk at a time.

    Keeps the source's state as it stood after the last batch a chunk took,
    so a checkpoint records where the data stands for the steps done, not for
    the chunk read ahead.
    """

    def __init__(
        self, source: Any, *, batch_size: int, sharding: Any = None, argument: str = "train_data"
    ):
        self.source = source
        self.batch_size = batch_size
        self.sharding = sharding
        self.argument = argument
        self.local_rows = batch_size // jax.process_count()
        self.step = 0  # batches the chunks taken so far hold
        self.plan: Callable[[int], int] | None = None  # step -> the next chunk's length
        self._ahead: tuple[int, Any, Any] | None = None  # (length, device chunk, source state)
        self._ahead_error: SourceError | None = None  # what reading ahead met, for take()
        self._first = self._read_one(0)
        self.structure = jax.tree.structure(self._first)
        self.shapes = [(np.shape(a)[1:], np.asarray(a).dtype) for a in jax.tree.leaves(self._first)]
        self.consumed_state = self._state()

    @property
    def first_batch(self) -> Any:
        return self._first

    def _state(self) -> Any:
        return self.source.get_state() if resumable(self.source) else None

    def _read_one(self, step: int) -> Any:
        try:
            batch = next(self.source)
        except StopIteration:
            raise SourceError(
                f"fit: {self.argument} ended after {step} batches, at step {step}; a source "
                "must yield a batch for every step (NpyBatches repeats its epochs; give fewer "
                "steps= or a source that repeats)"
            ) from None
        return self._checked(batch, step)

    def _read_many(self, step: int, count: int) -> Any:
        """Batches ``step .. step + count - 1`` from the source's ``next_batches``."""
        try:
            batches = self.source.next_batches(count)
        except StopIteration:
            raise SourceError(
                f"fit: {self.argument} ended within the {count} batches from step {step}; a "
                "source must yield a batch for every step (give fewer steps= or a source "
                "that repeats)"
            ) from None
        return self._checked(batches, step, count)

    def _checked(self, batch: Any, step: int, count: int | None = None) -> Any:
        """``batch`` as NumPy arrays, once it is seen to be a full batch like the first
        (with ``count``: ``count`` of them stacked, from ``next_batches``)."""
        if count is None:
            what, has, differs = f"batch at step {step}", "has", "differs"
            gave, lead = "gave", ()
        else:
            what, has, differs = f"batches at steps {step} to {step + count - 1}", "have", "differ"
            gave, lead = f"'s next_batches({count}) gave", (count,)
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise SourceError(
                f"fit: {self.argument}{gave} {type(batch).__name__} at step {step}; a source "
                "yields (x, y) pairs of NumPy arrays"
            )
        batch = jax.tree.map(np.asarray, tuple(batch))
        want = (*lead, self.local_rows)
        for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
            if leaf.shape[: len(want)] == want:
                continue
            where = f"{jax.tree_util.keystr(path) or 'its array'} (shape {leaf.shape})"
            if lead and leaf.shape[:1] != lead:
                raise SourceError(
                    f"fit: {self.argument}'s next_batches({count}) at step {step} gave "
                    f"{leaf.shape[0] if leaf.ndim else 'no'} batches in {where}"
                )
            share = ""
            if jax.process_count() > 1:
                share = f" (this process's share of {self.batch_size})"
            rows = leaf.shape[len(lead)] if leaf.ndim > len(lead) else None
            raise SourceError(
                f"fit: {self.argument}'s {what} {has} {rows} rows in {where}, expected "
                f"{self.local_rows}{share}; every batch must be full"
            )
        if hasattr(self, "structure"):
            shapes = [(a.shape[len(want) :], a.dtype) for a in jax.tree.leaves(batch)]
            if jax.tree.structure(batch) != self.structure or shapes != self.shapes:
                raise SourceError(
                    f"fit: {self.argument}'s {what} {differs} from the first "
                    f"(examples {shapes} against {self.shapes}); every batch must have the "
                    "same structure, example shapes and dtypes"
                )
        return batch

    def restore(self, saved: Any, step: int) -> None:
        """Puts the source where a checkpoint of ``step`` left it."""
        states = saved["states"]
        if len(states) != jax.process_count():
            raise SourceError(
                f"fit: the checkpoint's data position was saved by {len(states)} process(es), "
                f"and {jax.process_count()} are running; resume with as many"
            )
        self.source.set_state(states[jax.process_index()])
        self._first = None
        self.step = step
        self.consumed_state = self._state()

    def saved(self) -> dict[str, Any]:
        """The data's position after the chunks taken, every process's, for a checkpoint."""
        return {"step": self.step, "states": _gather_json(self.consumed_state)}

    def _read(self, length: int) -> tuple[Any, Any]:
        step = self.step + (0 if self._ahead is None else self._ahead[0])
        parts = []  # each (batches, rows, ...)
        if self._first is not None:
            parts.append(jax.tree.map(lambda a: a[None], self._first))
            self._first = None
            step, length = step + 1, length - 1
        if length and callable(getattr(self.source, "next_batches", None)):
            parts.append(self._read_many(step, length))
        elif length:
            batches = [self._read_one(step + i) for i in range(length)]
            parts.append(jax.tree.map(lambda *rows: np.stack(rows), *batches))
        state = self._state()
        if len(parts) == 1:
            stacked = parts[0]
        else:
            stacked = jax.tree.map(lambda *p: np.concatenate(p), *parts)
        return self._put(stacked), state  # (length, rows, ...)

    def _put(self, stacked: Any) -> Any:
        if self.sharding is None:
            return jax.device_put(stacked)
        if jax.process_count() == 1:
            return jax.device_put(stacked, self.sharding)
        spec = self.sharding.spec
        if len(spec) < 2 or spec[1] is None:
            # Replicated batches (replicas split over the devices): each process needs all rows.
            def whole(a):
                every = np.asarray(multihost_utils.process_allgather(a))  # (procs, K, rows, ...)
                return np.concatenate(list(every), axis=1)

            stacked = jax.tree.map(whole, stacked)
            return jax.tree.map(
                lambda a: jax.make_array_from_process_local_data(self.sharding, a, a.shape),
                stacked,
            )

        def one(a):
            shape = (a.shape[0], self.batch_size, *a.shape[2:])
            return jax.make_array_from_process_local_data(self.sharding, a, shape)

        return jax.tree.map(one, stacked)

    def take(self, length: int) -> Any:
        """The next ``length`` batches on the devices: the chunk read ahead, or read now."""
        if self._ahead_error is not None:
            raise self._ahead_error
        if self._ahead is not None:
            ahead, chunk, state = self._ahead
            self._ahead = None
            if ahead != length:
                raise RuntimeError(f"Feed: read {ahead} batches ahead, then asked for {length}")
        else:
            chunk, state = self._read(length)
        self.step += length
        self.consumed_state = state
        return chunk

    def read_ahead(self, length: int) -> None:
        """Reads and transfers the next ``length`` batches now (an early end or a bad
        batch is raised by the ``take`` that needs them)."""
        if length <= 0 or self._ahead is not None or self._ahead_error is not None:
            return
        try:
            chunk, state = self._read(length)
        except SourceError as error:
            self._ahead_error = error  # raised when a chunk needs these batches
            return
        self._ahead = (length, chunk, state)


# --- The program --------------------------------------------------------------------------


def for_loops(step_fn: Callable, canonical_convs: bool | None) -> Callable:
    """``step_fn`` ready to run inside a loop.

    With ``canonical_convs`` (None: when JAX's default backend is the CPU) the
    step's convolutions are put in XLA:CPU's fast layout (see
    ``fnnet._src.cpu_layout``). The in-memory fused program, the streamed one and
    the step-by-step path all go through here, so they compile the same
    arithmetic and agree bit for bit.
    """
    if canonical_convs is None:
        canonical_convs = jax.default_backend() == "cpu"
    return canonicalize_convolutions(step_fn) if canonical_convs else step_fn


def compile_fused(
    fused: Callable, *, replicated: bool, vectorize_replicas: bool, donate: bool
) -> Callable:
    """``jax.jit`` of ``fused(state, data)``, over stacked replicas when
    ``replicated`` (one after another with ``lax.map``, or side by side with
    ``vmap``), the data shared by every replica; the state donated with ``donate``."""
    if not isinstance(donate, bool):
        raise TypeError(f"make_fused_steps: donate must be True or False, got {donate!r}")
    if replicated and vectorize_replicas:
        program = jax.vmap(fused, in_axes=(0, None))
    elif replicated:
        program = lambda states, data: jax.lax.map(lambda s: fused(s, data), states)  # noqa: E731
    else:
        program = fused
    return jax.jit(program, donate_argnums=(0,) if donate else ())


def streamed_program(
    step_fn: Callable,
    *,
    replicated: bool = False,
    vectorize_replicas: bool = False,
    canonical_convs: bool | None = None,
    donate: bool = False,
) -> Callable:
    """``program(state, batches) -> (state, metrics)``: one step per leading row of
    ``batches`` (``(K, batch, ...)`` on every leaf), as one compiled ``jax.lax.scan``.
    Every replica of a stacked state trains on the same batches."""
    step = for_loops(step_fn, canonical_convs)

    def fused(state, batches):
        return jax.lax.scan(step, state, batches)

    return compile_fused(
        fused, replicated=replicated, vectorize_replicas=vectorize_replicas, donate=donate
    )


def batch_sharding(mesh: Any, batch_axis: Any) -> NamedSharding | None:
    """Where a chunk ``(K, batch, ...)`` goes: its batch dimension split over
    ``batch_axis``, or whole on every device (``batch_axis`` None)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, P(None, batch_axis) if batch_axis is not None else P())


def check_shared(feed: Feed, placement: Any, where: str) -> None:
    """Refuses to train on one process's share of each batch as if it were the batch.

    With several processes each source yields only its own rows; without a
    sharding over every process's devices nothing would join them, and each
    process would train its own copy on a part of every batch. ``placement`` is
    the mesh or the sharding the batches go to (None: neither)."""
    if placement is None and jax.process_count() > 1:
        raise ValueError(
            f"{where}: {feed.argument} yields this process's {feed.local_rows} rows of each "
            f"batch of {feed.batch_size} ({jax.process_count()} processes), and without a mesh "
            "no process sees the others' rows; give a mesh over every process's devices "
            "(fit: mesh='auto'; fnnet.distributed.make_sharded_steps)"
        )


def streamed_steps(
    step_fn: Callable,
    source: Any,
    *,
    batch_size: int,
    num_steps: int,
    sharding: Any = None,
    keep_placed: Callable | None = None,
    **program: Any,
) -> Callable:
    """``run(state) -> (state, metrics)`` training ``num_steps`` steps on the next
    ``num_steps`` batches of ``source`` (``make_fused_steps`` given a source).

    ``source`` is an iterator of batches, or a :class:`Feed` of one that several
    programs (one per chunk length) share; after each call ``run`` reads
    ``feed.plan(feed.step)`` batches ahead (``num_steps`` without a plan).
    ``run.feed.consumed_state`` is the source's state after the batches trained on.
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if isinstance(source, Feed):
        feed = source
    else:
        feed = Feed(source, batch_size=batch_size, argument="dataset")
    if sharding is not None:
        feed.sharding = sharding
    check_shared(feed, feed.sharding, "make_fused_steps")
    compiled = streamed_program(step_fn, **program)

    def run(state):
        new_state, metrics = compiled(state, feed.take(num_steps))
        # Dispatch is asynchronous: the next chunk is read while the devices compute.
        feed.read_ahead(num_steps if feed.plan is None else feed.plan(feed.step))
        if keep_placed is not None:
            new_state = keep_placed(new_state)
        return new_state, metrics

    run.feed = feed
    return run


def open_source(source: Any, batch_size: int, checkpoint: Any) -> tuple[Feed, int | None]:
    """``fit``'s checks of a source, before any work: ``(its feed, steps_per_epoch or None)``."""
    if checkpoint is not None and not resumable(source):
        raise TypeError(
            f"fit: train_data ({type(source).__name__}) has no get_state() and set_state(), so "
            "a checkpoint could not resume its data where it stopped (it would start over and "
            "train on other batches than an unbroken run); give a source that has them "
            "(NpyBatches does), or leave out checkpoint"
        )
    own = getattr(source, "batch_size", None)
    if own is not None and own != batch_size:
        raise ValueError(
            f"fit: batch_size={batch_size}, but train_data yields batches of {own} (its "
            "batch_size); give fit the source's"
        )
    per_epoch = getattr(source, "steps_per_epoch", None)
    if per_epoch is not None and (
        isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch <= 0
    ):
        raise ValueError(
            f"fit: train_data's steps_per_epoch must be a positive int, got {per_epoch!r}"
        )
    return Feed(source, batch_size=batch_size), per_epoch


def identity(source: Any, feed: Feed) -> Any:
    """What the resume check compares of a source: its own ``fingerprint()``, else its
    type and its batches' shapes and dtypes (the same in every process)."""
    own = getattr(source, "fingerprint", None)
    if callable(own):
        return own()
    examples = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((feed.batch_size, *a.shape[1:]), a.dtype),
        feed.first_batch,
    )
    return {
        "kind": f"{type(source).__module__}.{type(source).__qualname__}",
        "batches": data_fingerprint(examples, examples=False),
    }


def default_chunk(feed: Feed) -> int:
    """The most batches of ``feed`` a chunk holds by default (about 256 MiB of them)."""
    per_batch = sum(a.nbytes for a in jax.tree.leaves(feed.first_batch)) * jax.process_count()
    return max(1, _CHUNK_BYTES // max(per_batch, 1))
