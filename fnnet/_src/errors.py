"""Errors that name the layer they come from.

Every composite layer runs each child inside ``scope(child_name)``. The scopes form
a path such as ``"encoder/block/attn"``; ``fail`` raises a :class:`LayerError`
carrying that path, so a wrong shape deep inside a model reads like

    LayerError: dense at 'hidden/out': expected input with last dimension 100, got 99

instead of a bare XLA trace. The same path stack feeds :func:`fnnet.summary`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NoReturn

_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("fnnet_path", default=())


class LayerError(ValueError):
    """A layer was misused: wrong input shape, bad hyperparameter, missing key.

    Attributes:
      path: the layer's path inside the model (``""`` for the root layer).
      kind: the kind of layer (``"dense"``, ``"conv"``, ...).
      message: what was expected and what came instead.
    """

    def __init__(self, kind: str, message: str, path: str = ""):
        self.kind = kind
        self.path = path
        self.message = message
        where = f"{kind} at '{path}'" if path else kind
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        return (type(self), (self.kind, self.message, self.path))


LayerError.__module__ = "fnnet"  # shown as fnnet.LayerError, where users import it


def current_path() -> str:
    """The path of the layer currently being initialized or applied."""
    return "/".join(_PATH.get())


def fail(kind: str, message: str) -> NoReturn:
    """Raises a :class:`LayerError` for the layer at the current path."""
    raise LayerError(kind, message, current_path())


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Runs a child layer under ``name``, extending the path for errors and summaries.

    Exceptions that are not ``LayerError`` (a ``TypeError`` from a custom layer, a
    shape error from ``jnp``) get a note naming the innermost layer path, once.
    A ``KeyError`` here almost always means the parameter tree does not match the
    model, so it becomes a ``LayerError`` that says so.
    """
    token = _PATH.set(_PATH.get() + (name,))
    try:
        yield
    except LayerError:
        raise
    except KeyError as e:
        raise LayerError(
            "params",
            f"missing key {e.args[0]!r}: the parameter (or state) tree does not match "
            "this model; was it made by a different model or configuration?",
            current_path(),
        ) from e
    except Exception as e:
        if not getattr(e, "_fnnet_noted", False):
            e.add_note(f"(raised inside fnnet layer '{current_path()}')")
            e._fnnet_noted = True
        raise
    finally:
        _PATH.reset(token)


def check(condition: bool, kind: str, message: str) -> None:
    """``fail(kind, message)`` unless ``condition`` holds."""
    if not condition:
        fail(kind, message)


def positive_int(value, kind: str, field: str) -> int:
    """Validates a size hyperparameter at construction time."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(kind, f"{field} must be a positive integer, got {value!r}")
    return value


def rate(value, kind: str, field: str = "rate") -> float:
    """Validates a probability in [0, 1) at construction time."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        fail(kind, f"{field} must be a probability in [0, 1), got {value!r}")
    return float(value)
