"""bench.stream runs at a tiny size and reports sound figures (never its speed)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import stream

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| mlp \| 20 \| 3 \| (.+) \|$")


def test_the_command_line_prints_both_contenders_and_their_ratio():
    cmd = [sys.executable, "-m", "bench.stream", "--models", "mlp", "--batches", "20"]
    cmd += ["--rounds", "2", "--slices", "2", "--steps", "6", "--examples", "60"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [ROW.match(line) for line in done.stdout.splitlines()]
    (row,) = [m for m in rows if m]  # 60 signals at batch 20: 3 steps a call
    memory, streamed, ratio, each = (cell.strip() for cell in row.group(1).split("|"))
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in (memory, streamed, ratio))
    rounds = [float(r) for r in each.split(", ")]
    assert len(rounds) == 2
    assert float(ratio) == pytest.approx(np.median(rounds), abs=0.006)  # printed to 0.01
    assert "60 MNIST-1D signals" in done.stdout and "median of 2 rounds of 2 slices" in done.stdout


def test_contenders_that_train_on_other_batches_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((40, 40)).astype(np.float32), rng.integers(0, 10, 40, np.int32)
    paths = stream.write_npy(tmp_path, "mlp", (data[0][::-1].copy(), data[1]))  # other inputs
    with pytest.raises(AssertionError, match="must train on the same batches"):
        stream.measure("mlp", 20, data, paths, steps=2, slices=1)
    # The same examples on disk train as in memory, to the last bit.
    paths = stream.write_npy(tmp_path, "mlp", data)
    record = stream.measure("mlp", 20, data, paths, steps=4, slices=2, first="stream")
    assert record["steps_per_call"] == 2 and record["memory"]["steps"] == 4
    assert record["stream"]["us_per_step"] > 0 and math.isfinite(record["final_loss"])
