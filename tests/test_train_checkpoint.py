"""Checkpoints: round trips, retention, refusals, damage and a save killed midway.

Every test writes real files under ``tmp_path``; the kill tests run a real
process (``_checkpoint_worker.py``) and SIGKILL it while it saves.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _checkpoint_worker import METADATA, small_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fnnet.train import _digest as digest_lib
from fnnet.train._checkpoint import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointMismatchError,
    CheckpointStore,
    CheckpointWarning,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    load_metadata,
)
from fnnet.train._state import TrainState as State

WORKER = pathlib.Path(__file__).with_name("_checkpoint_worker.py")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def make_state(seed: int = 0, step: int = 3) -> State:
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {
            "dense": {
                "w": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
                "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
            },
            "emb": jnp.asarray(rng.standard_normal((6, 2)), jnp.bfloat16),
        },
        "head": {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)},
    }
    adam, empty = optax.adam(1e-2).init(params)  # (ScaleByAdamState, EmptyState)
    # Moments as after some steps (optax's update needs looser dtype promotion than
    # the test suite allows).
    adam = adam._replace(
        count=jnp.int32(step),
        mu=jax.tree.map(lambda p: 0.1 * p, params),
        nu=jax.tree.map(lambda p: p * p, params),
    )
    opt_state = (adam, empty)
    model_state = {
        "norm": {"mean": jnp.zeros(4), "var": jnp.ones(4), "empty": jnp.zeros((0, 3))},
        "history": [jnp.arange(3), jnp.full(2, True)],
        "unused": None,
    }
    return State(
        params=params,
        opt_state=opt_state,
        model_state=model_state,
        step=jnp.int32(step),
        key=jax.random.key(seed, impl="threefry2x32"),
        data_key=jax.random.split(jax.random.key(seed + 1, impl="rbg"), 2),
        nonfinite_step=jnp.int32(-1),
        nonfinite_what=jnp.int32(0),
    )


def assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        where = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, where
        assert a.shape == b.shape, where
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(a) == jax.random.key_impl(b), where
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file under ``directory`` with a hash of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """Orbax's data files of a step, largest first."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


# Round trips.


def test_round_trip_of_a_training_state(tmp_path):
    state = make_state()
    manager = CheckpointStore(tmp_path / "ckpt")
    meta = {"model": {"name": "mlp", "sizes": [5, 4, 3]}, "optimizer": {"name": "adam"}}
    manager.save(3, state, metadata=meta, metrics={"loss": 0.25, "accuracy": np.float32(0.5)})

    restored, record = manager.restore(target=state)
    assert_bitwise_equal(restored, state)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(restored))

    # An abstract target from eval_shape works the same.
    abstract = jax.eval_shape(lambda: state)
    restored, _ = manager.restore(3, target=abstract)
    assert_bitwise_equal(restored, state)

    # Without a target the record rebuilds the structure, NamedTuples included
    # (State, optax's ScaleByAdamState and EmptyState are all imported here).
    restored, _ = manager.restore()
    assert_bitwise_equal(restored, state)
    assert type(restored) is State

    assert record["model"] == meta["model"] and record["optimizer"] == meta["optimizer"]
    assert record["step"] == 3
    assert record["metrics"] == {"loss": 0.25, "accuracy": 0.5}
    assert {"fnnet", "jax", "orbax-checkpoint"} <= record["versions"].keys()
    spec = {entry["path"]: entry for entry in record["spec"]}
    assert spec["params/encoder/dense/w"]["shape"] == [5, 4]
    assert spec["params/encoder/emb"]["dtype"] == "bfloat16"
    assert spec["opt_state/0/mu/head/w"]["dtype"] == "float32"
    assert spec["key"]["prng_impl"] == "threefry2x32" and spec["key"]["dtype"] == "key<fry>"
    assert spec["data_key"]["prng_impl"] == "rbg" and spec["data_key"]["shape"] == [2]
    assert spec["model_state/norm/empty"]["shape"] == [0, 3]
    assert load_metadata(tmp_path / "ckpt") == record
    assert load_metadata(tmp_path / "ckpt", 3) == record
    # The record is plain JSON next to the arrays.
    on_disk = json.loads((tmp_path / "ckpt" / "3" / "metadata" / "metadata.json").read_text())
    assert on_disk == record


def test_a_relative_directory_works_and_stays_where_it_was_made(tmp_path, monkeypatch):
    # orbax refuses relative paths; the manager makes its directory absolute at once,
    # so a later change of working directory does not move the checkpoints either.
    monkeypatch.chdir(tmp_path)
    state = make_state()
    manager = CheckpointStore("runs/ckpt")
    monkeypatch.chdir("/")
    manager.save(1, state, metadata={})
    restored, _ = manager.restore(target=state)
    assert_bitwise_equal(restored, state)
    assert (tmp_path / "runs" / "ckpt" / "1").is_dir()


def test_keep_retains_the_newest_and_the_best(tmp_path):
    manager = CheckpointStore(tmp_path, keep=2, best_metric="accuracy", best_mode="max")
    accuracies = {1: 0.1, 2: 0.9, 3: 0.3, 4: float("nan"), 5: 0.2}
    for step, accuracy in accuracies.items():
        manager.save(step, small_state(step), metadata=METADATA, metrics={"accuracy": accuracy})
    assert manager.steps() == [2, 4, 5]
    assert manager.best_step() == 2 and manager.latest_step() == 5
    assert load_metadata(tmp_path, 4)["metrics"] == {"accuracy": None}  # JSON has no NaN
    restored, record = manager.restore(manager.best_step(), target=small_state(0))
    assert_bitwise_equal(restored, small_state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4", "5"]
    # A store opened later (a resumed run) still knows which step is the best.
    reopened = CheckpointStore(tmp_path, keep=2, best_metric="accuracy", best_mode="max")
    reopened.save(6, small_state(6), metadata=METADATA, metrics={"accuracy": 0.5})
    assert reopened.steps() == [2, 5, 6]

    lowest = CheckpointStore(tmp_path / "min", keep=1, best_metric="loss", best_mode="min")
    for step, loss in {1: 0.5, 2: 0.1, 3: 0.7}.items():
        lowest.save(step, small_state(step), metadata={}, metrics={"loss": loss})
    assert lowest.steps() == [2, 3]


# Refusals.


def test_target_mismatch_lists_every_path(tmp_path):
    manager = CheckpointStore(tmp_path)
    manager.save(1, small_state(1), metadata=METADATA)
    target = small_state(1)
    target["params"]["dense"]["w"] = jnp.zeros((4, 5), jnp.float32)  # wrong shape
    target["params"]["dense"]["b"] = jnp.zeros(3, jnp.bfloat16)  # wrong dtype
    target["params"]["extra"] = jnp.zeros(2)  # not saved
    del target["step"]  # saved, not wanted
    target["key"] = jax.random.key(0, impl="rbg")  # another key implementation
    with pytest.raises(CheckpointMismatchError) as info:
        manager.restore(target=target)
    message = str(info.value)
    assert str(tmp_path / "1") in message and "5 differences" in message
    assert "params/dense/w: checkpoint has float32[4,3], target wants float32[4,5]" in message
    assert "params/dense/b: checkpoint has float32[3], target wants bfloat16[3]" in message
    assert "missing from the checkpoint: params/extra (float32[2])" in message
    assert "not in the target: step (int32[])" in message
    assert "key: checkpoint has key<fry>[], target wants key<rbg>[]" in message
    assert len(info.value.problems) == 5


def test_non_finite_state_is_never_written(tmp_path):
    manager = CheckpointStore(tmp_path)
    state = small_state(1)
    state["params"]["dense"]["b"] = state["params"]["dense"]["b"].at[0].set(jnp.inf)
    state["params"]["dense"]["w"] = state["params"]["dense"]["w"].at[1, 2].set(jnp.nan)
    with pytest.raises(NonFiniteCheckpointError, match=r"step 4: leaf 'params/dense/b'") as info:
        manager.save(4, state, metadata=METADATA)
    assert info.value.step == 4 and info.value.path == "params/dense/b"
    assert "0 NaN and 1 infinite" in str(info.value)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
    assert manager.steps() == []


def test_an_intact_step_is_never_overwritten(tmp_path):
    manager = CheckpointStore(tmp_path)
    manager.save(1, small_state(1), metadata=METADATA)
    manager.wait()  # the save runs in the background until committed
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointExistsError, match="step 1 already exists"):
        manager.save(1, small_state(2), metadata=METADATA)
    assert snapshot(tmp_path) == before


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointStore(tmp_path, best_mode="mean")
    manager = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="non-negative"):
        manager.save(-1, small_state(1), metadata={})
    with pytest.raises(TypeError, match="JSON-able"):
        manager.save(1, small_state(1), metadata={"optimizer": optax.adam(1e-3)})
    with pytest.raises(ValueError, match="may not use the keys"):
        manager.save(1, small_state(1), metadata={"spec": "mine"})
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        manager.restore()
    with pytest.raises(CheckpointError, match="no checkpoint of step 9"):
        manager.restore(9)


# Damage.


def _truncate_array(step_dir):
    biggest = array_files(step_dir)[0]
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)


def _delete_array(step_dir):
    array_files(step_dir)[0].unlink()


def _flip_array_bytes(step_dir):
    biggest = array_files(step_dir)[0]
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    biggest.write_bytes(bytes(data))


def _garble_record(step_dir):
    path = step_dir / "metadata" / "metadata.json"
    path.write_text(path.read_text()[:40])


def _delete_record(step_dir):
    (step_dir / "metadata" / "metadata.json").unlink()


def _remove_commit_marker(step_dir):
    (step_dir / "commit_success.txt").unlink()


def _fifo_record(step_dir):  # a read would block forever
    path = step_dir / "metadata" / "metadata.json"
    path.unlink()
    os.mkfifo(path)


def _deeply_nested_record(step_dir):
    (step_dir / "metadata" / "metadata.json").write_text("[" * 100_000 + "]" * 100_000)


def _huge_integer_record(step_dir):  # past Python's 4300-digit limit for int()
    (step_dir / "metadata" / "metadata.json").write_text("7" * 5000)


def _wrong_typed_record(step_dir):
    path = step_dir / "metadata" / "metadata.json"
    record = json.loads(path.read_text())
    record["spec"] = "not a list"
    path.write_text(json.dumps(record))


def _delete_array_index(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


# (damage, what the error says, whether `steps()` still lists the step: the cheap
# check sees structure only, array contents are checked when read).
DAMAGE = {
    "truncated array file": (_truncate_array, r"cannot read the arrays of step 2 from .*state", 1),
    "deleted array file": (_delete_array, r"cannot read the arrays of step 2 from .*state", 1),
    "flipped bytes": (_flip_array_bytes, r"array 'params/w' in .*state does not match its", 1),
    "garbled record": (_garble_record, r"record .*2/metadata/metadata.json is not readable", 0),
    "deleted record": (_delete_record, r"record .*2/metadata/metadata.json is missing", 0),
    "no commit marker": (_remove_commit_marker, r"2 has no commit marker commit_success", 0),
    "no array index": (_delete_array_index, r"array index .*2/state/_METADATA is missing", 0),
    "record a FIFO": (_fifo_record, r"record .*metadata.json is not a regular file", 0),
    "deeply nested record": (_deeply_nested_record, r"metadata.json is not readable JSON", 0),
    "5000-digit integer": (_huge_integer_record, r"metadata.json is not readable JSON", 0),
    "wrong-typed field": (_wrong_typed_record, r"metadata.json does not match its checksum", 0),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_detected_and_skipped(tmp_path, damage):
    corrupt, message, still_listed = DAMAGE[damage]
    manager = CheckpointStore(tmp_path)
    manager.save(1, small_state(1), metadata=METADATA)
    rng = np.random.default_rng(0)
    big = {"params": {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}}
    manager.save(2, big, metadata=METADATA)
    manager.wait()
    corrupt(tmp_path / "2")
    before = snapshot(tmp_path)

    assert manager.steps() == ([1, 2] if still_listed else [1])
    with pytest.raises(CorruptCheckpointError, match=message):
        manager.restore(2)
    with pytest.warns(CheckpointWarning, match="skipping damaged checkpoint of step 2"):
        restored, record = manager.restore(target=small_state(0))
    assert record["step"] == 1
    assert_bitwise_equal(restored, small_state(1))
    assert snapshot(tmp_path) == before  # a failed restore changes nothing

    # A run that fell back to step 1 reaches step 2 again: the damaged checkpoint is
    # moved aside, not overwritten or deleted.
    with pytest.warns(CheckpointWarning, match="moved the damaged checkpoint"):
        manager.save(2, small_state(2), metadata=METADATA)
    assert (tmp_path / "2.damaged").is_dir()
    assert_bitwise_equal(manager.restore(2, target=small_state(0))[0], small_state(2))


def test_only_damaged_checkpoints_is_an_error(tmp_path):
    manager = CheckpointStore(tmp_path)
    manager.save(1, small_state(1), metadata=METADATA)
    manager.wait()
    _garble_record(tmp_path / "1")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="skipped step 1"):
        manager.restore()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no intact"):
        load_metadata(tmp_path)


def test_temporary_directories_are_ignored(tmp_path):
    manager = CheckpointStore(tmp_path)
    manager.save(1, small_state(1), metadata=METADATA)
    manager.wait()
    leftover = tmp_path / f"2{TMP_SUFFIX}"
    shutil.copytree(tmp_path / "1", leftover)  # complete-looking, but never committed
    assert manager.steps() == [1]
    assert manager.restore(target=small_state(0))[1]["step"] == 1
    manager.save(2, small_state(2), metadata=METADATA)  # orbax replaces its temporary
    manager.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


# A save killed midway.


@pytest.mark.parametrize("mode", ["large", "hang"])
def test_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, mode):
    directory = tmp_path / "ckpt"
    out = tmp_path / "stdout.txt"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(out, "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), str(directory), mode],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    try:
        # "large": kill once save() has returned and the ~200 MB are being written in
        # the background (async). "hang": kill at the commit, after every file.
        ready = (
            (
                lambda: (
                    "saving 2 in the background" in out.read_text()
                    and (directory / f"2{TMP_SUFFIX}").exists()
                )
            )
            if mode == "large"
            else (lambda: "committing" in out.read_text())
        )
        deadline = time.monotonic() + 60
        while not ready():
            if worker.poll() is not None:
                pytest.fail(f"worker exited early:\n{(tmp_path / 'stderr.txt').read_text()}")
            assert time.monotonic() < deadline, "worker never started saving step 2"
            time.sleep(0.002)
        worker.send_signal(signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert "saved 2" not in out.read_text()
    assert not (directory / "2").exists(), "the save finished before the kill"
    assert (directory / f"2{TMP_SUFFIX}").is_dir()

    manager = CheckpointStore(directory)
    assert manager.steps() == [1]
    restored, record = manager.restore(target=small_state(0))  # no warning: nothing damaged
    assert record["step"] == 1
    assert_bitwise_equal(restored, small_state(1))

    manager.save(2, small_state(2), metadata=METADATA)
    assert manager.steps() == [1, 2]
    assert not (directory / f"2{TMP_SUFFIX}").exists()
    assert_bitwise_equal(manager.restore(target=small_state(0))[0], small_state(2))


def test_a_step_linked_from_outside_the_directory_is_refused(tmp_path):
    outside = CheckpointStore(tmp_path / "other")
    outside.save(5, small_state(5), metadata=METADATA)
    manager = CheckpointStore(tmp_path / "run")
    manager.save(1, small_state(1), metadata=METADATA)
    (tmp_path / "run" / "5").symlink_to(tmp_path / "other" / "5")
    assert manager.steps() == [1]
    with pytest.raises(CorruptCheckpointError, match="symbolic link out of the checkpoint"):
        manager.restore(5)
    with pytest.warns(CheckpointWarning, match="skipping damaged checkpoint of step 5"):
        _, record = manager.restore(target=small_state(0))
    assert record["step"] == 1


def test_a_record_of_an_older_format_says_another_version_wrote_it(tmp_path):
    manager = CheckpointStore(tmp_path)
    manager.save(1, small_state(1), metadata=METADATA)
    manager.wait()
    path = tmp_path / "1" / "metadata" / "metadata.json"
    record = json.loads(path.read_text())
    del record["record_crc32"]
    record["format"] = "fnnet-checkpoint-2"  # whole-array CRC-32s, written from the host
    path.write_text(json.dumps(record))
    with pytest.raises(CorruptCheckpointError, match="written by another version of fnnet"):
        manager.restore(1)


# The digest a checkpoint verifies its arrays by.


def test_the_digest_is_the_same_on_the_host_on_one_device_and_on_any_sharding():
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((8, 6)).astype(np.float32),
        rng.standard_normal(16).astype(jnp.bfloat16),
        np.array([True, False, True, True]),
        np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
        np.uint32(7),
        np.zeros((0, 3), np.float32),
        np.arange(5, dtype=np.int64),  # 64 bits: two words per element, host only
    ]
    on_host = digest_lib.survey(arrays)
    assert digest_lib.survey([jnp.asarray(a) for a in arrays[:-1]]) == on_host[:-1]
    split = [
        jax.device_put(arrays[0], NamedSharding(mesh, P("a", "b"))),
        jax.device_put(arrays[1], NamedSharding(mesh, P(("a", "b")))),
        jax.device_put(arrays[3], NamedSharding(mesh, P(None, "a"))),
    ]
    assert digest_lib.survey(split) == [on_host[0], on_host[1], on_host[3]]
    # Any one changed bit changes it, and so does moving a value to another place.
    for flip in ((0, 0), (3, 5), (7, 5)):
        changed = arrays[0].copy()
        changed.view(np.uint32)[flip] ^= 1 << 31
        assert digest_lib.survey([changed])[0][0] != on_host[0][0], flip
    swapped = arrays[0].copy()
    swapped[0, 0], swapped[0, 1] = arrays[0][0, 1], arrays[0][0, 0]
    assert digest_lib.survey([swapped])[0][0] != on_host[0][0]
    assert [counts for _, *counts in digest_lib.survey([np.float32([1.0, np.inf]), arrays[0]])] == [
        [0, 1],
        [0, 0],
    ]


def test_metadata_changed_after_save_does_not_change_what_is_written(tmp_path):
    # The record is written in the background; fit's history grows meanwhile.
    history = [{"step": 1}]
    manager = CheckpointStore(tmp_path)
    for step in range(1, 6):
        manager.save(step, small_state(step), metadata={"history": history})
        history.append({"step": step + 1})
    assert manager.steps() == [3, 4, 5]  # every record intact: none changed after its checksum
    assert load_metadata(tmp_path, 4)["history"] == [{"step": s} for s in range(1, 5)]
