"""What ``fit`` tells the world while it trains: a small hook protocol and its built-ins.

A callback is any object with some of these methods; ``fit`` calls each one it
has, in the order the callbacks were given:

* ``on_start(event)``: before the first chunk, after any resume
  (``event.history`` holds the rows restored from the checkpoint);
* ``on_chunk_end(event)``: after every compiled chunk of steps;
* ``on_evaluation(event)``: after an evaluation (``event.rows`` hold ``eval_*``);
* ``on_checkpoint(event)``: after a checkpoint's save is issued (``event.checkpoint``;
  with ``Checkpoints(async_save=True)``, the default, it is written in the
  background and committed before the next save starts and before ``fit`` returns);
* ``on_end(result) -> FitResult | None``: once training is over; a result
  returned replaces the one ``fit`` returns.

A callback that keeps something across a resume gives ``save() -> pytree`` and
``load(tree)``; ``fit`` stores the tree in every checkpoint beside the state.

Every process of a multi-process run calls the hooks (``event.primary`` is
True in process 0 only); the built-ins write files from process 0 alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HOOKS = ("on_start", "on_chunk_end", "on_evaluation", "on_checkpoint", "on_end")


@dataclasses.dataclass
class Event:
    """What a hook is told.

    Attributes:
      step: the steps done so far (the loop's count; a frozen replica's own
        ``state.step`` may be smaller).
      steps: the steps the run is to take in all.
      state: the training state now (stacked replicas when ``replicas``). Under
        ``fit(donate=True)`` (the default on GPUs and TPUs) the next chunk takes
        its buffers: copy what a callback keeps (``jax.tree.map(jnp.copy, ...)``).
      rows: this chunk's history rows, one per replica.
      history: every row so far, restored ones included.
      replicas: the number of stacked replicas, or None for one run.
      primary: whether this process writes files (process 0).
      compile_seconds: seconds spent compiling during this chunk.
      checkpoint: the saved step's directory (``on_checkpoint`` only).
      sets: the names of the evaluation sets (``("eval",)`` for one ``(x, y)``).
    """

    step: int
    steps: int
    state: Any
    rows: list[dict[str, Any]]
    history: list[dict[str, Any]]
    replicas: int | None
    primary: bool
    compile_seconds: float = 0.0
    checkpoint: pathlib.Path | None = None
    sets: tuple[str, ...] = ()


def check_callbacks(callbacks: Any) -> list[Any]:
    """The callbacks as a list, each checked to have at least one hook."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, list | tuple):
        raise TypeError(
            f"fit: callbacks must be a list of callback objects, got {type(callbacks).__name__}"
        )
    for i, callback in enumerate(callbacks):
        if not any(callable(getattr(callback, hook, None)) for hook in _HOOKS):
            raise TypeError(
                f"fit: callbacks[{i}] ({callback!r}) has none of the hooks {', '.join(_HOOKS)}"
            )
        has_save, has_load = hasattr(callback, "save"), hasattr(callback, "load")
        if has_save != has_load:
            raise TypeError(
                f"fit: callbacks[{i}] ({type(callback).__name__}) defines "
                f"{'save' if has_save else 'load'} without "
                f"{'load' if has_save else 'save'}; a resumable callback needs both"
            )
    return list(callbacks)


def call(callbacks: list[Any], hook: str, event: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(event)


# --- The JSON-lines log -------------------------------------------------------------------


class JsonLog:
    """One JSON object per history row in ``path``, flushed as it is written.

    On a resume the file is rewritten to hold exactly the restored rows, so
    the rows between the last checkpoint and a crash are not repeated.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._file = None

    def __repr__(self) -> str:
        return f"JsonLog({str(self.path)!r})"

    def on_start(self, event: Event) -> None:
        if not event.primary:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in event.history))
        temporary.replace(self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in on_end)

    def on_chunk_end(self, event: Event) -> None:
        if self._file is not None:
            self._file.write("".join(json.dumps(row) + "\n" for row in event.rows))
            self._file.flush()

    def on_end(self, result: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- TensorBoard --------------------------------------------------------------------------


class TensorBoard:
    """Scalars for TensorBoard, written by tensorboardX (``pip install fnnet[tensorboard]``).

    Every number of a history row becomes a scalar at its step, tagged
    ``train/loss``, ``eval/accuracy`` (or ``test/accuracy`` for a named
    evaluation set), and, with replicas, prefixed ``replica_R/``. A resumed run
    purges the events after its checkpoint, so a crash leaves no doubled curve.
    """

    def __init__(self, logdir: str | pathlib.Path):
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "TensorBoard(...) writes with tensorboardX, which is not installed: "
                "pip install 'fnnet[tensorboard]' (or pip install tensorboardX)"
            ) from e
        self.logdir = pathlib.Path(logdir)
        self._writer = None

    def __repr__(self) -> str:
        return f"TensorBoard({str(self.logdir)!r})"

    def on_start(self, event: Event) -> None:
        if not event.primary:
            return
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(self.logdir), purge_step=event.step + 1)

    def on_chunk_end(self, event: Event) -> None:
        if self._writer is None:
            return
        for row in event.rows:
            prefix = f"replica_{row['replica']}/" if "replica" in row else ""
            for name, value in row.items():
                if name in ("step", "replica") or isinstance(value, bool):
                    continue
                if isinstance(value, int | float):
                    group, _, metric = name.partition("_")
                    tag = f"{group}/{metric}" if group in event.sets else f"train/{name}"
                    self._writer.add_scalar(prefix + tag, value, row["step"])
        self._writer.flush()

    def on_end(self, result: Any) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- Restoring the best weights -------------------------------------------------------------


class RestoreBest:
    """At the end of training, hands back each replica's best parameters, not its last.

    ``monitor`` names an evaluation value of the history (``"eval_loss"``,
    ``"eval_accuracy"``, ``"test_accuracy"``); ``mode`` says whether larger
    (``"max"``) or smaller (``"min"``) is better. The best parameters and model
    state are kept on the device and saved in every checkpoint, so a resumed
    run restores the same best. The optimizer state and step stay those of the
    last step (``result.best_step`` says which step the weights are from).
    """

    def __init__(self, monitor: str, mode: str):
        if mode not in ("min", "max"):
            raise ValueError(f"RestoreBest: mode must be 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self._best = None

    def __repr__(self) -> str:
        return f"RestoreBest({self.monitor!r}, mode={self.mode!r})"

    def on_start(self, event: Event) -> None:
        if self._best is None:
            worst = -math.inf if self.mode == "max" else math.inf
            shape = () if event.replicas is None else (event.replicas,)
            # Copies: a donating fit hands the state's own buffers to the next chunk.
            self._best = {
                "params": jax.tree.map(jnp.copy, event.state.params),
                "model_state": jax.tree.map(jnp.copy, event.state.model_state),
                "score": np.full(shape, worst, np.float32),
                "step": np.full(shape, -1, np.int32),
            }

    def on_evaluation(self, event: Event) -> None:
        scores = np.array(self._best["score"], np.float32).reshape(-1)
        steps = np.array(self._best["step"], np.int32).reshape(-1)
        better = np.zeros(scores.shape, bool)
        for row in event.rows:
            r, value = row.get("replica", 0), row.get(self.monitor)
            if value is None or row.get("diverged", False):
                continue
            if (value > scores[r]) if self.mode == "max" else (value < scores[r]):
                better[r], scores[r], steps[r] = True, value, event.step
        if not better.any():
            return
        mask = jnp.asarray(better if event.replicas is not None else better[0])

        def pick(new, kept):
            return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - mask.ndim)), new, kept)

        self._best = {
            "params": jax.tree.map(pick, event.state.params, self._best["params"]),
            "model_state": jax.tree.map(pick, event.state.model_state, self._best["model_state"]),
            "score": scores.reshape(np.shape(self._best["score"])),
            "step": steps.reshape(np.shape(self._best["step"])),
        }

    def save(self) -> Any:
        return self._best

    def load(self, tree: Any) -> None:
        self._best = tree

    def on_end(self, result: Any) -> Any:
        steps = np.asarray(self._best["step"])
        if np.all(steps < 0):
            return None  # never evaluated: the last weights are all there is
        state = result.state._replace(
            params=self._best["params"], model_state=self._best["model_state"]
        )
        best_step = steps.tolist()
        return dataclasses.replace(result, state=state, best_step=best_step)


# --- Progress -------------------------------------------------------------------------------

# With no terminal to redraw a bar on, a line at most this often.
LINE_SECONDS = 30.0
_SHOWN = ("loss", "accuracy", "eval_loss", "eval_accuracy")


class Progress:
    """A bar on a terminal; elsewhere (a log file, CI) a line every ``LINE_SECONDS``.

    The rate and the time left count training time only: compilation, which
    the first chunk of every new length pays, is left out.
    """

    def __init__(self, stream=None):
        self.stream = stream
        self._bar = None
        self._last_line = -math.inf
        self._start = self._initial = 0
        self._train_seconds = 0.0
        self._clock = None

    def on_start(self, event: Event) -> None:
        if not event.primary:
            return
        stream = self.stream or sys.stderr
        self._initial = event.step
        self._clock = time.perf_counter()
        if getattr(stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            # smoothing=0: the rate is steps over (elapsed - compile), see on_chunk_end.
            self._bar = tqdm(
                total=event.steps, initial=event.step, unit="step", smoothing=0, file=stream
            )
        self._stream = stream

    def on_chunk_end(self, event: Event) -> None:
        if self._clock is None:
            return
        now = time.perf_counter()
        self._train_seconds += now - self._clock - event.compile_seconds
        self._clock = now
        shown = {}
        for name in _SHOWN:
            values = [row[name] for row in event.rows if name in row]
            if values:
                shown[name] = float(np.mean(values))
        done = event.step - self._initial
        rate = done / self._train_seconds if self._train_seconds > 0 else math.nan
        if self._bar is not None:
            self._bar.start_t += event.compile_seconds
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(event.step - self._bar.n)
            return
        finished = event.step >= event.steps
        if not finished and now - self._last_line < LINE_SECONDS:
            return
        self._last_line = now
        left = (event.steps - event.step) / rate if rate > 0 else math.nan
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        print(
            f"fit: step {event.step}/{event.steps} ({100 * event.step / event.steps:.0f}%)"
            f"{', ' + metrics if metrics else ''}, {rate:.1f} steps/s"
            + ("" if finished or not math.isfinite(left) else f", about {left:.0f} s left"),
            file=self._stream,
            flush=True,
        )

    def on_end(self, result: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
