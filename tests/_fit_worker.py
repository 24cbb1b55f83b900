"""Trains a small fixed problem with fnnet.train.fit, for the subprocess tests.

Usage: python tests/_fit_worker.py CHECKPOINT_DIR STEPS OUT.npz [--slow]

``--slow`` sleeps after each chunk so a test can kill the process mid-training.
"""

import sys
import time

import jax
import numpy as np
import optax

import fnnet
from fnnet import train


def problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    model = fnnet.models.mlp(2, (16,), dropout_rate=0.1)
    return model, (x, y)


class Slow:
    def on_chunk_end(self, event):
        time.sleep(0.4)


def main():
    checkpoint_dir, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    slow = "--slow" in sys.argv
    model, data = problem()
    # --slow: every chunk takes a while, so the kill lands mid-training.
    callbacks = [Slow()] if slow else []
    if "--log" in sys.argv:
        callbacks.append(train.JsonLog(sys.argv[sys.argv.index("--log") + 1]))
    result = train.fit(
        model,
        optax.adam(1e-2),
        train.softmax_cross_entropy,
        data,
        steps=steps,
        batch_size=16,
        seed=3,
        checkpoint=train.Checkpoints(checkpoint_dir, every=6),
        callbacks=callbacks,
        progress=False,
    )
    leaves = jax.tree.leaves((result.state.params, result.state.opt_state))
    np.savez(out, *[np.asarray(leaf) for leaf in leaves], resumed=result.resumed_from or -1)


if __name__ == "__main__":
    main()
