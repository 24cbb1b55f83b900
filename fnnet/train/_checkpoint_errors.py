"""What goes wrong with checkpoints, as exceptions a caller can catch by kind."""

from __future__ import annotations

import pathlib


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


for _error in (
    CheckpointError, CorruptCheckpointError, CheckpointMismatchError, NonFiniteCheckpointError,
    CheckpointExistsError, CheckpointDirectoryError, CheckpointLockedError, CheckpointWarning,
):  # fmt: skip
    _error.__module__ = "fnnet.train"  # shown where users import them, as fnnet.LayerError is
