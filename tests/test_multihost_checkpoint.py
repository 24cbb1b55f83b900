"""Checkpoints of a state split over two real processes, 4 CPU devices each.

The two workers (``_multihost_checkpoint_worker.py``, joined by jax.distributed
over loopback) save an FSDP-split state of 37.8 MB as step 1 and restore it, then
are killed with SIGKILL while orbax writes step 2 (201 MB) in the background.
This process, alone, then restores step 1 on its own mesh and on one device, and
saves step 2 again.

Measured on a 2-core machine (``pytest tests/test_multihost_checkpoint.py``; the
a failing check prints every figure of its run): each process wrote 16.7 MB, its
half of the state as orbax compresses it, into its own ``state/ocdbt.process_<i>``,
and a restore read back 16.7 MB, its own files. A save raised a process's peak host
memory by 18.0 to 19.2 MB (0.47 to 0.51 of the state: TensorStore holds the
process's compressed shards until it writes its data file); a restore by 20 to 33
MB, of which 19.0 MB are the shards it restored. The first save of a process, which
compiles the digests and starts orbax's threads, raised it by 52 to 58 MB. While
one program digested the whole state (before ``fnnet.train._digest`` took one leaf
at a time) a save raised it by 57.3 MB and a restore by 77 to 81 MB.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from _multihost_checkpoint_worker import METADATA, SMALL, bits, make_state
from _processes import free_port, worker_env

from fnnet import distributed, train

WORKER = pathlib.Path(__file__).with_name("_multihost_checkpoint_worker.py")
PROCESSES = 2
TIMEOUT_S = 240
# What a process may add to its peak host memory, as a fraction of the whole
# state: a process that gathered the state, or a copy of it, would pass 1.
MEMORY_LIMIT = 0.7

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="measures memory through Linux's /proc"
)


@pytest.fixture(scope="module")
def killed_pair(tmp_path_factory):
    """Runs the two workers to the middle of their save of step 2 and kills both;
    returns the checkpoint directory and each process's results."""
    directory = tmp_path_factory.mktemp("multihost-checkpoint") / "ckpt"
    port = free_port()
    env = worker_env(
        WORKER,
        # Every block of 128 KiB or more is mapped on its own and unmapped when freed
        # (glibc otherwise raises this threshold as blocks are freed, and serves the
        # next ones from memory already counted), so a peak counts each allocation.
        MALLOC_MMAP_THRESHOLD_=str(128 * 1024),
    )
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(PROCESSES), str(port), str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(PROCESSES)
    ]
    watchdog = threading.Timer(TIMEOUT_S, lambda: [w.terminate() for w in workers])
    watchdog.start()
    results, logs, committed = [], [], None
    try:
        for worker in workers:
            log, result = [], None
            for line in worker.stdout:
                log.append(line)
                if line.startswith("result "):
                    result = json.loads(line.removeprefix("result "))
                if line.startswith("saving 2"):
                    break
            results.append(result)
            logs.append("".join(log))
        committed = (directory / "2").exists()
    finally:
        watchdog.cancel()
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        for i, worker in enumerate(workers):
            rest = worker.communicate()[0]  # and closes the pipe
            if i < len(logs):
                logs[i] += rest
    for worker, log in zip(workers, logs):
        assert worker.returncode == -signal.SIGKILL, f"a worker ended by itself:\n{log[-4000:]}"
    assert not committed, (
        "step 2 was committed before the kill: make _multihost_checkpoint_worker.LARGE larger"
    )
    return directory, results


def _process_dirs(directory: pathlib.Path, step: int) -> dict[str, int]:
    """``{ocdbt.process_<i>: bytes under it}`` of a step's arrays."""
    return {
        d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        for d in sorted((directory / str(step) / "state").glob("ocdbt.process_*"))
    }


def test_each_process_writes_only_its_own_shards(killed_pair):
    directory, results = killed_pair
    whole = results[0]["state_bytes"]
    assert all(r["split"] for r in results), "the state was not split across the processes"
    written = _process_dirs(directory, 1)
    assert list(written) == [f"ocdbt.process_{i}" for i in range(PROCESSES)], written
    for i, result in enumerate(results):
        own = written[f"ocdbt.process_{i}"]
        # Orbax compresses what it writes: each half of this state comes to 0.44 of it.
        assert 0.35 * whole < own < 0.55 * whole, (i, own, whole)
        # The process wrote its own directory and little else (records, indexes).
        assert abs(result["save"]["written"] - own) < 0.02 * whole, (i, result["save"], own)


def test_saving_adds_well_under_the_state_to_host_memory(killed_pair):
    _, results = killed_pair
    for i, result in enumerate(results):
        rise = result["save"]["peak_rise"]
        assert rise < MEMORY_LIMIT * result["state_bytes"], (
            f"saving raised the peak host memory of process {i} by {rise / 1e6:.1f} MB, "
            f"{rise / result['state_bytes']:.2f} of the whole state "
            f"({result['state_bytes'] / 1e6:.1f} MB); all figures: {result}"
        )


def test_restoring_on_two_processes_reads_and_holds_only_own_shards(killed_pair):
    directory, results = killed_pair
    written = _process_dirs(directory, 1)
    for i, result in enumerate(results):
        restore, whole = result["restore"], result["state_bytes"]
        assert result["restored_equal"], f"process {i} restored other bits or shardings"
        # It read its own directory's files (and the small index), not its peer's.
        own = written[f"ocdbt.process_{i}"]
        assert abs(restore["read"] - own) < 0.02 * whole, (i, restore, own)
        extra = restore["peak_rise"] - restore["own_bytes"]
        assert extra < MEMORY_LIMIT * whole, (
            f"restoring raised the peak host memory of process {i} by "
            f"{restore['peak_rise'] / 1e6:.1f} MB, {extra / 1e6:.1f} MB beyond the "
            f"{restore['own_bytes'] / 1e6:.1f} MB of shards it restored; all figures: {result}"
        )


def _assert_bitwise_equal(got, want) -> None:
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(got_leaves, want_leaves, strict=True):
        assert x.dtype == y.dtype and x.sharding == y.sharding, (x, y)
        assert np.asarray(bits(x)).tobytes() == np.asarray(bits(y)).tobytes()


def test_restores_in_one_process_on_eight_devices_and_on_one(killed_pair):
    directory, _ = killed_pair
    store = train.CheckpointStore(directory)
    want = make_state(distributed.mesh_from_spec("data"), SMALL)
    restored, record = store.restore(1, target=want)
    _assert_bitwise_equal(restored, want)
    assert not want.params["hidden_0"]["w"].sharding.is_fully_replicated
    one = jax.device_put(want, jax.devices()[0])
    restored, _ = store.restore(1, target=one)
    _assert_bitwise_equal(restored, one)
    assert record["model"] == METADATA["model"]


def test_a_kill_mid_save_leaves_the_step_before_and_the_step_saves_again(killed_pair):
    directory, _ = killed_pair
    store = train.CheckpointStore(directory)
    assert store.steps() == [1]
    assert [p.name for p in store.unfinished_saves()] == ["2.orbax-checkpoint-tmp"]
    mesh = distributed.mesh_from_spec("data")
    want = make_state(mesh, SMALL)
    restored, _ = store.restore(target=want)
    _assert_bitwise_equal(restored, want)
    again = make_state(mesh, SMALL, seed=1)
    store.save(2, again, metadata=METADATA)
    store.close()
    assert store.steps() == [1, 2]
    restored, _ = store.restore(2, target=again)
    _assert_bitwise_equal(restored, again)
