"""A process for the kill tests of checkpoints: saves step 1, then starts saving step 2.

    python _checkpoint_worker.py DIRECTORY MODE

MODE ``large``: step 2 holds about 200 MB of arrays, so its save lasts long enough
for the test to SIGKILL the process while orbax writes the array files.
MODE ``hang``: step 2 is small, and the worker stops for good at orbax's commit
(the rename into place), after every file of step 2 is written; the test kills it
there, the moment a complete-looking but uncommitted checkpoint exists.

The worker prints ``saved 1`` and, in ``hang`` mode, ``committing`` when it gets there.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fnnet.train._checkpoint import CheckpointStore

METADATA = {"model": {"name": "worker"}, "optimizer": {"name": "sgd", "learning_rate": 0.1}}


def small_state(seed: int) -> dict:
    """The state saved as step 1 (and by the test as step 2), the same in every process."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "dense": {
                "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                "b": jnp.asarray(rng.standard_normal(3), jnp.float32),
            }
        },
        "step": jnp.int32(seed),
        "key": jax.random.key(seed, impl="threefry2x32"),
    }


def _large_state() -> dict:
    rng = np.random.default_rng(2)
    # Random bits do not compress, so orbax must write all ~200 MB.
    return {"params": {f"w{i}": rng.random((1024, 5120), np.float32) for i in range(10)}}


def _hang_at_commit() -> None:
    """Makes orbax stop where it would rename step 2 into place."""
    from orbax.checkpoint._src.path import atomicity

    async def finalize(self):
        print("committing", flush=True)
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(directory: str, mode: str) -> None:
    manager = CheckpointStore(directory, keep=3)  # saves in the background
    manager.save(1, small_state(1), metadata=METADATA)
    manager.wait()
    print("saved 1", flush=True)
    if mode == "large":
        manager.save(2, _large_state(), metadata=METADATA)
        print("saving 2 in the background", flush=True)
    elif mode == "hang":
        _hang_at_commit()
        manager.save(2, small_state(7), metadata=METADATA)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    manager.wait()
    print("saved 2", flush=True)  # the test fails if it gets here


if __name__ == "__main__":
    main(*sys.argv[1:])
