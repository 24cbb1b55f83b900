"""Trains a small fixed problem on memory-mapped .npy files, for the kill-and-resume test.

Usage: python tests/_stream_worker.py DATA_DIR CHECKPOINT_DIR OUT.npz [--slow]

The first run writes ``x.npy`` and ``y.npy`` into DATA_DIR if they are not there.
``--slow`` sleeps after each chunk so the test can kill the process mid-training.
"""

import pathlib
import sys
import time

import jax
import numpy as np
import optax

import fnnet
from fnnet import train

STEPS = 30
EVERY = 5  # checkpoints at 5, 10, ...: none at an epoch's end (6 steps an epoch)


def write_data(folder: pathlib.Path) -> None:
    if (folder / "y.npy").exists():
        return
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)


class Slow:
    def on_chunk_end(self, event):
        time.sleep(0.4)


def main():
    data, checkpoint_dir, out = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    write_data(data)
    source = train.NpyBatches(data / "x.npy", data / "y.npy", batch_size=16, seed=5)
    result = train.fit(
        fnnet.models.mlp(2, (16,), dropout_rate=0.1),
        optax.adam(1e-2),
        train.softmax_cross_entropy,
        source,
        steps=STEPS,
        batch_size=16,
        seed=5,
        checkpoint=train.Checkpoints(checkpoint_dir, every=EVERY),
        callbacks=[Slow()] if "--slow" in sys.argv else [],
        progress=False,
    )
    leaves = jax.tree.leaves((result.state.params, result.state.opt_state))
    np.savez(out, *[np.asarray(leaf) for leaf in leaves], resumed=result.resumed_from or -1)


if __name__ == "__main__":
    main()
