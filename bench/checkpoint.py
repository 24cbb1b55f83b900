"""How long a checkpoint save holds up training, with orbax's async save on and off.

``python -m bench.checkpoint [--size small|tiny] [--repeats R]`` builds a Transformer
LM (``fnnet.models.transformer_lm``) and its Adam training state, then saves it
with ``fnnet.train.CheckpointStore`` into fresh directories, ``async_save`` on and
off interleaved (the order alternating round by round), and reports the medians of:

- blocking: how long ``save`` takes to return, the time a training loop stands
  still (with async on: the digests and NaN check on the devices and the copy
  of the arrays off them; the files are written in the background);
- committed: from the call until the step is on disk (``save`` then ``wait``).

The first save of each mode is not timed (it compiles the digest program and
starts orbax's threads). Sizes: ``small`` (vocab 8192, width 256, 4 blocks, seq
128: 5.3M parameters, 64 MB of state with Adam's moments); ``tiny`` for the tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnnet import train
from fnnet.models import transformer_lm

SIZES = {
    "small": dict(vocab=8192, features=256, depth=4, num_heads=4, seq=128),
    "tiny": dict(vocab=256, features=32, depth=1, num_heads=2, seq=16),
}


def training_state(size: str) -> train.TrainState:
    s = SIZES[size]
    model = transformer_lm(
        s["vocab"], features=s["features"], depth=s["depth"], num_heads=s["num_heads"],
        max_len=s["seq"], position="learned", tie_embeddings=True,
    )  # fmt: skip
    example = jnp.zeros(s["seq"], jnp.int32)
    init = jax.jit(lambda: train.init_state(model, optax.adam(3e-4), example, seed=0))
    return jax.block_until_ready(init())


def _save(state, root: Path, async_save: bool, step: int) -> tuple[float, float]:
    store = train.CheckpointStore(root / f"{'async' if async_save else 'sync'}-{step}",
                                  keep=1, async_save=async_save)  # fmt: skip
    start = time.perf_counter()
    store.save(step, state, metadata={"bench": "checkpoint"})
    blocking = time.perf_counter() - start
    store.wait()
    committed = time.perf_counter() - start
    store.close()
    return blocking, committed


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint", allow_abbrev=False)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    state = training_state(args.size)
    leaves = jax.tree.leaves(state)
    megabytes = sum(np.asarray(x).nbytes for x in leaves if not jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key)) / 2**20  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="fnnet-bench-checkpoint-"))
    times = {True: [], False: []}
    try:
        for mode in (True, False):  # warm-up: compile the digests, start orbax's threads
            _save(state, root, mode, 0)
        for r in range(args.repeats):
            for mode in (True, False) if r % 2 == 0 else (False, True):
                times[mode].append(_save(state, root, mode, r + 1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for mode in (True, False):
        blocking = statistics.median(t[0] for t in times[mode]) * 1e3
        committed = statistics.median(t[1] for t in times[mode]) * 1e3
        rows.append({"async_save": mode, "blocking_ms": blocking, "committed_ms": committed})
    print(f"Transformer LM ({args.size}): {megabytes:.1f} MB of state, {args.repeats} saves "
          f"each, medians, {jax.devices()[0].platform}")  # fmt: skip
    print("| async_save | blocking (ms) | committed (ms) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['async_save']} | {row['blocking_ms']:.1f} | {row['committed_ms']:.1f} |")
    ratio = rows[0]["blocking_ms"] / rows[1]["blocking_ms"]
    print(f"blocking time, async over sync: {ratio:.2f}")
    return rows


if __name__ == "__main__":
    main()
