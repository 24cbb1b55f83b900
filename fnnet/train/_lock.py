"""A checkpoint directory claimed for one run: checked before training, locked during it.

Two runs saving into one directory would prune each other's checkpoints and
resume from each other's steps, and a directory that cannot be written is found
out at the first save, after the first stretch of training is done. So a run
checks its directory first (:func:`check_checkpoint_dir`) and holds a lock on it
(:class:`DirectoryLock`) while it trains.

The lock is ``fcntl.flock`` on ``directory/.fnnet-lock``. The kernel drops it when
the process ends, however it ends, so a trainer killed with SIGKILL never leaves a
stale lock behind, and there is nothing to clean up by hand. The file itself stays
(removing it would let two processes lock two different files of the same name);
while held it says who holds it, as one line of JSON: ``pid``, ``host`` and
``started``. ``CheckpointStore`` ignores it, as it ignores every name that is
not a step number.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import pathlib
import secrets
import socket
import tempfile
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fnnet.train._checkpoint import storage_path
from fnnet.train._checkpoint_errors import (
    CheckpointDirectoryError,
    CheckpointError,
    CheckpointLockedError,
)

LOCK_FILE = ".fnnet-lock"
_HOLDER_BYTES = 4096  # far more than one line of pid, host and time


def check_checkpoint_dir(path: str | os.PathLike, *, argument: str = "checkpoint_dir") -> Any:
    """Makes sure checkpoints can be written to ``path``, before any training.

    Creates the directory (and its parents) if missing, then creates and removes a
    temporary file in it.

    Args:
      path: the checkpoint directory.
      argument: the name the caller knows ``path`` by, for the error messages.

    Returns:
      ``path`` as an absolute ``pathlib.Path``, or a URL (``gs://``) as an
      ``etils.epath.Path``.

    Raises:
      TypeError: ``path`` is not a str or path.
      CheckpointDirectoryError: ``path`` is empty, is a file, lies under a file,
        cannot be created, or cannot be written; the message names ``argument``,
        the path and the operating system's reason.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{argument} must be a directory path (str or pathlib.Path), got "
            f"{type(path).__name__} {path!r}"
        )
    where = f"{argument}={os.fspath(path)!r}"
    if not os.fspath(path):
        raise CheckpointDirectoryError(f"{where} is empty; give the directory to save into")
    directory = storage_path(path, argument)
    if not isinstance(directory, pathlib.Path):  # a bucket: try a write there too
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / ".fnnet-write-check"
            probe.write_text("")
            probe.unlink()
        except Exception as e:  # each file-system package raises its own kinds
            raise CheckpointDirectoryError(
                f"{where}: cannot write to {directory}: {type(e).__name__}: {e}"
            ) from e
        return directory
    try:
        if directory.exists() and not directory.is_dir():
            raise CheckpointDirectoryError(
                f"{where} is a file, not a directory ({directory}). Give a directory "
                "(it is created if missing), or move the file away."
            )
        if not directory.exists():
            _create(directory, where)
    except PermissionError as e:  # a parent that cannot be searched
        raise CheckpointDirectoryError(
            f"{where}: cannot look at {directory}: {e.strerror} ({e.filename or directory}). "
            "Give a directory this process can reach, or change the permissions."
        ) from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".fnnet-write-check-", dir=directory)
    except OSError as e:
        raise CheckpointDirectoryError(
            f"{where}: the directory {directory} is not writable ({e.strerror}), so no "
            "checkpoint could be saved there. Give a directory this process can write to, "
            "or change its permissions."
        ) from e
    os.close(fd)
    os.unlink(probe)
    return directory


def check_shared(directory: Any, *, argument: str = "checkpoint_dir") -> None:
    """In a run over several processes, makes sure every process sees ``directory``
    as the same place: each writes its own shards there and process 0 the record,
    so a folder on each host's own disk would give checkpoints no host can restore.

    Process 0 writes a file with a fresh name, every process looks for it.
    Nothing to do in a run of one process.

    Raises:
      CheckpointDirectoryError: some process does not see the file (all raise).
    """
    if jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    probe = directory / f".fnnet-shared-{token}"
    if jax.process_index() == 0:
        probe.write_text("")
    multihost_utils.sync_global_devices("fnnet-shared-written")
    seen = np.asarray(multihost_utils.process_allgather(np.int32(probe.exists())))
    multihost_utils.sync_global_devices("fnnet-shared-read")
    if jax.process_index() == 0:
        probe.unlink()
    blind = [int(i) for i in np.flatnonzero(seen == 0)]
    if blind:
        raise CheckpointDirectoryError(
            f"{argument}={str(directory)!r} is not one place for every process: process(es) "
            f"{blind} do not see a file process 0 wrote there, so no host could restore the "
            "checkpoints (each process writes its own shards). Give a bucket (gs://...) or a "
            "disk that every host mounts at the same path."
        )


def _create(directory: pathlib.Path, where: str) -> None:
    if directory.is_symlink():
        raise CheckpointDirectoryError(
            f"{where} is a symbolic link to {os.readlink(directory)!r}, which does not "
            "exist. Create the directory it points to, or give another path."
        )
    for parent in directory.parents:  # nearest first
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointDirectoryError(
                    f"{where} cannot be created: {parent} is a file, not a directory. "
                    "Give a path under a directory, or move the file away."
                )
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointDirectoryError(
            f"{where}: cannot create the directory {directory}: {e.strerror}. Give a "
            "directory this process can create, or create it first."
        ) from e


class DirectoryLock:
    """Holds a checkpoint directory for one process; use as ``with DirectoryLock(d):``.

    The lock is released by :meth:`release`, at the end of the ``with`` block, or
    when the process ends in any way (the kernel releases ``flock`` locks). Two
    locks on one directory conflict even within one process. A child made with
    ``os.fork`` shares the lock and keeps it held until it exits too; a child made
    with ``subprocess`` does not inherit it.

    In a run over several processes sharing one directory, only one of them
    (process 0) should take the lock.

    Args:
      directory: an existing directory (see :func:`check_checkpoint_dir`).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory).absolute()
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"DirectoryLock({str(self.directory)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        """Takes the lock without waiting, and writes who holds it into the lock file.

        Returns:
          ``self``.

        Raises:
          CheckpointLockedError: another process (or another ``DirectoryLock``) holds
            it; the message names that process as its lock file records it.
          CheckpointDirectoryError: the lock file cannot be created or opened.
          CheckpointError: the file system refuses locks.
          RuntimeError: this object already holds it.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self!r} is already held; release it before acquiring again")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointDirectoryError(
                f"cannot open the lock file {self.path}: {e.strerror}. The checkpoint "
                "directory must exist and be writable (check_checkpoint_dir makes sure)."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _locked_error(self.directory, self.path, holder) from None
            raise CheckpointError(
                f"cannot lock {self.path}: {e.strerror}; the file system of "
                f"{self.directory} may not support flock locks"
            ) from e
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Releases the lock if held (and empties the lock file); otherwise does nothing."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # while still held, so no new holder's line is erased
        finally:
            os.close(fd)  # closing the only descriptor releases the lock

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    """What the holder wrote into the lock file; empty if it is unreadable or empty."""
    try:
        holder = json.loads(os.pread(fd, _HOLDER_BYTES, 0).decode())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _locked_error(directory: pathlib.Path, path: pathlib.Path, holder: dict) -> Exception:
    pid, host, started = holder.get("pid"), holder.get("host"), holder.get("started")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    host = host if isinstance(host, str) else None
    started = started if isinstance(started, str) else None
    if pid is None:
        who = f"a process that has not recorded itself in {path} (yet)"
    else:
        who = f"process {pid} on host {host or '?'}, running since {started or '?'}"
        if pid == os.getpid() and host == socket.gethostname():
            who += " (this process: another DirectoryLock, or fit, already holds it)"
        who += f", as {path} records"
    return CheckpointLockedError(
        f"the checkpoint directory {directory} is in use by {who}. Two runs saving into "
        "one directory would prune and overwrite each other's checkpoints. Wait for that "
        "run to finish (its lock goes when its process ends, even if it is killed), or "
        "give this run another checkpoint_dir.",
        directory=directory,
        pid=pid,
        host=host,
        started=started,
    )
