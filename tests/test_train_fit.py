"""fit: learning, logging, early stopping, non-finite stops, exact resume, crashes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnnet
from fnnet import train
from fnnet.models import config_of
from fnnet.train import _record

WORKER = os.path.join(os.path.dirname(__file__), "_fit_worker.py")


def _blobs(n=128, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    centers = np.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]], np.float32)
    x = (centers[y] + 0.5 * rng.standard_normal((n, 2))).astype(np.float32)
    return x, y


def test_fit_learns_logs_and_evaluates(tmp_path):
    model = fnnet.models.mlp(3, (16,))
    log = tmp_path / "metrics.jsonl"
    result = train.fit(
        model, optax.adam(1e-2), train.softmax_cross_entropy, _blobs(), steps=64, batch_size=16,
        metric_fns={"accuracy": train.accuracy}, eval_data=_blobs(64, seed=1), eval_every=32,
        callbacks=[train.JsonLog(log)], progress=False,
    )  # fmt: skip
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows == result.history
    assert [r["step"] for r in rows] == [8, 16, 24, 32, 40, 48, 56, 64]  # one epoch per chunk
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert rows[-1]["eval_accuracy"] > 0.9
    assert "eval_loss" in rows[3] and "eval_loss" not in rows[2]
    assert int(result.state.step) == 64


def test_only_process_0_writes_the_log(tmp_path, monkeypatch, capsys):
    # In a multi-process run every process trains; a second process must not write
    # the log or draw a progress bar (pretend to be process 1 of a run).
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    log = tmp_path / "metrics.jsonl"
    result = train.fit(
        fnnet.models.mlp(3, (4,)), optax.adam(1e-2), train.softmax_cross_entropy, _blobs(),
        steps=8, batch_size=16, callbacks=[train.JsonLog(log)], progress=True,
    )  # fmt: skip
    assert len(result.history) == 1 and not log.exists()
    assert "step" not in capsys.readouterr().err


def test_early_stopping_stops_when_the_metric_stalls():
    x, _ = _blobs()
    noise = (x, np.random.default_rng(5).integers(0, 3, len(x)).astype(np.int32))
    result = train.fit(
        fnnet.models.mlp(3, (32,)), optax.adam(3e-2), train.softmax_cross_entropy, noise,
        steps=400, batch_size=16, metric_fns={"accuracy": train.accuracy},
        eval_data=_blobs(64, seed=2), eval_every=8,
        early_stopping=train.EarlyStopping("eval_loss", 2), progress=False,
    )  # fmt: skip
    assert result.stopped_early
    assert int(result.state.step) < 400


def test_non_finite_loss_stops_with_the_step_and_writes_no_checkpoint(tmp_path):
    x, y = _blobs()
    x = x.copy()
    x[40] = np.nan  # in the third batch of the unshuffled first epoch
    with pytest.raises(train.NonFiniteError, match="step 2") as err:
        train.fit(
            fnnet.models.mlp(3, (8,)), optax.sgd(1e-2), train.softmax_cross_entropy, (x, y),
            steps=16, batch_size=16, shuffle=False,
            checkpoint=train.Checkpoints(tmp_path / "ckpt", every=8), progress=False,
        )  # fmt: skip
    assert "loss" in str(err.value)
    manager = train.CheckpointStore(tmp_path / "ckpt")
    assert manager.steps() == []
    # The error hands back the state from the start of the failed chunk: every
    # value finite, and its step that chunk's first.
    last = err.value.last_finite_state
    assert int(last.step) == 0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(last.params))


def _run_worker(tmp_path, name, steps, *flags):
    out = tmp_path / f"{name}.npz"
    cmd = [sys.executable, WORKER, str(tmp_path / name), str(steps), str(out), *flags]
    return cmd, out


def _leaves(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: (len(k), k)) if k.startswith("arr_")]


def test_resume_in_a_new_process_is_bitwise_exact(tmp_path):
    straight_cmd, straight = _run_worker(tmp_path, "straight", 24)
    subprocess.run(straight_cmd, check=True, timeout=120)
    first_cmd, _ = _run_worker(tmp_path, "resumed", 12)
    subprocess.run(first_cmd, check=True, timeout=120)
    second_cmd, resumed = _run_worker(tmp_path, "resumed", 24)
    subprocess.run(second_cmd, check=True, timeout=120)
    assert int(np.load(resumed)["resumed"]) == 12
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigkill_mid_training_loses_at_most_the_work_since_the_last_checkpoint(tmp_path):
    straight_cmd, straight = _run_worker(tmp_path, "straight", 36)
    subprocess.run(straight_cmd, check=True, timeout=120)
    cmd, out = _run_worker(tmp_path, "killed", 36, "--slow")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manager = train.CheckpointStore(tmp_path / "killed")
    deadline = time.time() + 90
    while not manager.steps() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the worker finished before it was killed"
    saved = manager.steps()
    assert saved and saved[-1] < 36
    resume_cmd, _ = _run_worker(tmp_path, "killed", 36)
    subprocess.run(resume_cmd, check=True, timeout=120)
    assert int(np.load(out)["resumed"]) == saved[-1]
    for a, b in zip(_leaves(straight), _leaves(out), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_model_rebuilds_the_model_from_the_checkpoint_alone(tmp_path):
    model = fnnet.models.mlp(3, (16,))
    result = train.fit(
        model, optax.adam(1e-2), train.softmax_cross_entropy, _blobs(), steps=16, batch_size=16,
        checkpoint=tmp_path / "ckpt", progress=False,
    )  # fmt: skip
    rebuilt, params, model_state, metadata = train.load_model(tmp_path / "ckpt")
    assert config_of(rebuilt) == config_of(model)
    x = jnp.asarray(_blobs(4)[0])
    np.testing.assert_array_equal(
        jax.vmap(lambda x: rebuilt.apply(params, x))(x),
        jax.vmap(lambda x: model.apply(result.state.params, x))(x),
    )
    assert metadata["fit"]["batch_size"] == 16


def test_load_model_tells_how_to_restore_a_custom_model(tmp_path):
    model = fnnet.serial(fnnet.dense(8), fnnet.relu(), fnnet.dense(3))  # not a shipped model
    result = train.fit(
        model, optax.adam(1e-2), train.softmax_cross_entropy, _blobs(), steps=4, batch_size=16,
        checkpoint=tmp_path / "ckpt", progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"CheckpointStore\(.*ckpt.*\)\.restore\(\)"):
        train.load_model(tmp_path / "ckpt")
    # What the message says to do works.
    tree, _ = train.CheckpointStore(tmp_path / "ckpt").restore()
    for a, b in zip(jax.tree.leaves(tree["state"].params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(a, b)


def test_an_edited_model_record_is_refused_not_rebuilt_as_another_model(tmp_path):
    train.fit(
        fnnet.models.mlp(3, (16,)), optax.adam(1e-2), train.softmax_cross_entropy, _blobs(),
        steps=4, batch_size=16, checkpoint=tmp_path / "ckpt", progress=False,
    )  # fmt: skip
    (record,) = (tmp_path / "ckpt").glob("*/metadata/metadata.json")
    text = record.read_text()
    assert '"relu"' in text
    record.write_text(text.replace('"relu"', '"tanh"'))  # same parameter tree, other model
    warned = pytest.warns(train.CheckpointWarning, match="does not match its checksum")
    with warned, pytest.raises(train.CheckpointError, match="no intact"):
        train.load_model(tmp_path / "ckpt")


def test_load_model_refuses_a_record_that_describes_another_tree_even_if_resealed(tmp_path):
    train.fit(
        fnnet.models.mlp(3, (16,)), optax.adam(1e-2), train.softmax_cross_entropy, _blobs(),
        steps=4, batch_size=16, checkpoint=tmp_path / "ckpt", progress=False,
    )  # fmt: skip
    (path,) = (tmp_path / "ckpt").glob("*/metadata/metadata.json")
    record = json.loads(path.read_text())
    assert record["model"]["kwargs"]["hidden"] == [16]
    record["model"]["kwargs"]["hidden"] = [8]  # checksummed again, as a deliberate edit would be
    path.write_text(
        json.dumps(_record.seal({k: v for k, v in record.items() if k != "record_crc32"}))
    )
    with pytest.raises(ValueError, match=r"do not fit the model its record describes.*\(16, 3\)"):
        train.load_model(tmp_path / "ckpt")
