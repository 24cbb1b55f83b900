"""The training benchmark's harness runs and reports correctly (never its speed)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bench import _train_baselines as base
from bench import train

ROOT = Path(__file__).resolve().parent.parent
# fnnet's parameter counts of the four MNIST-1D models (docs/models and the paper).
# With one token per sample the transformer's embedding is 1 wide and its position
# table 40 rows, not 512: 103,434.
PARAMS = {
    "mlp": 15_210,
    "cnn": 5_210,
    "gru": 5_110,
    "transformer": 133_834,
    "transformer_tokens": 103_434,
}
# The contenders that run here: the test environment has no PyTorch (bench's extra alone).
JAX_CONTENDERS = [c for c in train.CONTENDERS if c not in train.TORCH]


@pytest.fixture(autouse=True)
def numpy_promotion():
    """The baselines are batched code as people write it (a bias added to a batch)
    and Flax's own layers: NumPy's promotion rules, not the strict ones of conftest."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def data():
    """40 signals like MNIST-1D's: x (40, 40) float32, y (40,) int32."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((40, 40)).astype(np.float32), rng.integers(0, 10, 40, np.int32)


def _check(rec, model, batch, contender, steps):
    assert (rec["model"], rec["batch"], rec["contender"]) == (model, batch, contender)
    assert rec["steps"] == steps
    assert rec["steps_per_s"] > 0 and rec["first_call_s"] > 0
    assert math.isfinite(rec["compile_s"])
    assert math.isfinite(rec["final_loss"])


@pytest.mark.parametrize("contender", JAX_CONTENDERS)
def test_every_contender_trains_the_mlp(contender, data):
    # Batch 20 of 40 examples: two steps make an epoch, and one fused chunk.
    rec = train.measure("mlp", 20, contender, 2, data)
    _check(rec, "mlp", 20, contender, 2)
    assert rec["params"] == PARAMS["mlp"]
    assert rec["steps_per_call"] == (2 if contender in ("fused", "fused8") else 1)


def test_the_cnn_gets_a_channel_axis(data):
    # The one model whose input layout differs: (batch, 40, 1) for every contender.
    rec = train.measure("cnn", 20, "jnp", 2, data)
    _check(rec, "cnn", 20, "jnp", 2)
    assert rec["params"] == PARAMS["cnn"]


@pytest.mark.parametrize("model", train.MODELS)
def test_flax_models_are_the_fnnet_models(model, data):
    x = train.model_input(model, data[0][:3])
    module, params = base.linen_init(model, x, 0)
    assert module.apply({"params": params}, x).shape == (3, 10)
    assert base.count_params(params) == PARAMS[model]
    nnx_model = base.NNX[model](nnx.Rngs(0))
    assert nnx_model(x).shape == (3, 10)
    # NNX's GRUCell has no bias on the recurrent candidate term: 6 fewer per direction.
    expected = PARAMS[model] - (12 if model == "gru" else 0)
    assert base.count_params(nnx.state(nnx_model, nnx.Param)) == expected
    # What the torch contender checks its model against, from shapes alone.
    assert train._fnnet_params(model, x[0]) == PARAMS[model]


def test_handwritten_step_matches_fnnet_loss(data):
    # The hand-written contender trains the fnnet parameter tree on the same loss.
    x, y = jax.device_put(data)
    model = train._fnnet_model("mlp")
    params = model.init(jax.random.key(0), x[0])
    contender = base.handwritten_contender("mlp", params, base.optax.adam(1e-2))
    _, loss = contender.step(contender.state, (x, y))
    logits = jax.vmap(lambda e: model.apply(params, e))(x)
    np.testing.assert_allclose(loss, base.cross_entropy(logits, y), rtol=1e-5)


def _rec(model, batch, contender, speed, repeat):
    return {
        "model": model,
        "batch": batch,
        "contender": contender,
        "steps_per_s": speed,
        "compile_s": 1.0,
        "params": 7,
        "repeat": repeat,
    }


def test_summary_ratios_are_medians_of_paired_ratios():
    records = []
    for r, (jnp_speed, donated_speed, fnnet_speed) in enumerate(
        [(100, 50, 50), (200, 250, 200), (100, 100, 90)]
    ):
        records += [
            _rec("mlp", 100, "jnp", jnp_speed, r),
            _rec("mlp", 100, "jnp_donate", donated_speed, r),
            _rec("mlp", 100, "linen", 80, r),
            _rec("mlp", 100, "nnx", 40, r),
            _rec("mlp", 100, "fnnet", fnnet_speed, r),
            _rec("mlp", 100, "fused", 400, r),
            _rec("mlp", 100, "fused8", 100, r),
        ]
    records.append({"model": "mlp", "batch": 100, "contender": "nnx", "error": "boom"})
    for rec in records:  # fnnet compiles in 1.5 s, the linen contender in 0.5 s, the rest 1 s
        rec["compile_s"] = {"fnnet": 1.5, "linen": 0.5}.get(rec["contender"], 1.0)
    (row,) = train.summarize(records)
    assert row["compile_vs_jnp"] == pytest.approx(1.5)
    assert row["compile_vs_flax"] == pytest.approx(3.0)  # against the quickest Flax
    assert row["speed"]["jnp"] == 100
    # Against the faster hand-written step of each repeat: median of 0.5, 0.8, 0.9.
    assert row["fnnet_vs_jnp"] == pytest.approx(0.8)
    assert row["fnnet_vs_flax"] == pytest.approx(90 / 80)  # median of 50/80, 200/80, 90/80
    assert row["fused_vs_baseline"] == pytest.approx(4.0)  # median of 4, 2, 4
    assert row["seeds_time"] == pytest.approx(4.0)
    table = train.markdown([row], train.DEFAULT_CONTENDERS)
    assert "| mlp | 7 | 100 |" in table and "8 seeds" in table
    assert "| fused / fnnet |" in table


def test_command_line_one_cell_in_a_fresh_process(data, tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=data[0], y=data[1])
    cmd = [sys.executable, "-m", "bench.train", "--one", "mlp", "20", "fnnet"]
    cmd += ["--steps", "2", "--json", "--data", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    _check(json.loads(done.stdout.strip().splitlines()[-1]), "mlp", 20, "fnnet", 2)


def test_summary_compares_fnnet_with_the_faster_pytorch():
    records = []
    for r, (two, one) in enumerate([(10, 40), (50, 20), (30, 25)]):
        records += [
            _rec("gru", 100, "fnnet", 60, r),
            _rec("gru", 100, "fused", 90, r),
            {**_rec("gru", 100, "torch", two, r), "params": 31},
            {**_rec("gru", 100, "torch1", one, r), "params": 31},
        ]
    (row,) = train.summarize(records)
    assert row["params"] == 7 and row["torch_params"] == 31  # fnnet's count, then PyTorch's
    # Against the repeat's faster PyTorch (40, 50, 30): medians of 60/40, 60/50, 60/30
    # and of 90/40, 90/50, 90/30.
    assert row["fnnet_vs_torch"] == pytest.approx(1.5)
    assert row["fused_vs_torch"] == pytest.approx(2.25)
    table = train.markdown([row], ["fnnet", "fused", "torch", "torch1"])
    assert "| PyTorch | PyTorch, 1 thread |" in table
    assert "| fnnet / PyTorch | fused / PyTorch |" in table
    assert "| gru | 7 | 100 | 60.0 | 90.0 | 30.0 | 25.0 |" in table
    assert "gru 31" in table  # the differing count is printed
    assert "fnnet / PyTorch" not in train.markdown([row], ["fnnet", "fused"])


def test_command_line_offers_the_torch_contender_and_the_token_transformer():
    assert {"torch", "torch1"} <= set(train.CONTENDERS) and "torch" in train.DEFAULT_CONTENDERS
    args = train.build_parser().parse_args(
        ["--models", "transformer,transformer_tokens", "--contenders", "fnnet,fused,torch"]
    )
    assert args.models == ["transformer", "transformer_tokens"]
    assert args.contenders == ["fnnet", "fused", "torch"]
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--contenders", "pytorch"])
    done = subprocess.run(
        [sys.executable, "-m", "bench.train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "torch1" in done.stdout and "transformer_tokens" in done.stdout


# Runs bench.train as if PyTorch were not installed: None in sys.modules makes
# ``import torch`` raise ImportError, as a missing package does.
WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from bench import train
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    "argv",
    [["--one", "mlp", "20", "torch", "--steps", "2"], ["--models", "mlp", "--contenders", "torch"]],
    ids=["one cell", "grid"],
)
def test_missing_pytorch_is_a_clear_error(argv):
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert 'pip install -e ".[bench]"' in done.stderr
    assert "Traceback" not in done.stderr
