"""Checkpoints: atomic, verified saves of a training state, and restores that fall back.

A :class:`CheckpointManager` owns one directory. Each save writes one step:

    directory/
      100/                         a committed checkpoint (orbax renamed it into place)
        commit_success.txt         orbax's commit marker
        state/                     the arrays, written by orbax (OCDBT + zarr)
        metadata/metadata.json     the record: caller's metadata, versions, spec, metrics
      200.orbax-checkpoint-tmp/    an interrupted save: never listed, never restored,
                                   removed by the next fit (remove_unfinished_saves)
      .fnnet-lock                  the lock of the run using it (``DirectoryLock``): ignored

Orbax writes every step into a temporary directory and renames it into place on
commit, so a save killed at any moment leaves either the old set of checkpoints or
the old set plus one complete new one. The record (``metadata.json``) is written
inside the same temporary directory, so arrays and record commit together.

What a checkpoint holds is checked twice. Cheaply, by :meth:`CheckpointManager.steps`:
the commit marker, a readable record, and orbax's array index must be there. Fully,
by :meth:`CheckpointManager.restore`: every array is read back and compared with
the shape, dtype and CRC-32 checksum the record holds, because a flipped byte in
an array file otherwise restores silently as a wrong number.

Arrays are copied to the host and stored as NumPy arrays, so a checkpoint does not
depend on the devices that wrote it. Typed PRNG keys are stored as their raw
``uint32`` key data with the key implementation in the record, and rewrapped on
restore. No pickle is involved: the tree's structure is recorded as JSON.

One process writes a directory at a time (``DirectoryLock`` makes sure); several
may read it. The exception
is a run over several processes (``jax.distributed``): there every process
calls ``save`` and ``restore`` with the same state, arrays split across
processes are gathered for the save (a collective), orbax writes from process
0, process 0 alone moves and prunes directories, and a restore into a sharded
target gives every process its own shards.
"""

from __future__ import annotations

import collections
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import re
import shutil
import stat
import sys
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fnnet._src.placement import place

_FORMAT = "fnnet-checkpoint-2"  # 2: the record carries its own checksum
_ARRAYS = "state"  # the orbax item holding the arrays
_RECORD_ITEM = "metadata"  # the orbax item holding the JSON record
_RECORD_FILE = "metadata.json"
# Orbax's names (orbax.checkpoint._src.path.atomicity_types); restated here so the
# integrity checks do not import orbax internals.
_COMMIT_MARKER = "commit_success.txt"
_ORBAX_TREE_INDEX = "_METADATA"
# Keys of the record that fnnet fills in; the caller's metadata may not use them.
_RESERVED = (
    "format", "step", "saved_at", "versions", "metrics", "spec", "structure", "record_crc32",
)  # fmt: skip
_STEP_NAME = re.compile(r"[0-9]+")
# Orbax's temporary directory for a save in progress: "<step>.orbax-checkpoint-tmp",
# with a timestamp suffix in newer versions.
_UNFINISHED_NAME = re.compile(r"[0-9]+\.orbax-checkpoint-tmp(-[0-9]+)?")
_DELETING = re.compile(r"\.[0-9]+\.fnnet-deleting")
_MAX_LISTED = 20


class CheckpointError(Exception):
    """A checkpoint could not be written or read. Base of the errors below."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint on disk is damaged or incomplete; the message names the file."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tree does not match the target it is restored into.

    Attributes:
      problems: one line per mismatched leaf path.
    """

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class NonFiniteCheckpointError(CheckpointError):
    """``save`` refused a state holding NaN or infinite values.

    Attributes:
      step: the step that was not saved.
      path: the first leaf (in tree order) with a non-finite value.
    """

    def __init__(self, message: str, step: int, path: str):
        super().__init__(message)
        self.step = step
        self.path = path


class CheckpointExistsError(CheckpointError):
    """``save`` was asked to write a step that already has an intact checkpoint."""


class CheckpointDirectoryError(CheckpointError):
    """A checkpoint directory cannot be used: it is a file, or cannot be created or written."""


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(path: Any, where: str) -> None:
    """A URL (``gs://bucket/run``) as a checkpoint directory is an error: the
    checkpoints are written with local file operations, and ``pathlib`` would
    quietly turn the URL into a local folder named ``gs:``."""
    text = os.fspath(path) if isinstance(path, str | os.PathLike) else ""
    if _URL.match(text):
        raise CheckpointDirectoryError(
            f"{where}: {text!r} is a URL; checkpoints are written to a file system path "
            "(a local or shared disk every host sees). To keep them in a bucket, copy the "
            "directory there after training (docs/tpu.md)."
        )


class CheckpointLockedError(CheckpointError):
    """Another process holds the lock on a checkpoint directory (see ``DirectoryLock``).

    Attributes:
      directory: the locked directory.
      pid, host, started: what the holder wrote into the lock file (its process
        id, host name and the time it took the lock), or None where unreadable.
    """

    def __init__(
        self,
        message: str,
        *,
        directory: pathlib.Path,
        pid: int | None = None,
        host: str | None = None,
        started: str | None = None,
    ):
        super().__init__(message)
        self.directory = directory
        self.pid = pid
        self.host = host
        self.started = started


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped or moved aside."""


class CheckpointManager:
    """Saves, lists, prunes and restores the checkpoints of one training run.

    Saving is synchronous: :meth:`save` returns once the checkpoint is committed and
    old ones are pruned. (Orbax can save in a background thread, but pruning needs
    the committed result, a returned ``save`` then means the state is on disk, and
    a loop that checkpoints every few minutes loses little by waiting.)

    Args:
      directory: where the step directories live; created on the first save.
      keep: how many of the newest intact checkpoints to keep (at least 1).
      best_metric: the name of a metric passed to :meth:`save`; the checkpoint with
        the best finite value of it is kept as well, however old. None keeps only
        the newest.
      best_mode: ``"max"`` or ``"min"``: whether a larger or a smaller value of
        ``best_metric`` is better.
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive integer, got {keep!r}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if best_metric is not None and not isinstance(best_metric, str):
            raise TypeError(f"best_metric must be a metric name or None, got {best_metric!r}")
        refuse_url(directory, f"CheckpointManager({str(directory)!r})")
        # Absolute, so a relative path keeps meaning the same place (and orbax accepts it).
        self.directory = pathlib.Path(directory).absolute()
        self.keep = keep
        self.best_metric = best_metric
        self.best_mode = best_mode

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep={self.keep}, "
            f"best_metric={self.best_metric!r}, best_mode={self.best_mode!r})"
        )

    def remove_unfinished_saves(self) -> list[pathlib.Path]:
        """Deletes what saves killed before their commit left behind, whatever step.

        Orbax writes a step into ``<step>.orbax-checkpoint-tmp...`` and renames it into
        place when whole; a killed save leaves that directory, which orbax removes
        only when the same step is saved again. Call this only while no other save
        is under way in the directory (``fit`` holds its lock when it does).

        Returns:
          The paths removed (a link is unlinked, never followed).
        """
        removed = []
        if not self.directory.is_dir():
            return removed
        for entry in sorted(self.directory.iterdir()):
            if not _UNFINISHED_NAME.fullmatch(entry.name):
                continue
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink()
            else:
                shutil.rmtree(entry)
            removed.append(entry)
        return removed

    # Listing.

    def steps(self) -> list[int]:
        """The steps with an intact checkpoint, ascending.

        Intact means committed, with a readable record and orbax's array index;
        array contents are verified only by :meth:`restore`.
        """
        return [step for step, record in self._records() if record is not None]

    def latest_step(self) -> int | None:
        """The newest intact step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The intact step with the best finite ``best_metric`` (newest on ties), or None."""
        if self.best_metric is None:
            return None
        sign = 1.0 if self.best_mode == "max" else -1.0
        scored = []
        for step, record in self._records():
            value = None if record is None else record["metrics"].get(self.best_metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                scored.append((sign * value, step))
        return max(scored)[1] if scored else None

    def _records(self) -> list[tuple[int, dict | None]]:
        """Every committed-looking step directory with its record (None if damaged)."""
        out = []
        for step in _step_dirs(self.directory):
            try:
                out.append((step, _read_record(self.directory, step)))
            except CorruptCheckpointError:
                out.append((step, None))
        return out

    # Saving.

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
    ) -> pathlib.Path:
        """Writes ``state`` as the checkpoint of ``step``, then prunes old checkpoints.

        Args:
          step: a non-negative int; a step with an intact checkpoint is never
            overwritten. A damaged checkpoint of the same step is moved aside to
            ``<step>.damaged`` (with a :class:`CheckpointWarning`), never deleted.
          state: a pytree (dicts, lists, tuples, NamedTuples, None, or any
            registered pytree node) of arrays, scalars and typed PRNG keys.
          metadata: JSON-able facts about the run (model config, optimizer and data
            settings), stored in the record next to fnnet's own keys
            (``format, step, saved_at, versions, metrics, spec, structure``), which
            it may not use.
          metrics: numbers describing the state (``{"eval_loss": 0.3}``); a
            non-finite value is stored as null. ``best_metric`` is read from here.

        Returns:
          The committed step directory.

        Raises:
          NonFiniteCheckpointError: a floating leaf holds NaN or inf; nothing is written.
          CheckpointExistsError: ``step`` already has an intact checkpoint.
        """
        step = _check_step(step)
        final = self.directory / str(step)
        damage = None
        if step in _step_dirs(self.directory):
            # Read it fully: a checkpoint damaged inside its array files looks intact
            # to ``steps`` and must not block a run that fell back past it.
            try:
                self._read_verified(step)
            except CorruptCheckpointError as e:
                damage = e
            else:
                raise CheckpointExistsError(
                    f"a checkpoint of step {step} already exists at {final}; checkpoints "
                    "are never overwritten. Save under a new step, or delete that directory."
                )
        record = _base_record(step, metadata, metrics)
        arrays, record["spec"], record["structure"] = _encode_state(step, state)
        record["record_crc32"] = _record_crc32(record)

        self.directory.mkdir(parents=True, exist_ok=True)
        if damage is not None:
            aside = _free_name(self.directory, f"{step}.damaged")
            if jax.process_index() == 0:
                final.rename(aside)
            _sync_processes("fnnet-checkpoint-aside")
            warnings.warn(
                f"moved the damaged checkpoint {final} aside to {aside} to save step {step} "
                f"again; it was damaged: {damage}",
                CheckpointWarning,
                stacklevel=2,
            )
        # Orbax removes a leftover '<step>.orbax-checkpoint-tmp' from an interrupted
        # save of this step before it creates its own.
        args = ocp.args.Composite(
            **{_ARRAYS: ocp.args.StandardSave(arrays), _RECORD_ITEM: ocp.args.JsonSave(record)}
        )
        with _checkpointer() as checkpointer:
            checkpointer.save(final, args=args)
        if jax.process_index() == 0:
            self._prune()
        _sync_processes("fnnet-checkpoint-pruned")
        return final

    def _prune(self) -> None:
        """Deletes intact checkpoints beyond the newest ``keep`` and the best.

        Damaged checkpoints are left for a person to inspect.
        """
        steps = self.steps()
        kept = set(steps[-self.keep :])
        best = self.best_step()
        if best is not None:
            kept.add(best)
        for entry in self.directory.iterdir():
            if _DELETING.fullmatch(entry.name):  # a deletion that was interrupted
                shutil.rmtree(entry, ignore_errors=True)
        for step in steps:
            if step not in kept:
                # Renaming first makes the deletion atomic as far as listing goes: an
                # interrupted rmtree leaves a hidden directory, not a damaged step.
                doomed = self.directory / f".{step}.fnnet-deleting"
                (self.directory / str(step)).rename(doomed)
                shutil.rmtree(doomed)

    # Restoring.

    def restore(self, step: int | None = None, *, target: Any = None) -> tuple[Any, dict]:
        """Reads a checkpoint back, verified against its record.

        Args:
          step: the step to restore, or None for the newest intact checkpoint. With
            None, damaged checkpoints are skipped with a :class:`CheckpointWarning`
            naming what is wrong, falling back to older ones. Nothing on disk is
            changed by a restore, failed or not.
          target: a pytree with the structure, shapes and dtypes to restore into:
            concrete arrays, or ``jax.ShapeDtypeStruct`` leaves from
            ``jax.eval_shape``. A leaf comes back with the target leaf's sharding
            where it has one (a state placed by ``shard_state`` on any mesh, whatever
            mesh it was saved from, or an array on one device), else as a JAX array on
            the default device (a NumPy array where the target leaf is a NumPy array
            or scalar, or where JAX cannot hold the dtype). Without a
            target the saved structure is rebuilt from the record: dicts, lists,
            tuples and None as saved; NamedTuples as their original class when its
            module is already imported (else a look-alike namedtuple); other pytree
            nodes as dicts.

        Returns:
          ``(state, record)``: the record is the saved metadata dict plus ``format``,
          ``step``, ``saved_at``, ``versions``, ``metrics``, the tree's ``spec`` (one
          entry per leaf: path, shape, dtype, checksum) and its ``structure``.

        Raises:
          CorruptCheckpointError: ``step`` was given and its checkpoint is damaged.
          CheckpointMismatchError: the checkpoint's tree differs from ``target``
            (never skipped: an older checkpoint would not fit the target better).
          CheckpointError: no such step, or no intact checkpoint at all.
        """
        if step is not None:
            step = _check_step(step)
            if step not in _step_dirs(self.directory):
                raise CheckpointError(
                    f"no checkpoint of step {step} in {self.directory} "
                    f"(intact steps: {self.steps()})"
                )
            return self._restore_step(step, target)
        skipped = []
        for candidate in reversed(_step_dirs(self.directory)):
            try:
                return self._restore_step(candidate, target)
            except CorruptCheckpointError as e:
                skipped.append(f"step {candidate}: {e}")
                warnings.warn(
                    f"skipping damaged checkpoint of step {candidate}, falling back to an "
                    f"older one: {e}",
                    CheckpointWarning,
                    stacklevel=2,
                )
        detail = "".join(f"\n  skipped {line}" for line in skipped)
        raise CheckpointError(f"no intact checkpoint in {self.directory}{detail}")

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        record, values = self._read_verified(step, target)
        if target is not None:
            leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
            state = jax.tree_util.tree_unflatten(
                treedef,
                [_restored_leaf(values[_path_str(kp)], leaf) for kp, leaf in leaves],
            )
        else:
            leaves = {path: _restored_leaf(value, None) for path, value in values.items()}
            state = _build(record["structure"], (), leaves)
        return state, record

    def _read_verified(self, step: int, target: Any = None) -> tuple[dict, dict[str, Any]]:
        """The record and ``{path: host array or typed key}`` of ``step``, verified."""
        record = _read_record(self.directory, step)
        step_dir = self.directory / str(step)
        with _checkpointer() as checkpointer:
            try:
                raw = checkpointer.restore(
                    step_dir, args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore()})
                )[_ARRAYS]
            except Exception as e:  # orbax and tensorstore raise many kinds
                raise CorruptCheckpointError(
                    f"cannot read the arrays of step {step} from {step_dir / _ARRAYS}: "
                    f"{type(e).__name__}: {e}"
                ) from e
        values = _verify_arrays(record, _flatten_nested(raw), step_dir / _ARRAYS)
        # Only after the arrays are verified: a damaged checkpoint is skipped by
        # ``restore()`` whatever it holds, while a mismatch is the caller's to fix.
        if target is not None:
            _check_target(record, target, step_dir)
        return record, values


def load_metadata(directory: str | pathlib.Path, step: int | None = None) -> dict:
    """Reads a checkpoint's record without its arrays.

    Args:
      directory: a :class:`CheckpointManager` directory.
      step: the step, or None for the newest checkpoint whose record is intact
        (damaged ones are skipped with a :class:`CheckpointWarning`).

    Returns:
      The record: the metadata given to ``save`` plus ``step``, ``saved_at``,
      ``versions``, ``metrics``, ``spec`` and ``structure``.
    """
    directory = pathlib.Path(directory)
    steps = _step_dirs(directory)
    if step is not None:
        step = _check_step(step)
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {directory}")
        return _read_record(directory, step)
    for candidate in reversed(steps):
        try:
            return _read_record(directory, candidate)
        except CorruptCheckpointError as e:
            warnings.warn(
                f"skipping damaged checkpoint of step {candidate}: {e}",
                CheckpointWarning,
                stacklevel=2,
            )
    raise CheckpointError(f"no intact checkpoint in {directory}")


# On-disk layout.


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous orbax checkpointer for the two items of a step."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    arrays = ocp.StandardCheckpointHandler()
    registry.add(_ARRAYS, ocp.args.StandardSave, arrays)
    registry.add(_ARRAYS, ocp.args.StandardRestore, arrays)
    # The record is read with json, not orbax; only its name is chosen here.
    registry.add(_RECORD_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler(_RECORD_FILE))
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def _step_dirs(directory: pathlib.Path) -> list[int]:
    """Steps with a directory of their own (intact or not), ascending.

    Orbax temporaries (``<step>.orbax-checkpoint-tmp``), moved-aside damaged steps
    and anything else not named by digits alone are ignored.
    """
    if not directory.is_dir():
        return []
    return sorted(
        int(entry.name)
        for entry in directory.iterdir()
        if _STEP_NAME.fullmatch(entry.name) and entry.is_dir()
    )


def _read_record(directory: pathlib.Path, step: int) -> dict:
    """The record of ``step`` after the cheap integrity checks; raises if damaged."""
    step_dir = directory / str(step)
    if step_dir.is_symlink() and directory.resolve() not in step_dir.resolve().parents:
        raise CorruptCheckpointError(
            f"{step_dir} is a symbolic link out of the checkpoint directory (to "
            f"{step_dir.resolve()}); a step is read only from inside it"
        )
    if not (step_dir / _COMMIT_MARKER).is_file():
        raise CorruptCheckpointError(
            f"{step_dir} has no commit marker {_COMMIT_MARKER}: the save never finished "
            "committing, or the directory was changed afterwards"
        )
    path = step_dir / _RECORD_ITEM / _RECORD_FILE
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise CorruptCheckpointError(f"the record {path} is missing") from None
    except OSError as e:
        raise CorruptCheckpointError(f"the record {path} cannot be read: {e}") from None
    if not stat.S_ISREG(mode):  # a FIFO would block the read forever; a link leads away
        raise CorruptCheckpointError(f"the record {path} is not a regular file")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: bad JSON, or an integer past Python's digit limit;
        # RecursionError: nesting too deep to parse.
        reason = str(e) or type(e).__name__
        raise CorruptCheckpointError(
            f"the record {path} is not readable JSON: {reason[:200]}"
        ) from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CorruptCheckpointError(
            f"the record {path} is not an fnnet checkpoint record of format {_FORMAT!r} "
            f"(found {found!r}); was it written by another version of fnnet?"
        )
    try:
        intact = record.get("record_crc32") == _record_crc32(record)
    except (TypeError, ValueError, RecursionError):
        intact = False
    if not intact:
        raise CorruptCheckpointError(
            f"the record {path} does not match its checksum: it was edited or damaged "
            "(the model it describes could no longer be trusted)"
        )
    if record.get("step") != step:
        raise CorruptCheckpointError(
            f"the record {path} is for step {record.get('step')!r}, not {step}: the "
            "directory was renamed or copied by hand"
        )
    if not _record_is_well_formed(record):
        raise CorruptCheckpointError(
            f"the record {path} lacks its spec, structure or metrics: it was edited or damaged"
        )
    index = step_dir / _ARRAYS / _ORBAX_TREE_INDEX
    if not index.is_file():
        raise CorruptCheckpointError(
            f"orbax's array index {index} is missing: the arrays of step {step} are gone"
        )
    return record


def _record_crc32(record: dict) -> int:
    """A checksum of the record's content (all but the checksum), key order aside."""
    body = {k: v for k, v in record.items() if k != "record_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, allow_nan=False).encode())


def _record_is_well_formed(record: dict) -> bool:
    spec = record.get("spec")
    return (
        isinstance(spec, list)
        and all(
            isinstance(entry, dict)
            and {"path", "shape", "dtype", "crc32"} <= entry.keys()
            and ("prng_impl" not in entry or "key_data_shape" in entry)
            for entry in spec
        )
        and isinstance(record.get("structure"), dict)
        and isinstance(record.get("metrics"), dict)
    )


def _free_name(directory: pathlib.Path, name: str) -> pathlib.Path:
    """``directory / name``, or ``name-2``, ``name-3``... if taken."""
    candidate, n = directory / name, 1
    while candidate.exists():
        n += 1
        candidate = directory / f"{name}-{n}"
    return candidate


# The record.


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("fnnet", "jax", "jaxlib", "orbax-checkpoint", "optax", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _base_record(step: int, metadata: Mapping[str, Any], metrics: Mapping | None) -> dict:
    """The record without the tree: caller's metadata, versions and metrics."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of JSON-able values, got {type(metadata)}")
    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
        raise ValueError(
            f"metadata may not use the keys {clash}: fnnet stores its own facts under "
            f"{list(_RESERVED)}"
        )
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-able (numbers, strings, lists, dicts): {e}") from e
    clean_metrics = {}
    for name, value in (metrics or {}).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {name!r} must be a number, got {value!r}") from None
        # JSON has no NaN; a non-finite metric is recorded as null and never "best".
        clean_metrics[str(name)] = number if math.isfinite(number) else None
    return {
        "format": _FORMAT,
        "step": step,
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "metrics": clean_metrics,
        **metadata,
    }


# The tree: paths, spec, structure.


def _component(key: Any) -> str:
    """One step of a tree path as text: a dict key, a field name or an index."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_str(keypath: tuple) -> str:
    return "/".join(_component(k) for k in keypath)


def _is_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _describe(shape: Any, dtype: Any) -> str:
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def _encode_state(step: int, state: Any) -> tuple[dict, list[dict], dict]:
    """Splits ``state`` into orbax's nested dict of host arrays, the spec and the structure.

    Raises NonFiniteCheckpointError on the first floating leaf with NaN or inf.
    """
    leaves: list[tuple[tuple[str, ...], Any]] = []
    structure = _structure(state, (), leaves)
    arrays: dict[str, Any] = {}
    spec = []
    for comps, leaf in leaves:
        path = "/".join(comps)
        host, entry = _encode_leaf(step, path, leaf)
        spec.append(entry)
        if host.size == 0:  # orbax refuses empty arrays; the spec alone rebuilds them
            continue
        # Orbax names arrays by their '.'-joined path, so keys 1 and '1', or 'a.b'
        # beside a/b, would collide and one would silently overwrite the other.
        node = arrays
        for c in comps[:-1]:
            node = node.setdefault(c, {})
            if not isinstance(node, dict):
                break
        if not comps or not isinstance(node, dict) or comps[-1] in node:
            raise ValueError(
                f"cannot save the state of step {step}: the leaf path {path!r} is empty or "
                "collides with another once keys are written as text (keys 1 and '1', or "
                "keys containing '/' or '.')"
            )
        node[comps[-1]] = host
    if not arrays:
        raise ValueError(f"the state of step {step} holds no non-empty arrays to save")
    return arrays, spec, structure


def _encode_leaf(step: int, path: str, leaf: Any) -> tuple[np.ndarray, dict]:
    """One leaf as a host array and its spec entry (path, shape, dtype, checksum)."""
    if _is_key(getattr(leaf, "dtype", None)):
        host = _host(jax.random.key_data(leaf))
        entry = {
            "path": path,
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "prng_impl": str(jax.random.key_impl(leaf)),
            "key_data_shape": list(host.shape),
        }
        return host, entry | {"crc32": _crc32(host)}
    host = _host(leaf)
    if not (jnp.issubdtype(host.dtype, jnp.number) or host.dtype == np.bool_):
        raise TypeError(
            f"cannot save leaf {path!r} of step {step}: dtype {host.dtype} is not numeric; a "
            "checkpoint holds arrays, scalars and PRNG keys"
        )
    if jnp.issubdtype(host.dtype, jnp.inexact) and not np.isfinite(host).all():
        raise NonFiniteCheckpointError(
            f"refusing to save step {step}: leaf {path!r} ({_describe(host.shape, host.dtype)}) "
            f"holds {int(np.isnan(host).sum())} NaN and {int(np.isinf(host).sum())} infinite "
            "values. No non-finite checkpoint is ever written; the newest saved checkpoint "
            "is still the last good one.",
            step,
            path,
        )
    entry = {"path": path, "shape": list(host.shape), "dtype": str(host.dtype)}
    return host, entry | {"crc32": _crc32(host)}


def _structure(node: Any, comps: tuple[str, ...], leaves: list) -> dict:
    """The JSON description of ``node``'s tree; appends ``(path components, leaf)``."""
    if node is None:
        return {"type": "none"}
    treedef = jax.tree_util.tree_structure(node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        leaves.append((comps, node))
        return {"type": "leaf"}
    # One level of the tree: every child counts as a leaf except ``node`` itself.
    children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
    names = [_component(kp[0]) for kp, _ in children]
    described = [
        _structure(child, comps + (name,), leaves) for name, (_, child) in zip(names, children)
    ]
    if isinstance(node, dict):
        keys = [kp[0].key for kp, _ in children]
        keys = [k if isinstance(k, (str, int)) else str(k) for k in keys]
        return {"type": "dict", "keys": keys, "children": described}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        cls = type(node)
        return {
            "type": "namedtuple",
            "module": cls.__module__,
            "name": cls.__qualname__,
            "fields": list(cls._fields),
            "children": described,
        }
    if type(node) in (list, tuple):
        return {"type": type(node).__name__, "children": described}
    return {"type": "node", "name": type(node).__qualname__, "keys": names, "children": described}


def _build(structure: dict, comps: tuple[str, ...], values: dict[str, Any]) -> Any:
    """Rebuilds a tree from its JSON description and ``{path: restored leaf}``."""
    kind = structure["type"]
    if kind == "none":
        return None
    if kind == "leaf":
        return values["/".join(comps)]
    if kind == "dict":
        names = [str(k) for k in structure["keys"]]
    elif kind == "namedtuple":
        names = structure["fields"]
    elif kind == "node":
        names = structure["keys"]
    else:
        names = [str(i) for i in range(len(structure["children"]))]
    children = [
        _build(child, comps + (name,), values) for name, child in zip(names, structure["children"])
    ]
    if kind == "dict":
        return dict(zip(structure["keys"], children))
    if kind == "namedtuple":
        return _namedtuple_class(structure)(*children)
    if kind == "node":
        return dict(zip(names, children))
    return children if kind == "list" else tuple(children)


def _namedtuple_class(structure: dict) -> type:
    """The saved NamedTuple class if its module is imported, else a look-alike.

    Only ``sys.modules`` is consulted: restoring never imports a module named by a
    file on disk.
    """
    obj: Any = sys.modules.get(structure["module"])
    for part in structure["name"].split("."):
        obj = getattr(obj, part, None)
    fields = tuple(structure["fields"])
    if isinstance(obj, type) and issubclass(obj, tuple) and getattr(obj, "_fields", None) == fields:
        return obj
    return collections.namedtuple(structure["name"].rsplit(".", 1)[-1], fields)


def _flatten_nested(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{path: array}`` from orbax's nested dicts."""
    if not isinstance(tree, Mapping):
        return {"/".join(prefix): tree}
    out: dict[str, Any] = {}
    for name, child in tree.items():
        out.update(_flatten_nested(child, prefix + (str(name),)))
    return out


def _host(leaf: Any) -> np.ndarray:
    """``leaf`` as one NumPy array; one split across processes is gathered first (a
    collective, so every process must save the same state)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _sync_processes(name: str) -> None:
    """Waits for every process of a multi-process run (none to wait for otherwise)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _crc32(host: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(host).reshape(-1).view(np.uint8))


# Restoring: checks against the target and the record.


def _target_entry(leaf: Any) -> tuple[tuple[int, ...], str]:
    dtype, shape = getattr(leaf, "dtype", None), getattr(leaf, "shape", None)
    if dtype is None or shape is None:
        host = np.asarray(leaf)
        dtype, shape = host.dtype, host.shape
    return tuple(shape), str(dtype)


def _check_target(record: dict, target: Any, step_dir: pathlib.Path) -> None:
    """Raises CheckpointMismatchError listing every path where record and target differ."""
    saved = {e["path"]: (tuple(e["shape"]), e["dtype"]) for e in record["spec"]}
    wanted = {
        _path_str(kp): _target_entry(leaf)
        for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    problems = []
    for path, (shape, dtype) in wanted.items():
        if path not in saved:
            problems.append(f"missing from the checkpoint: {path} ({_describe(shape, dtype)})")
        elif saved[path] != (shape, dtype):
            problems.append(
                f"{path}: checkpoint has {_describe(*saved[path])}, "
                f"target wants {_describe(shape, dtype)}"
            )
    for path, (shape, dtype) in saved.items():
        if path not in wanted:
            problems.append(f"not in the target: {path} ({_describe(shape, dtype)})")
    if problems:
        listed = problems[:_MAX_LISTED]
        if len(problems) > _MAX_LISTED:
            listed.append(f"... and {len(problems) - _MAX_LISTED} more")
        lines = "".join(f"\n  {line}" for line in listed)
        raise CheckpointMismatchError(
            f"the checkpoint {step_dir} does not match the target ({len(problems)} "
            f"differences):{lines}\nWas the target built from a different model or "
            "optimizer configuration? The checkpoint's record says how it was made: "
            f"load_metadata({str(step_dir.parent)!r}, {record['step']}).",
            problems,
        )


def _verify_arrays(record: dict, values: dict[str, Any], where: pathlib.Path) -> dict[str, Any]:
    """Checks each array read back against the record; returns ``{path: leaf}``.

    Key leaves come back rewrapped as typed PRNG keys.
    """
    spec = {e["path"]: e for e in record["spec"]}
    extra = sorted(set(values) - set(spec))
    if extra:
        raise CorruptCheckpointError(
            f"{where} holds arrays its record does not list: {extra[:_MAX_LISTED]}"
        )
    out = {}
    for path, entry in spec.items():
        if "prng_impl" in entry:
            shape, dtype = tuple(entry["key_data_shape"]), "uint32"
        else:
            shape, dtype = tuple(entry["shape"]), entry["dtype"]
        if math.prod(shape) == 0:  # empty arrays are not stored (orbax refuses them)
            values[path] = np.empty(shape, jnp.dtype(dtype))
        if path not in values:
            raise CorruptCheckpointError(f"the array {path!r} is missing from {where}")
        host = np.asarray(values[path])
        if host.shape != shape or str(host.dtype) != dtype:
            raise CorruptCheckpointError(
                f"the array {path!r} in {where} reads as {_describe(host.shape, host.dtype)}, "
                f"but the record says {_describe(shape, dtype)}"
            )
        if _crc32(host) != entry["crc32"]:
            raise CorruptCheckpointError(
                f"the array {path!r} in {where} does not match its checksum: the array files "
                "were changed or damaged after the save"
            )
        if "prng_impl" in entry:
            out[path] = jax.random.wrap_key_data(jnp.asarray(host), impl=entry["prng_impl"])
        else:
            out[path] = host
    return out


def _restored_leaf(value: Any, target_leaf: Any) -> Any:
    """``value`` as the kind of leaf ``target_leaf`` is (see ``restore``)."""
    sharding = getattr(target_leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):  # placed as the target is: any mesh, any device
        return place(value, sharding)
    if _is_key(getattr(value, "dtype", None)):
        return value
    if isinstance(target_leaf, (np.ndarray, np.generic, int, float, complex)):
        return value
    return _device(value)


def _device(host: np.ndarray) -> Any:
    """A JAX array of ``host``, unless JAX cannot hold its dtype (64-bit without x64)."""
    if jax.dtypes.canonicalize_dtype(host.dtype) != host.dtype:
        return host
    return jnp.asarray(host)
