"""The accelerator benchmark runs at tiny size on the CPU and reports sound figures
(never its speed)."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import accelerator

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| xla \| float32 \| (fnnet|hand-written) \| (.+) \|$")


@pytest.fixture(scope="module")
def output():
    cmd = [sys.executable, "-m", "bench.accelerator", "--size", "tiny"]
    cmd += ["--steps", "2", "--repeats", "2", "--warmup", "1", "--peak-flops", "1e12"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_table_has_a_row_per_model_with_finite_positive_figures(output):
    rows = {}
    for line in output.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    assert set(rows) == {"fnnet", "hand-written"}, output
    for name, (step_ms, tokens, mfu, memory, _ratio) in rows.items():
        numbers = [float(step_ms), float(tokens), float(mfu.rstrip("%")), float(memory)]
        assert all(math.isfinite(n) and n > 0 for n in numbers), (name, numbers)
        # tokens/s is batch * seq over the step time (8 x 64 at tiny size).
        assert float(tokens) == pytest.approx(8 * 64 / (float(step_ms) / 1e3), rel=1e-2)
    assert float(rows["fnnet"][4]) > 0 and rows["hand-written"][4] == "-"


def test_the_first_step_losses_matched_and_the_flop_counts_agree(output):
    match = re.search(r"first-step loss: fnnet ([\d.]+), hand-written ([\d.]+)", output)
    fnnet, hand = float(match.group(1)), float(match.group(2))
    assert fnnet == pytest.approx(hand, rel=1e-5)
    assert fnnet == pytest.approx(math.log(256), rel=0.05)  # near-uniform logits at init
    counts = re.search(
        r"analytic ([\d.e+]+), jaxpr fnnet ([\d.e+]+), jaxpr hand ([\d.e+]+)", output
    )
    assert counts.group(1) == counts.group(2) == counts.group(3)
    assert "device cpu" in output and "peak (dense bf16, one device): 1 TFLOP/s" in output


def test_an_unknown_peak_is_named_instead_of_an_mfu(capsys, monkeypatch):
    # The table's cell, without running a model: the CPU has no peak.
    monkeypatch.delenv("FNNET_PEAK_FLOPS", False)
    row = {"attention": "xla", "dtype": "float32", "model": "fnnet", "step_ms": 2.0}
    row |= {"tokens_per_s": 1.0, "mfu": None, "memory_bytes": None, "ratio": 1.0}
    device = accelerator.jax.devices()[0]
    accelerator._print_table([row], accelerator.train.peak_flops(device), device)
    assert "| n/a: unknown peak for cpu; pass --peak-flops |" in capsys.readouterr().out


def test_cudnn_attention_on_the_cpu_is_refused_by_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        accelerator.main(["--attention", "xla,cudnn"])
    assert stop.value.code == 2
    assert "--attention cudnn needs an NVIDIA GPU; this backend is cpu" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--attention", "flash"], "--attention: expected a comma-separated list"),
        (["--dtype", "float16"], "--dtype: expected a comma-separated list"),
        (["--peak-flops", "-1"], "--peak-flops: peak_flops override must be a positive"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        accelerator.main(argv)
    assert message in capsys.readouterr().err
