"""One process of the two-process streaming test: 4 CPU devices, joined over loopback.

    python _multihost_stream_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT.npz
        [--checkpoint DIR] [--slow] [--replicas N]

Trains ``fit`` from :class:`NpyBatches` over ``DATA_DIR/x.npy`` and
``DATA_DIR/y.npy`` (``write_data`` makes them) on the 8-device mesh of both
processes. The source's memory-mapped labels are wrapped so that every row
index it reads is recorded. ``OUT.npz`` holds ``rows`` (one line per batch
read, in order), ``leaf_0, leaf_1, ...`` (the final parameters and optimizer
state, gathered from both processes), ``resumed`` (the step the run resumed
from; -1: none) and ``refused`` (the error of ``fit`` given ``mesh=None``).
``--slow`` sleeps after each chunk so the test can kill the pair mid-training.
``--replicas N`` then trains N seeds side by side, one whole replica a device
(``replica_rows``, ``replicas_0, ...``).
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

import fnnet
from fnnet import distributed, train

DEVICES_PER_PROCESS = 4
EXAMPLES = 200
BATCH = 32  # 6 steps an epoch, 8 rows dropped from each
STEPS = 20
EVERY = 5  # checkpoints at 5, 10, 15: each in the middle of an epoch
SEED = 4


def write_data(folder: pathlib.Path) -> None:
    """Examples whose rows all differ, so a batch's rows name their indices."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXAMPLES, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)


def model_and_optimizer():
    return fnnet.models.mlp(2, (16,)), optax.adam(1e-2)


class RecordedRows:
    """A memory-mapped array that notes the row indices of every read. It is no NumPy
    array, so the run's fingerprint checksums none of its rows (the same in every run)."""

    def __init__(self, array: np.ndarray, log: list[np.ndarray]):
        self.array, self.log = array, log
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, rows):
        self.log.append(np.array(rows))
        return self.array[rows]


def recorded(source: train.NpyBatches) -> list[np.ndarray]:
    """The rows ``source`` reads from its labels' file from now on, one entry a read:
    a batch's ``(rows,)``, or a chunk's ``(batches, rows)`` (``next_batches``)."""
    log: list[np.ndarray] = []
    source._arrays["y"] = RecordedRows(source._arrays["y"], log)
    return log


def per_batch(log: list[np.ndarray]) -> np.ndarray:
    """The reads ``recorded`` noted, one line a batch, in order: ``(batches, rows)``."""
    return np.concatenate([np.reshape(rows, (-1, np.shape(rows)[-1])) for rows in log])


class Slow:
    def on_chunk_end(self, event):
        time.sleep(0.5)


def train_once(data: pathlib.Path, **kwargs) -> tuple[train.FitResult, list[np.ndarray]]:
    """``fit`` from a fresh source over ``data``; the result and the rows the source read."""
    source = train.NpyBatches(data / "x.npy", data / "y.npy", batch_size=BATCH, seed=SEED)
    rows = recorded(source)
    model, optimizer = model_and_optimizer()
    result = train.fit(
        model, optimizer, train.softmax_cross_entropy, source, steps=STEPS, batch_size=BATCH,
        progress=False, **{"seed": SEED, **kwargs},
    )  # fmt: skip
    assert len(jax.tree.leaves(result.state.params)[0].sharding.device_set) == jax.device_count()
    return result, rows


def gathered(result: train.FitResult) -> list[np.ndarray]:
    """The final parameters and optimizer state, whole, in every process."""
    return [
        np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        for leaf in jax.tree.leaves((result.state.params, result.state.opt_state))
    ]


def main(args: list[str]) -> None:
    process_id, num_processes, port = int(args[0]), int(args[1]), int(args[2])
    data, out = pathlib.Path(args[3]), args[4]
    distributed.init_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.device_count() == DEVICES_PER_PROCESS * num_processes, jax.devices()
    checkpoint = None
    if "--checkpoint" in args:
        checkpoint = train.Checkpoints(args[args.index("--checkpoint") + 1], every=EVERY)
    callbacks = [Slow()] if "--slow" in args else []
    try:  # each process would train alone on half of every batch
        train_once(data, mesh=None)
    except ValueError as error:
        refused = str(error)
    else:
        raise AssertionError("fit trained on a share of each batch without a mesh")
    result, rows = train_once(data, checkpoint=checkpoint, callbacks=callbacks)
    arrays = {f"leaf_{i}": leaf for i, leaf in enumerate(gathered(result))}
    arrays["resumed"] = np.asarray(-1 if result.resumed_from is None else result.resumed_from)
    arrays["rows"] = per_batch(rows)
    arrays["refused"] = np.asarray(refused)
    if "--replicas" in args:
        # Whole replicas per device: the batches' rows are gathered across processes.
        seeds = [SEED + r for r in range(int(args[args.index("--replicas") + 1]))]
        result, rows = train_once(data, seed=seeds)
        arrays.update({f"replicas_{i}": leaf for i, leaf in enumerate(gathered(result))})
        arrays["replica_rows"] = per_batch(rows)
    np.savez(out, **arrays)
    print(f"process {process_id} done", flush=True)


if __name__ == "__main__":
    # Here, not at import: the test imports this module after JAX has started.
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    main(sys.argv[1:])
