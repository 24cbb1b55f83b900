"""What the multi-process tests share: a loopback port for the coordinator, a worker's
environment, and waiting for a set of workers to end well."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(worker: pathlib.Path, **extra: str) -> dict[str, str]:
    """This environment, with the repository and the tests' folder importable."""
    paths = [str(worker.parent.parent), str(worker.parent)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def finish(workers: list[subprocess.Popen], timeout: float, *, done: bool = False) -> list[str]:
    """Waits for every worker (killing the rest if one overruns); asserts each exited 0,
    and with ``done`` that worker ``i`` printed ``process i done``. Returns their logs."""
    logs = []
    try:
        logs = [w.communicate(timeout=timeout)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
    for i, (w, log) in enumerate(zip(workers, logs)):
        assert w.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
        if done:
            assert f"process {i} done" in log
    return logs
