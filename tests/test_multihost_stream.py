"""``fit`` from :class:`NpyBatches` in two real processes, 4 CPU devices each, on loopback.

Each process reads only its own rows of every batch (``_multihost_stream_worker.py``
records the row indices its source reads from the memory-mapped file), the pair
trains as one process does on 8 devices or on one, and a SIGKILL of both after a
checkpoint in the middle of an epoch, then a restart, ends exactly where the
unbroken pair does.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _multihost_stream_worker import (
    BATCH,
    EVERY,
    EXAMPLES,
    SEED,
    STEPS,
    model_and_optimizer,
    per_batch,
    recorded,
    write_data,
)
from _processes import finish, free_port, worker_env

from fnnet import train

WORKER = pathlib.Path(__file__).with_name("_multihost_stream_worker.py")
PROCESSES = 2
TIMEOUT_S = 120
PER_EPOCH = EXAMPLES // BATCH


def _start(data: pathlib.Path, out: pathlib.Path, *args: str) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(i),
                str(PROCESSES),
                str(port),
                str(data),
                str(out / f"{i}.npz"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=worker_env(WORKER),
        )  # fmt: skip
        for i in range(PROCESSES)
    ]


def _finish(workers: list[subprocess.Popen]) -> None:
    finish(workers, TIMEOUT_S, done=True)


def _results(out: pathlib.Path) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(out / f"{i}.npz")) for i in range(PROCESSES)]


def _leaves(result: dict[str, np.ndarray], prefix: str = "leaf") -> list[np.ndarray]:
    count = sum(k.startswith(f"{prefix}_") for k in result)
    return [result[f"{prefix}_{i}"] for i in range(count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("npy")
    write_data(folder)
    return folder


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory):
    """The pair trained to the end, checkpointing as the killed pair does; then the
    same with 8 replicas."""
    out = tmp_path_factory.mktemp("unbroken")
    _finish(_start(data, out, "--checkpoint", str(out / "run"), "--replicas", "8"))
    return _results(out)


def _one_process(data, **kwargs):
    source = train.NpyBatches(data / "x.npy", data / "y.npy", batch_size=BATCH, seed=SEED)
    model, optimizer = model_and_optimizer()
    result = train.fit(
        model, optimizer, train.softmax_cross_entropy, source, steps=STEPS, batch_size=BATCH,
        progress=False, **{"seed": SEED, **kwargs},
    )  # fmt: skip
    return [np.asarray(a) for a in jax.tree.leaves((result.state.params, result.state.opt_state))]


def test_each_process_reads_only_its_own_rows(data, unbroken, threefry):
    # What one process reading whole batches reads, batch by batch.
    whole = train.NpyBatches(data / "x.npy", data / "y.npy", batch_size=BATCH, seed=SEED)
    rows = recorded(whole)
    for _ in range(STEPS):
        next(whole)
    whole_rows = per_batch(rows)  # (STEPS, BATCH)
    first, second = (r["rows"] for r in unbroken)
    # A line a batch trained on (none read ahead past the last step), BATCH / 2 rows each.
    assert first.shape == second.shape == (STEPS, BATCH // PROCESSES)
    for step in range(STEPS):
        assert not set(first[step]) & set(second[step]), step
    # Process 0 holds the first half of each global batch, process 1 the second.
    np.testing.assert_array_equal(np.concatenate([first, second], axis=1), whole_rows)
    # An epoch reads every row at most once: the shares are disjoint over it too.
    epoch = slice(0, PER_EPOCH)
    assert len(set(first[epoch].ravel()) | set(second[epoch].ravel())) == PER_EPOCH * BATCH


def test_two_processes_train_like_one_on_eight_devices_and_on_one(data, unbroken, threefry):
    first, second = (_leaves(r) for r in unbroken)
    for a, b in zip(first, second):  # both processes gathered the same global values
        np.testing.assert_array_equal(a, b)
    # Not bitwise: the gradient's sum over the two processes runs through Gloo, in
    # another order than XLA's sum over one process's devices (1e-8 apart here).
    for mesh in ("auto", None):
        want = _one_process(data, mesh=mesh)
        assert len(want) == len(first)
        for a, b in zip(first, want):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"mesh={mesh}")


def test_without_a_mesh_each_share_is_refused(unbroken):
    for result in unbroken:
        message = str(result["refused"])
        assert message.startswith("fit: train_data yields this process's 16 rows of each batch")
        assert "of 32 (2 processes)" in message and "mesh='auto'" in message


def test_replicas_split_over_two_processes_train_like_one(data, unbroken, threefry):
    # Whole replicas per device: every process needs every row of each batch, so the
    # feed gathers the shares (each process still reads only its own from the file).
    first, second = unbroken
    np.testing.assert_array_equal(first["replica_rows"], first["rows"])
    np.testing.assert_array_equal(second["replica_rows"], second["rows"])
    want = _one_process(data, seed=[SEED + r for r in range(8)])
    got = _leaves(first, "replicas")
    assert len(got) == len(want)
    for a, b in zip(got, want):  # no sum across devices: bitwise
        np.testing.assert_array_equal(a, b)


def test_a_killed_pair_resumes_as_the_unbroken_one(data, unbroken, tmp_path):
    run = tmp_path / "run"
    workers = _start(data, tmp_path, "--checkpoint", str(run), "--slow")
    manager = train.CheckpointStore(run)
    deadline = time.time() + TIMEOUT_S
    while not (run.exists() and manager.steps()):
        assert time.time() < deadline, "no checkpoint appeared"
        assert all(w.poll() is None for w in workers), [w.communicate()[0][-3000:] for w in workers]
        time.sleep(0.05)
    for w in workers:
        w.send_signal(signal.SIGKILL)
    for w in workers:
        w.communicate()
    assert not any((tmp_path / f"{i}.npz").exists() for i in range(PROCESSES)), "finished early"

    _finish(_start(data, tmp_path, "--checkpoint", str(run)))
    resumed = _results(tmp_path)
    at = int(resumed[0]["resumed"])
    assert at in range(EVERY, STEPS, EVERY) and at % PER_EPOCH, at  # mid-epoch
    for i, (again, whole) in enumerate(zip(resumed, unbroken)):
        assert int(again["resumed"]) == at and int(whole["resumed"]) == -1
        # The restart read its first batch (fit learns the batches' shapes from it
        # before it finds the checkpoint), then its own rows from the checkpoint's
        # step on, and no others.
        np.testing.assert_array_equal(again["rows"][0], whole["rows"][0], err_msg=f"process {i}")
        np.testing.assert_array_equal(again["rows"][1:], whole["rows"][at:], err_msg=f"process {i}")
        for a, b in zip(_leaves(again), _leaves(whole)):
            np.testing.assert_array_equal(a, b)
