"""Checkpoints: orbax's manager, with what it lacks for training that must not lie.

A :class:`CheckpointStore` owns one directory, a local path or a URL (``gs://``)::

    directory/
      100/                         a committed step (orbax renamed it into place)
        commit_success.txt         orbax's commit marker
        state/                     the arrays: orbax writes each process's own shards
        metadata/metadata.json     the record (``fnnet.train._record``)
      200.orbax-checkpoint-tmp/    an interrupted save: never listed, never restored
      .fnnet-lock                  the lock of the run using it (``DirectoryLock``)

Orbax's ``CheckpointManager`` does the work: it lists steps, writes each step into a
temporary directory and commits it atomically, saves in the background while
training goes on, keeps the newest ``keep`` steps and the best by a metric (its
preservation policies), and on several processes has each process write and read
only its own shards. This module adds what orbax lacks: a record that rebuilds the
state without a target and the model without its code, content digests verified
on every restore (``fnnet.train._digest``), a fallback past damaged steps to the
newest intact one (a damaged step is moved aside when its step is saved again,
never deleted), and the refusal to write a state holding NaN or infinity.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from fnnet._src.placement import place
from fnnet.train import _record
from fnnet.train._checkpoint_errors import (
    CheckpointDirectoryError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointWarning,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
)
from fnnet.train._digest import survey
from fnnet.train._record import ARRAYS, RECORD_FILE, RECORD_ITEM, check_step, describe, path_str

_STEP_NAME = re.compile(r"[0-9]+")
# Orbax's temporary directory of a save in progress, with a timestamp in newer versions.
_UNFINISHED_NAME = re.compile(r"[0-9]+\.orbax-checkpoint-tmp(-[0-9]+)?")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The package each scheme etils' epath supports needs (through fsspec).
_SCHEME_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}


def storage_path(path: Any, where: str) -> pathlib.Path | epath.Path:
    """``path`` as a local absolute path, or a URL kept a URL (``gs://bucket/run``).

    Raises CheckpointDirectoryError for a scheme epath does not know, or whose
    file-system package is not installed (naming the package)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{where}: a directory must be a str or path, got {path!r}")
    text = os.fspath(path)
    scheme = _URL.match(text)
    if scheme is None:
        return pathlib.Path(text).absolute()  # a relative path keeps meaning the same place
    package = _SCHEME_PACKAGES.get(scheme.group(1))
    if package is None:
        raise CheckpointDirectoryError(
            f"{where}: {text!r} has the scheme {scheme.group(1)}://, which checkpoints do "
            f"not support; use a local path or one of {[f'{s}://' for s in _SCHEME_PACKAGES]}"
        )
    if importlib.util.find_spec(package) is None:
        raise CheckpointDirectoryError(
            f"{where}: {text!r} needs the package {package} to reach {scheme.group(1)}:// "
            f"(pip install {package}); nothing was written"
        )
    return epath.Path(text)


class CheckpointStore:
    """Saves, lists, prunes and restores the checkpoints of one training run.

    Args:
      directory: a local path or a URL (``gs://bucket/run``; needs ``gcsfs``); created
        on the first save.
      keep: how many of the newest checkpoints to keep (at least 1).
      best_metric: the name of a metric passed to :meth:`save`; the checkpoint with
        its best finite value is kept as well, however old. None keeps only the newest.
      best_mode: ``"max"`` or ``"min"``: whether larger or smaller is better.
      async_save: write in the background: :meth:`save` returns once the arrays are
        copied off the devices, and the next :meth:`save` (or :meth:`wait`) waits
        for the one before. A save killed midway leaves the steps before it whole.
      remove_unfinished: on opening, delete the temporary directories that killed
        saves left, whatever their step (listed in ``removed``); only for the one
        writer of the directory (``fit`` holds its lock): a reader would delete a
        save under way.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        remove_unfinished: bool = False,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive integer, got {keep!r}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if best_metric is not None and not isinstance(best_metric, str):
            raise TypeError(f"best_metric must be a metric name or None, got {best_metric!r}")
        for name, flag in (("async_save", async_save), ("remove_unfinished", remove_unfinished)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.directory = storage_path(directory, f"CheckpointStore({os.fspath(directory)!r})")
        self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
        self.async_save, self.remove_unfinished = async_save, remove_unfinished
        self._orbax: ocp.CheckpointManager | None = None
        #: The temporary directories of killed saves removed on opening.
        self.removed: list[Any] = []
        if remove_unfinished and jax.process_index() == 0:
            # Not orbax's clean-up: it runs in the background and says nothing of what
            # it removed, while fit names each directory it removes.
            for entry in self.unfinished_saves():
                if isinstance(entry, pathlib.Path) and (entry.is_symlink() or not entry.is_dir()):
                    entry.unlink()  # a link is unlinked, never followed
                else:
                    entry.rmtree() if hasattr(entry, "rmtree") else shutil.rmtree(entry)
                self.removed.append(entry)

    def __repr__(self) -> str:
        return (
            f"CheckpointStore({str(self.directory)!r}, keep={self.keep}, "
            f"best_metric={self.best_metric!r}, best_mode={self.best_mode!r})"
        )

    def _manager(self) -> ocp.CheckpointManager:
        if self._orbax is None:
            keep = [policies.LatestN(self.keep)]
            if self.best_metric is not None:
                keep.append(
                    policies.BestN(
                        get_metric_fn=lambda metrics: metrics[self.best_metric],
                        reverse=self.best_mode == "min", n=1,
                        keep_checkpoints_without_metrics=False,
                    )
                )  # fmt: skip
            best = None if self.best_metric is None else (lambda metrics: metrics[self.best_metric])
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(keep),
                # Not for ranking (the policy ranks): orbax writes metrics only with it.
                best_fn=best,
                best_mode=self.best_mode,
                enable_async_checkpointing=self.async_save,
                create=False,
                # A bucket renames by copying, so a step commits by its marker file there.
                temporary_path_class=(
                    None
                    if isinstance(self.directory, pathlib.Path)
                    else ocp.path.atomicity.CommitFileTemporaryPath
                ),
            )
            registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
            arrays = ocp.StandardCheckpointHandler()
            registry.add(ARRAYS, ocp.args.StandardSave, arrays)
            registry.add(ARRAYS, ocp.args.StandardRestore, arrays)
            registry.add(RECORD_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler(RECORD_FILE))
            self._orbax = ocp.CheckpointManager(
                self.directory, options=options, handler_registry=registry
            )
        return self._orbax

    def unfinished_saves(self) -> list[Any]:
        """The temporary directories of saves that never committed (none while
        ``remove_unfinished`` has removed them)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _UNFINISHED_NAME.fullmatch(p.name))

    def wait(self) -> None:
        """Blocks until the save under way (if any) is committed."""
        if self._orbax is not None:
            self._orbax.wait_until_finished()

    def close(self) -> None:
        """Waits for the save under way, then lets orbax's threads go."""
        if self._orbax is not None:
            self._orbax.close()
            self._orbax = None

    # Listing.

    def _step_dirs(self) -> list[int]:
        """Steps with a directory of their own, intact or not, ascending (after the
        save under way, if any, is committed)."""
        self.wait()
        if not self.directory.is_dir():
            return []
        if self._orbax is not None:
            self._orbax.reload()  # another process may have saved, or a step moved aside
        return sorted(
            int(p.name)
            for p in self.directory.iterdir()
            if _STEP_NAME.fullmatch(p.name) and p.is_dir()
        )

    def _records(self) -> list[tuple[int, dict | None]]:
        out = []
        for step in self._step_dirs():
            try:
                out.append((step, self._read_record(step)))
            except CorruptCheckpointError:
                out.append((step, None))
        return out

    def steps(self) -> list[int]:
        """The steps with an intact-looking checkpoint, ascending: committed, with a
        readable record and orbax's array index (contents are verified by restore)."""
        return [step for step, record in self._records() if record is not None]

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The intact step with the best finite ``best_metric`` (newest on ties), or None."""
        if self.best_metric is None:
            return None
        sign = 1.0 if self.best_mode == "max" else -1.0
        scored = [
            (sign * record["metrics"][self.best_metric], step)
            for step, record in self._records()
            if record is not None and isinstance(record["metrics"].get(self.best_metric), float)
        ]
        return max(scored)[1] if scored else None

    def _read_record(self, step: int) -> dict:
        step_dir = self.directory / str(step)
        record = _record.read(step_dir, step)
        index = step_dir / ARRAYS / "_METADATA"
        if not index.exists():
            raise CorruptCheckpointError(
                f"orbax's array index {index} is missing: the arrays of step {step} are gone"
            )
        return record

    # Saving.

    def save(
        self,
        step: int,
        state: Any,
        *,
        metadata: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
    ) -> Any:
        """Starts writing ``state`` as the checkpoint of ``step`` (see ``async_save``).

        Args:
          step: a non-negative int; a step with an intact checkpoint is never
            overwritten. A damaged checkpoint of the same step is moved aside to
            ``<step>.damaged`` (with a :class:`CheckpointWarning`), never deleted.
          state: a pytree of arrays (kept on their devices, any sharding), scalars
            and typed PRNG keys.
          metadata: JSON-able facts about the run, stored in the record next to
            fnnet's own keys (``format, step, saved_at, versions, metrics, spec,
            structure``), which it may not use.
          metrics: numbers describing the state; a non-finite one is stored as null.

        Returns:
          The step's directory (committed once :meth:`wait` returns).

        Raises:
          NonFiniteCheckpointError: a floating leaf holds NaN or inf; nothing is written.
          CheckpointExistsError: ``step`` already has an intact checkpoint.
        """
        step = check_step(step)
        record = _record.new_record(step, metadata, metrics)
        arrays, stored, spec, structure = _record.encode(step, state)
        for entry, (path, leaf), (digest, nans, infs) in zip(
            spec, stored, survey([a for _, a in stored])
        ):
            if nans or infs:
                raise NonFiniteCheckpointError(
                    f"refusing to save step {step}: leaf {path!r} "
                    f"({describe(leaf.shape, leaf.dtype)}) holds {nans} NaN and {infs} "
                    "infinite values. No non-finite checkpoint is ever written; the newest "
                    "saved checkpoint is still the last good one.",
                    step,
                    path,
                )
            entry["digest"] = digest
        record = _record.seal(record | {"spec": spec, "structure": structure})
        self.wait()  # the step before is committed (or failed) before this one is judged
        final = self.directory / str(step)
        if final.is_dir():
            self._move_aside_if_damaged(step)
        self.directory.mkdir(parents=True, exist_ok=True)
        value = record["metrics"].get(self.best_metric) if self.best_metric else None
        self._manager().save(
            step,
            args=ocp.args.Composite(
                **{ARRAYS: ocp.args.StandardSave(arrays), RECORD_ITEM: ocp.args.JsonSave(record)}
            ),
            metrics=None if value is None else {self.best_metric: value},
            force=True,  # fnnet decides when to save; orbax's save interval does not apply
        )
        return final

    def _move_aside_if_damaged(self, step: int) -> None:
        final = self.directory / str(step)
        try:  # read fully: damage inside the array files does not show in the listing
            self._restore_step(step, None)
        except CorruptCheckpointError as damage:
            aside = final.parent / f"{step}.damaged"
            n = 1
            while aside.exists():
                n += 1
                aside = final.parent / f"{step}.damaged-{n}"
            if jax.process_index() == 0:
                final.rename(aside)
            _sync("fnnet-checkpoint-aside")
            self._step_dirs()  # orbax forgets the step
            warnings.warn(
                f"moved the damaged checkpoint {final} aside to {aside} to save step {step} "
                f"again; it was damaged: {damage}",
                CheckpointWarning,
                stacklevel=3,
            )
        else:
            raise CheckpointExistsError(
                f"a checkpoint of step {step} already exists at {final}; checkpoints are "
                "never overwritten. Save under a new step, or delete that directory."
            )

    # Restoring.

    def restore(self, step: int | None = None, *, target: Any = None) -> tuple[Any, dict]:
        """Reads a checkpoint back, every array verified against its record's digest.

        Args:
          step: the step, or None for the newest intact checkpoint: damaged ones are
            skipped with a :class:`CheckpointWarning` naming what is wrong. Nothing
            on disk is changed by a restore, failed or not.
          target: a pytree with the structure, shapes and dtypes to restore into
            (concrete arrays, or ``jax.ShapeDtypeStruct`` leaves). A leaf with a
            sharding comes back with it, whatever mesh the checkpoint was saved
            from, each process reading only its own shards; a NumPy leaf comes
            back as NumPy; others on the default device. Without a target the
            saved structure is rebuilt from the record, on the default device
            (NumPy where JAX cannot hold the dtype).

        Returns:
          ``(state, record)``: the record holds the saved metadata plus ``format``,
          ``step``, ``saved_at``, ``versions``, ``metrics``, ``spec`` and ``structure``.

        Raises:
          CorruptCheckpointError: ``step`` was given and its checkpoint is damaged.
          CheckpointMismatchError: the checkpoint's tree differs from ``target``.
          CheckpointError: no such step, or no intact checkpoint at all.
        """
        self.wait()
        if step is not None:
            step = check_step(step)
            if step not in self._step_dirs():
                raise CheckpointError(
                    f"no checkpoint of step {step} in {self.directory} "
                    f"(intact steps: {self.steps()})"
                )
            return self._restore_step(step, target)
        skipped = []
        for candidate in reversed(self._step_dirs()):
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
        record = self._read_record(step)
        step_dir = self.directory / str(step)
        try:
            spec = {e["path"]: e for e in record["spec"]}
            if target is not None:
                try:
                    _record.check_target(record, target, step_dir)
                except CheckpointMismatchError:
                    self._restore_step(step, None)  # a damaged step is skipped, whatever it holds
                    raise
            wanted = _wanted_leaves(spec, target)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptCheckpointError(f"the record of step {step} is malformed: {e!r}") from e
        abstract: dict[str, Any] = {}
        for path, like in wanted.items():
            if like.size:  # an empty array is not stored
                *parents, name = path.split("/")
                node = abstract
                for c in parents:
                    node = node.setdefault(c, {})
                node[name] = like
        try:
            raw = self._manager().restore(
                step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(abstract)})
            )[ARRAYS]
            values = {}
            for path, like in wanted.items():
                node = raw
                for c in path.split("/") if like.size else ():
                    node = node[c]
                values[path] = node if like.size else _empty(like)
        except Exception as e:  # orbax and tensorstore raise many kinds
            raise CorruptCheckpointError(
                f"cannot read the arrays of step {step} from {step_dir / ARRAYS}: "
                f"{type(e).__name__}: {e}"
            ) from e
        for path, (digest, _, _) in zip(list(values), survey(list(values.values()))):
            if digest != spec[path]["digest"]:
                raise CorruptCheckpointError(
                    f"the array {path!r} in {step_dir / ARRAYS} does not match its digest: "
                    "the array files were changed or damaged after the save"
                )
            if "prng_impl" in spec[path]:
                values[path] = jax.random.wrap_key_data(values[path], impl=spec[path]["prng_impl"])
        if target is None:
            return _record.build(record["structure"], values), record
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
        return jax.tree_util.tree_unflatten(
            treedef, [values[path_str(kp)] for kp, _ in leaves]
        ), record


# Shardings that fit a key's data too, which has one more axis (they leave it whole).
_ANY_RANK = (jax.sharding.NamedSharding, jax.sharding.SingleDeviceSharding)


def _wanted_leaves(spec: dict[str, dict], target: Any) -> dict[str, Any]:
    """``{path: what orbax restores it as}``: a ``ShapeDtypeStruct`` with the target
    leaf's sharding, a NumPy array for a host leaf, else a ``ShapeDtypeStruct`` on
    the default device."""
    given = {path: None for path in spec}
    if target is not None:
        given = {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    out = {}
    for path, entry in spec.items():
        key = "prng_impl" in entry
        shape = tuple(entry["key_data_shape"] if key else entry["shape"])
        dtype = np.dtype("uint32" if key else entry["dtype"])
        leaf = given[path]
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, _ANY_RANK) or (
            isinstance(sharding, jax.sharding.Sharding) and not key
        ):
            out[path] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        elif isinstance(leaf, (np.ndarray, np.generic, int, float, complex)) or (
            jax.dtypes.canonicalize_dtype(dtype) != dtype
        ):
            out[path] = np.empty(shape, dtype)  # untouched pages: only its type and shape count
        else:
            out[path] = jax.ShapeDtypeStruct(shape, dtype, sharding=device)
    return out


def _empty(like: Any) -> Any:
    """An empty array (orbax stores none) of the kind ``like`` says."""
    host = np.empty(like.shape, like.dtype)
    return host if isinstance(like, np.ndarray) else place(host, like.sharding)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def load_metadata(directory: str | os.PathLike, step: int | None = None) -> dict:
    """Reads a checkpoint's record without its arrays (the newest intact record when
    ``step`` is None, damaged ones skipped with a :class:`CheckpointWarning`)."""
    store = CheckpointStore(directory)
    if step is not None:
        step = check_step(step)
        if step not in store._step_dirs():
            raise CheckpointError(f"no checkpoint of step {step} in {store.directory}")
        return store._read_record(step)
    for candidate in reversed(store._step_dirs()):
        try:
            return store._read_record(candidate)
        except CorruptCheckpointError as e:
            warnings.warn(
                f"skipping damaged checkpoint of step {candidate}: {e}",
                CheckpointWarning,
                stacklevel=2,
            )
    raise CheckpointError(f"no intact checkpoint in {store.directory}")
