"""``python -m experiments run --distributed`` as two real processes on loopback.

Each process has 4 simulated CPU devices. The pair must finish the quick
architectures run, agree with one process on one device to float32 tolerance,
and survive a SIGKILL of both processes followed by a restart: process 0 says
which checkpoint to resume, and both resume it.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _processes import finish, free_port

ROOT = Path(__file__).resolve().parent.parent
# 160 steps: the quick MLP overfits at a high learning rate, and a longer run lets
# float32 rounding (a batch summed over devices in another order) grow into a
# visibly different trajectory; up to here one device and eight agree to 1e-5.
ARGS = ["architectures", "models=mlp", "steps=160", "eval_every=20", "--quick"]
TIMEOUT_S = 300


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_NUM_CPU_DEVICES": str(devices)}


def _start_pair(out: Path) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments",
                "run",
                *ARGS,
                "--no-progress",
                "--checkpoint-seconds",
                "0",
                "--out",
                str(out),
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _finish(workers) -> None:
    finish(workers, TIMEOUT_S)


def _rows(out: Path) -> list[dict]:
    with open(out / "architectures" / "results.csv") as f:
        return list(csv.DictReader(f))


def test_two_processes_survive_a_kill_and_equal_one(tmp_path):
    single = subprocess.run(
        [sys.executable, "-m", "experiments", "run", *ARGS, "--no-progress",
         "--out", str(tmp_path / "one")],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    out = tmp_path / "pair"
    workers = _start_pair(out)
    checkpoints = out / "architectures" / "checkpoints"
    deadline = time.time() + TIMEOUT_S
    while not any(p.name.isdigit() for p in checkpoints.glob("*/*")):
        assert time.time() < deadline, "no checkpoint appeared"
        assert all(w.poll() is None for w in workers), [w.communicate()[0][-3000:] for w in workers]
        time.sleep(0.05)
    for w in workers:
        w.send_signal(signal.SIGKILL)
    for w in workers:
        w.communicate()
    assert not (out / "architectures" / "results.csv").exists(), "finished before the kill"

    _finish(_start_pair(out))
    pair, one = _rows(out), _rows(tmp_path / "one")
    assert [r["seed"] for r in pair] == [r["seed"] for r in one]
    assert all(int(r["resumed_from"]) > 0 for r in pair)
    for column in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(
            [float(r[column]) for r in pair], [float(r[column]) for r in one], rtol=2e-4,
            err_msg=column,
        )  # fmt: skip
