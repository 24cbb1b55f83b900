"""Two real processes, 4 CPU devices each, joined by jax.distributed over loopback.

They train together (``_multihost_worker.py``: each loads only its half of the
data, parameters split across both by the FSDP rule) and save one checkpoint
together. This process, alone, trains the same steps on one device and
restores their checkpoint.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from _multihost_worker import BATCH, IMPL, STEPS, host_batch, problem
from _processes import finish, free_port, worker_env

from fnnet import train

WORKER = pathlib.Path(__file__).with_name("_multihost_worker.py")
PROCESSES = 2
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """Runs the two workers to the end; returns their output directory."""
    out = tmp_path_factory.mktemp("multihost")
    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(PROCESSES), str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=worker_env(WORKER),
        )
        for i in range(PROCESSES)
    ]
    finish(workers, TIMEOUT_S, done=True)
    return out


@pytest.fixture(scope="module")
def single_run():
    """The same training on this process's default device, unsharded."""
    model, optimizer, (x, y) = problem()
    state = train.init_state(model, optimizer, x[0], seed=0, impl=IMPL)
    step = train.make_train_step(model, optimizer, train.softmax_cross_entropy)
    state, metrics = train.make_fused_steps(step, (x, y), batch_size=BATCH, num_steps=STEPS)(state)
    # The host-fed step: the global batch is process 0's rows, then process 1's.
    half = len(x) // PROCESSES
    shares = [
        host_batch((x[i * half : (i + 1) * half], y[i * half : (i + 1) * half]))
        for i in range(PROCESSES)
    ]
    batch = tuple(np.concatenate(parts) for parts in zip(*shares))
    state, _ = jax.jit(step)(state, batch)
    return state, metrics


def test_two_processes_train_like_one(joint_run, single_run):
    want, want_metrics = single_run
    saved = np.load(joint_run / "params.npz")
    np.testing.assert_allclose(saved["loss"], want_metrics["loss"], rtol=2e-5, atol=2e-6)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(want.params)[0]:
        np.testing.assert_allclose(
            saved[jax.tree_util.keystr(kp)], np.asarray(leaf), rtol=2e-5, atol=2e-6
        )


def test_their_checkpoint_restores_in_one_process(joint_run, single_run):
    saved = np.load(joint_run / "params.npz")
    manager = train.CheckpointStore(joint_run / "ckpt")
    assert manager.steps() == [STEPS + 1]
    want, _ = single_run
    restored, record = manager.restore(target=want)
    assert record["processes"] == PROCESSES
    assert int(restored.step) == STEPS + 1
    for kp, leaf in jax.tree_util.tree_flatten_with_path(restored.params)[0]:
        np.testing.assert_array_equal(np.asarray(leaf), saved[jax.tree_util.keystr(kp)])
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(want.key))
