"""One process of the two-process test: 4 CPU devices, joined to its peer over loopback.

    python _multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Every process builds the same model and state, loads only its share of the
dataset (``process_rows``), assembles the global dataset with
``shard_data``, trains ``STEPS`` fused steps on the 8-device mesh with the
FSDP rule (so parameters are split across the two processes), then takes
one more step on a global batch assembled from each process's own rows, and
saves a checkpoint with every process taking part. Process 0 writes the
final parameters to ``OUT_DIR/params.npz``.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

import fnnet
from fnnet import distributed, train
from fnnet.train import CheckpointDirectoryError
from fnnet.train._lock import check_shared

DEVICES_PER_PROCESS = 4
STEPS = 3
BATCH = 16
EXAMPLES = 64
FSDP_MIN_SIZE = 64
IMPL = "threefry2x32"  # named, since the test suite's default PRNG differs from JAX's


def problem():
    """The model, optimizer and full dataset; the same in every process and in the test."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXAMPLES, 6)).astype(np.float32)
    y = (np.arange(EXAMPLES) % 3).astype(np.int32)
    model = fnnet.models.mlp(3, hidden=(16,))
    optimizer = optax.adam(1e-2)
    return model, optimizer, (x, y)


def host_batch(data):
    """The rows of the extra host-fed step: the first 8 of each process's share."""
    x, y = data
    return x[:8], y[:8]


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    distributed.init_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.device_count() == DEVICES_PER_PROCESS * num_processes, jax.devices()
    model, optimizer, (x, y) = problem()
    rows = distributed.process_rows(EXAMPLES)
    local = (x[rows], y[rows])  # this process never touches the other rows

    mesh = distributed.mesh_from_spec("data")
    rule = distributed.fsdp_rule(mesh, min_size=FSDP_MIN_SIZE)
    state = train.init_state(model, optimizer, x[0], seed=0, impl=IMPL)
    state = distributed.shard_state(state, mesh, rule)
    step = distributed.sharded_step(
        train.make_train_step(model, optimizer, train.softmax_cross_entropy), mesh, rule=rule
    )
    data = distributed.shard_data(local, mesh)
    run = train.make_fused_steps(step, data, batch_size=BATCH, num_steps=STEPS)
    state, metrics = run(state)
    # The same step fed from the host: each process contributes its own rows.
    state, _ = jax.jit(step)(state, distributed.shard_data(host_batch(local), mesh))
    assert not state.params["hidden_0"]["w"].is_fully_addressable  # split across processes

    manager = train.CheckpointStore(pathlib.Path(out_dir) / "ckpt")
    manager.save(STEPS + 1, state, metadata={"processes": num_processes})
    restored, _ = manager.restore(target=state)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
        assert a.sharding == b.sharding, (a.sharding, b.sharding)
        np.testing.assert_array_equal(
            multihost_utils.process_allgather(a, tiled=True),
            multihost_utils.process_allgather(b, tiled=True),
        )
    # A checkpoint directory must be one place for every process: a folder of each
    # host's own is refused in every process, a shared one passes.
    check_shared(pathlib.Path(out_dir) / "ckpt")
    own = pathlib.Path(out_dir) / f"own-{process_id}"
    own.mkdir()
    try:
        check_shared(own)
    except CheckpointDirectoryError as e:
        assert "process(es) [1] do not see a file process 0 wrote" in str(e), e
    else:
        raise AssertionError("a directory of each process's own was accepted")
    params = {
        jax.tree_util.keystr(kp): multihost_utils.process_allgather(leaf, tiled=True)
        for kp, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
    }
    if distributed.is_primary():
        np.savez(pathlib.Path(out_dir) / "params.npz", loss=np.asarray(metrics["loss"]), **params)
    print(f"process {process_id} done", flush=True)


if __name__ == "__main__":
    # Here, not at import: the test imports this module after JAX has started.
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
