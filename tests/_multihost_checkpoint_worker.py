"""One process of the multi-process checkpoint test: 4 CPU devices, joined over loopback.

    python _multihost_checkpoint_worker.py PROCESS_ID NUM_PROCESSES PORT DIRECTORY

Every process builds the same training state of about 40 MB split over the
8-device mesh by the FSDP rule (``make_state(mesh, SMALL)``: each process holds
half of every large leaf), saves it as step 1 of ``DIRECTORY`` and restores it
into the same shardings, measuring both. It prints ``result {json}``, then starts
saving a state of about 200 MB as step 2, prints ``saving 2`` once orbax's
temporary directory is there, and waits for the test to kill it.

A save and a restore of the same shapes into ``DIRECTORY-warm-up`` come first
(measured too, as ``first_save`` and ``first_restore``): they compile the digests
and start orbax's and TensorStore's threads, costs that do not grow with the state.
"""

from __future__ import annotations

import ctypes
import gc
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fnnet
from fnnet import distributed, train

DEVICES_PER_PROCESS = 4
IMPL = "threefry2x32"  # named, since the test suite's default PRNG differs from JAX's
# (features in, hidden width, features out) of an MLP trained by Adam: its
# parameters, mu and nu are 3 x 12.6 MB for SMALL, 3 x 67 MB for LARGE.
SMALL = (1024, 1536, 1024)
LARGE = (2048, 4096, 2048)
METADATA = {"model": {"name": "mlp"}, "optimizer": {"name": "adam"}}
_LIBC = ctypes.CDLL(None)


def _init(size: tuple[int, int, int]):
    features, hidden, out = size
    model = fnnet.models.mlp(out, (hidden,))
    example = jax.ShapeDtypeStruct((features,), jnp.float32)
    return lambda: train.init_state(model, optax.adam(1e-3), example, seed=0, impl=IMPL)


def _mix(h: jax.Array) -> jax.Array:
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's finaliser
        h = (h ^ (h >> shift)) * jnp.uint32(factor)
    return h ^ (h >> 16)


def _noise(shape: tuple[int, ...], salt: int) -> jax.Array:
    """float32 values in [0, 1) hashed from each element's position: the same bits on
    any mesh and any number of processes, and far cheaper than threefry on a CPU."""
    position, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        position = position + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    mantissa = _mix(position ^ _mix(jnp.uint32(salt))) >> 9
    return lax.bitcast_convert_type(mantissa | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def make_state(mesh: jax.sharding.Mesh, size: tuple[int, int, int], seed: int = 0):
    """A training state split over ``mesh`` by the FSDP rule, each device computing
    only its own part.

    Every float leaf (the parameters, and Adam's mu and nu, which a fresh state
    holds as zeros) is noise in [0, 1) that differs by leaf and by ``seed``; the
    keys come from ``init_state`` and the step is 7.
    """
    init = _init(size)
    sharding = distributed.state_sharding(jax.eval_shape(init), mesh, distributed.fsdp_rule(mesh))

    def filled():
        leaves, treedef = jax.tree.flatten(init())
        leaves = [
            _noise(x.shape, 1000 * seed + i) if x.dtype == jnp.float32 else x
            for i, x in enumerate(leaves)
        ]
        return jax.tree.unflatten(treedef, leaves)._replace(step=jnp.int32(7))

    return jax.jit(filled, out_shardings=sharding)()


def bits(x: jax.Array) -> jax.Array:
    """``x``, or a PRNG key's data."""
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def state_bytes(state) -> int:
    """The bytes of every leaf of ``state``, whole (not per process)."""
    return sum(bits(x).nbytes for x in jax.tree.leaves(state))


def own_bytes(state) -> int:
    """The bytes of ``state`` this process holds: its shards, on each of its devices."""
    return sum(s.data.nbytes for x in jax.tree.leaves(state) for s in bits(x).addressable_shards)


def same_shards(a, b) -> bool:
    """Whether two placed states have the same shardings and the same bits in this
    process's shards (nothing is gathered across processes)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if x.sharding != y.sharding or x.dtype != y.dtype:
            return False
        mine = {s.device: s for s in bits(x).addressable_shards}
        for shard in bits(y).addressable_shards:
            theirs = mine[shard.device]
            if shard.index != theirs.index:
                return False
            if np.asarray(shard.data).tobytes() != np.asarray(theirs.data).tobytes():
                return False
    return True


def _proc(name: str, field: str) -> int:
    for line in pathlib.Path("/proc/self", name).read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            number, *unit = value.split()
            return int(number) * (1024 if unit == ["kB"] else 1)
    raise KeyError(f"no {field} in /proc/self/{name}")


class Measured:
    """What the ``with`` block cost this process: ``peak_rise``, the peak host memory
    above what was in use at its start (``/proc/self/status``: VmHWM after, less
    VmRSS before); ``written`` and ``read``, the bytes it wrote and read
    (``/proc/self/io``: wchar and rchar, over every thread); and ``seconds``."""

    def __enter__(self):
        gc.collect()
        _LIBC.malloc_trim(0)  # freed memory goes back, so what is reused counts as new
        # "5" resets the peak (VmHWM) to the memory in use now (Linux 4.0 and later).
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        self.rss = _proc("status", "VmRSS")
        self.io = {f: _proc("io", f) for f in ("wchar", "rchar")}
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.figures = {
            "peak_rise": _proc("status", "VmHWM") - self.rss,
            "written": _proc("io", "wchar") - self.io["wchar"],
            "read": _proc("io", "rchar") - self.io["rchar"],
            "seconds": round(time.perf_counter() - self.start, 2),
        }


def _save_and_restore(store: train.CheckpointStore, state, target) -> tuple[dict, dict, bool]:
    with Measured() as save:
        store.save(1, state, metadata=METADATA)
        store.wait()
    with Measured() as restore:
        restored, _ = store.restore(1, target=target)
    restore.figures["own_bytes"] = own_bytes(restored)
    return save.figures, restore.figures, same_shards(state, restored)


def main(process_id: int, num_processes: int, port: int, directory: str) -> None:
    distributed.init_distributed(f"127.0.0.1:{port}", num_processes, process_id)
    assert jax.device_count() == DEVICES_PER_PROCESS * num_processes, jax.devices()
    mesh = distributed.mesh_from_spec("data")
    state = make_state(mesh, SMALL)
    # Shapes and shardings alone: the restore does not start from a copy of the state.
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    warm_up = train.CheckpointStore(directory + "-warm-up")
    first_save, first_restore, _ = _save_and_restore(warm_up, state, target)
    warm_up.close()
    store = train.CheckpointStore(directory)
    save, restore, equal = _save_and_restore(store, state, target)
    result = {
        "state_bytes": state_bytes(state),
        "split": not state.params["hidden_0"]["w"].is_fully_addressable,
        "first_save": first_save,
        "first_restore": first_restore,
        "save": save,
        "restore": restore,
        "restored_equal": equal,
    }
    print(f"result {json.dumps(result)}", flush=True)
    del state
    store.save(2, make_state(mesh, LARGE, seed=1), metadata=METADATA)
    while not store.unfinished_saves():
        time.sleep(0.01)
    print("saving 2", flush=True)
    time.sleep(600)  # the test kills this process here


if __name__ == "__main__":
    # Here, not at import: the test imports this module after JAX has started.
    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
