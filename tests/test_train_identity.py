"""A run's identity: fingerprints of what determines it, and its checkpoint directory.

The fingerprint tests build optax optimizers twice and compare, in one process and
across two. The lock tests run real processes: one holds the lock, another is
refused, and after a SIGKILL of the holder the lock is free again.
"""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import textwrap

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _checkpoint_worker import METADATA, small_state

from fnnet.train import (
    CheckpointDirectoryError,
    CheckpointError,
    CheckpointLockedError,
    CheckpointStore,
    DirectoryLock,
    check_checkpoint_dir,
    data_fingerprint,
    differences,
    fingerprint,
    load_metadata,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", **extra)


def _schedule(decay_steps: int):
    return optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, decay_steps)


# Optimizers whose fingerprints must be equal when built twice (by name, so the
# same table runs in a subprocess).
BUILDERS = {
    "adam": "optax.adam(1e-3)",
    "sgd": "optax.sgd(1e-2, momentum=0.9)",
    "clipped": "optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))",
    "adamw": "optax.adamw(1e-3, weight_decay=1e-4)",
    "scheduled": "optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100))",
    "injected": "optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)",
}

# (name, checkpoint's, now, words the one line must hold)
DIFFERENT = [
    ("learning rate", optax.adam(1e-3), optax.adam(1e-2), "step_size: -0.001"),
    ("adam or sgd", optax.adam(1e-3), optax.sgd(1e-3), "scale_by_adam in the checkpoint"),
    (
        "clip",
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
        optax.chain(optax.clip_by_global_norm(2.0), optax.adam(1e-3)),
        "clip_by_global_norm > max_norm: 1.0 in the checkpoint, 2.0 now",
    ),
    (
        "weight decay",
        optax.adamw(1e-3, weight_decay=1e-4),
        optax.adamw(1e-3, weight_decay=1e-2),
        "add_decayed_weights > weight_decay: 0.0001 in the checkpoint, 0.01 now",
    ),
    (
        "decay steps",
        optax.adam(_schedule(100)),
        optax.adam(_schedule(200)),
        "cosine_decay_schedule > decay_steps: 90 in the checkpoint, 190 now",
    ),
    (
        "injected learning rate",
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
        "inject_hyperparams > numeric_hps > learning_rate: 0.001 in the checkpoint, 0.01 now",
    ),
    (
        "lambda schedule",
        optax.adam(lambda step: 1e-3),
        optax.adam(lambda step: 1e-2),
        "<lambda> > constants: [0.001] in the checkpoint, [0.01] now",
    ),
]


@pytest.mark.parametrize("name", BUILDERS)
def test_an_optimizer_built_twice_has_one_fingerprint(name):
    first, second = (fingerprint(eval(BUILDERS[name])) for _ in range(2))
    assert first == second
    assert differences(first, second) == []
    assert json.loads(json.dumps(first, allow_nan=False)) == first  # strict JSON, round trip
    text = json.dumps(first)
    assert not re.search(r"0x[0-9a-f]{6,}", text), "an address leaked into the fingerprint"
    assert len(text) < 6000, f"{name}'s fingerprint is {len(text)} characters"


def test_fingerprints_are_the_same_in_another_process():
    program = textwrap.dedent(
        f"""
        import json, optax
        from fnnet.train import fingerprint
        builders = {BUILDERS!r}
        print(json.dumps({{n: fingerprint(eval(b)) for n, b in builders.items()}}))
        """
    )
    # Another hash seed: nothing may depend on the order of a set or a dict of strings.
    out = subprocess.run(
        [sys.executable, "-c", program],
        env=_env(PYTHONHASHSEED="12345"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    theirs = json.loads(out)
    for name, builder in BUILDERS.items():
        assert theirs[name] == fingerprint(eval(builder)), name


@pytest.mark.parametrize("case", DIFFERENT, ids=[c[0] for c in DIFFERENT])
def test_differences_say_what_changed_in_one_line(case):
    _, old, new, words = case
    assert fingerprint(old) != fingerprint(new)
    lines = differences({"optimizer": fingerprint(old)}, {"optimizer": fingerprint(new)})
    assert len(lines) == 1, lines
    assert lines[0].startswith("optimizer: "), lines
    assert words in lines[0], lines


def test_differences_read_as_the_optimizer_was_built():
    lines = differences(fingerprint(optax.adam(1e-3)), fingerprint(optax.adam(1e-2)))
    assert lines == ["chain[1] > scale > step_size: -0.001 in the checkpoint, -0.01 now"]
    lines = differences(
        {"optimizer": fingerprint(optax.adam(1e-3))},
        {"optimizer": fingerprint(optax.adam(1e-2))},
        old_label="before",
        new_label="after",
    )
    assert lines == ["optimizer: chain[1] > scale > step_size: -0.001 before, -0.01 after"]


def test_a_schedule_is_walked_like_an_optimizer():
    old, new = fingerprint(_schedule(100)), fingerprint(_schedule(200))
    assert differences(old, new) == [
        "join_schedules[1] > cosine_decay_schedule > decay_steps: 90 in the checkpoint, 190 now"
    ]


def test_repeated_subtrees_are_written_once_and_still_compared():
    described = fingerprint(optax.adam(1e-3))
    assert '"same_as"' in json.dumps(described)  # optax closes over each init twice
    # Only the repeat differs: the marker is expanded before comparing.
    repeat = described["fields"]["update"]["closure"]["update_fns"][0]["closure"]["tx"]
    assert repeat["fields"]["init"]["type"] == "same_as"
    changed = json.loads(json.dumps(described))
    changed["fields"]["update"]["closure"]["update_fns"][0]["closure"]["tx"]["fields"]["init"] = {
        "type": "function",
        "name": "somewhere.else",
    }
    assert differences({"optimizer": described}, {"optimizer": changed}) == [
        "optimizer: chain[0]: scale_by_adam in the checkpoint, else now"
    ]


def test_cycles_and_depth_are_guarded():
    def make_recursive():
        def countdown(n):
            return 0 if n == 0 else countdown(n - 1)

        return countdown

    described = fingerprint(make_recursive())
    assert described["closure"]["countdown"]["type"] == "cycle"
    loop: list = [1]
    loop.append(loop)
    assert fingerprint(loop)[1]["type"] == "cycle"
    deep: list = []
    for _ in range(100):
        deep = [deep]
    text = json.dumps(fingerprint(deep, max_depth=5))
    assert '"truncated"' in text and text.count("[") < 10
    with pytest.raises(ValueError, match="max_depth must be a positive integer, got 0"):
        fingerprint([], max_depth=0)


def test_values_arrays_and_objects():
    class Opaque:
        pass

    described = fingerprint(
        {
            "numbers": (1, 2.5, True, None, "s", float("nan")),
            "small": np.arange(3, dtype=np.float32),
            "large": jnp.zeros((600, 600), jnp.float32),
            "thing": Opaque(),
            "dtype": np.dtype("float16"),
            1: "a key that is not a string",
        }
    )
    json.dumps(described, allow_nan=False)
    items = dict((json.dumps(k), v) for k, v in described["items"])  # an int key: "dict"
    assert items['"numbers"'] == [1, 2.5, True, None, "s", {"type": "float", "value": "nan"}]
    small = items['"small"']
    assert (small["shape"], small["dtype"], small["value"]) == ([3], "float32", [0.0, 1.0, 2.0])
    assert isinstance(small["crc32"], int)
    assert "crc32" not in items['"large"'], "a large array is not read back to checksum it"
    assert items['"thing"'] == {"type": "object", "name": f"{__name__}.{Opaque.__qualname__}"}
    assert items['"dtype"'] == {"type": "dtype", "name": "float16"}
    other = fingerprint(np.array([0.0, 1.0, 3.0], np.float32))
    assert differences(small, other) == [
        "float32[3] [0.0, 1.0, 2.0] in the checkpoint, float32[3] [0.0, 1.0, 3.0] now"
    ]
    # Numpy and JAX arrays of the same values describe alike.
    assert fingerprint(np.ones(4, np.int32)) == fingerprint(jnp.ones(4, jnp.int32))


def test_a_dataclass_config_is_described_by_its_fields():
    @dataclasses.dataclass
    class Config:
        width: int
        activation: str = "relu"

    assert fingerprint(Config(64))["fields"] == {"activation": "relu", "width": 64}
    assert differences(fingerprint(Config(64)), fingerprint(Config(128))) == [
        "width: 64 in the checkpoint, 128 now"
    ]


def test_differences_of_plain_dicts_name_missing_keys():
    old = {"model": {"width": 64, "depth": 2}}
    new = {"model": {"width": 128, "heads": 4, "depth": 2}}
    assert differences(fingerprint(old), fingerprint(new)) == [
        "model: width: 64 in the checkpoint, 128 now",
        "model: heads: absent in the checkpoint, 4 now",
    ]
    assert differences({"a": [1, 2]}, {"a": [1, 2, 3]}) == [
        "a: [1, 2] in the checkpoint, [1, 2, 3] now"
    ]


# Data.


def test_data_fingerprint_records_shapes_dtypes_and_the_ends():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 3)).astype(np.float32)
    y = rng.integers(0, 3, 100).astype(np.int32)
    described = data_fingerprint((x, {"labels": y}))
    assert list(described) == ["0", "1/labels"]
    assert described["0"]["shape"] == [100, 3] and described["0"]["dtype"] == "float32"
    assert {"first_crc32", "last_crc32"} <= described["1/labels"].keys()
    assert json.loads(json.dumps(described)) == described
    assert data_fingerprint((x, {"labels": y})) == described

    shuffled = data_fingerprint((x[::-1], {"labels": y[::-1]}))
    assert shuffled != described
    lines = differences({"data": described}, {"data": shuffled})
    assert lines[0].startswith("data: 0 > first_crc32: "), lines

    fewer = data_fingerprint((x[:50], {"labels": y[:50]}), examples=False)
    assert "first_crc32" not in fewer["0"]
    assert differences(described, fewer)[0] == "0: shape: [100, 3] in the checkpoint, [50, 3] now"

    on_device = data_fingerprint(jnp.asarray(x))
    assert on_device == {"(root)": {"shape": [100, 3], "dtype": "float32"}}


# The checkpoint directory.


def test_check_creates_missing_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = check_checkpoint_dir("runs/a/b")
    assert made == tmp_path / "runs" / "a" / "b" and made.is_absolute() and made.is_dir()
    assert list(made.iterdir()) == [], "the write check leaves nothing behind"
    assert check_checkpoint_dir(made) == made  # an existing one is fine


def test_check_refuses_a_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("not a directory")
    with pytest.raises(CheckpointDirectoryError, match=r"checkpoint_dir=.*model\.ckpt.* is a file"):
        check_checkpoint_dir(path)
    with pytest.raises(CheckpointDirectoryError) as info:
        check_checkpoint_dir(path / "sub" / "dir", argument="save_to")
    assert str(info.value).startswith("save_to=")
    assert f"{path} is a file, not a directory" in str(info.value)
    assert isinstance(info.value, CheckpointError)


def test_check_refuses_odd_paths(tmp_path):
    with pytest.raises(CheckpointDirectoryError, match="checkpoint_dir='' is empty"):
        check_checkpoint_dir("")
    with pytest.raises(TypeError, match="checkpoint_dir must be a directory path.*got int 3"):
        check_checkpoint_dir(3)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointDirectoryError, match="symbolic link to .*gone"):
        check_checkpoint_dir(link)


def test_a_url_stays_a_url_and_a_missing_package_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gcsfs" else real_find_spec(name, *a),
    )
    with pytest.raises(
        CheckpointDirectoryError, match=r"needs the package gcsfs .*pip install gcsfs"
    ):
        check_checkpoint_dir("gs://bucket/run")
    with pytest.raises(CheckpointDirectoryError, match=r"CheckpointStore\('gs://b/x'\).*gcsfs"):
        CheckpointStore("gs://b/x")
    with pytest.raises(CheckpointDirectoryError, match=r"scheme ftp://.*not support"):
        CheckpointStore("ftp://host/run")
    # With the package there, the directory is the bucket's URL, not a local folder.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    store = CheckpointStore("gs://b/x")
    assert str(store.directory) == "gs://b/x" and str(store.directory / "3") == "gs://b/x/3"
    assert not any(tmp_path.iterdir())  # no folder named gs: appeared


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_check_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(CheckpointDirectoryError, match="not writable .*Permission denied"):
            check_checkpoint_dir(locked)
        with pytest.raises(CheckpointDirectoryError, match="cannot create the directory"):
            check_checkpoint_dir(locked / "inside")
    finally:
        locked.chmod(0o755)


def test_check_reports_the_reason_a_directory_is_not_writable(tmp_path, monkeypatch):
    # The same path as a read-only directory, for the suite run as root.
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(CheckpointDirectoryError) as info:
        check_checkpoint_dir(tmp_path, argument="checkpoint_dir")
    message = str(info.value)
    assert message.startswith(f"checkpoint_dir={str(tmp_path)!r}")
    assert "not writable (Permission denied)" in message


# The lock.


HOLDER = textwrap.dedent(
    """
    import sys, time
    from fnnet.train import DirectoryLock
    DirectoryLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(300)
    """
)


def test_a_lock_held_by_another_process_is_refused_until_it_is_killed(tmp_path):
    with open(tmp_path / "stderr.txt", "w") as stderr:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=_env(),
        )
    try:
        line = holder.stdout.readline()  # the child's stdout: blocks until it holds the lock
        assert line == "locked\n", (tmp_path / "stderr.txt").read_text()
        with pytest.raises(CheckpointLockedError) as info:
            DirectoryLock(tmp_path).acquire()
        error = info.value
        assert (error.pid, error.directory) == (holder.pid, tmp_path)
        assert error.host and error.started
        message = str(error)
        assert f"process {holder.pid} on host {error.host}" in message
        assert str(tmp_path) in message and "another checkpoint_dir" in message
        assert "Wait for that run to finish" in message

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with DirectoryLock(tmp_path) as lock:  # no stale lock after a SIGKILL
            assert lock.held
            recorded = json.loads((tmp_path / ".fnnet-lock").read_text())
            assert recorded["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL


def test_two_locks_in_one_process_conflict(tmp_path):
    lock = DirectoryLock(tmp_path)
    with lock:
        with pytest.raises(CheckpointLockedError, match="this process"):
            DirectoryLock(tmp_path).acquire()
        with pytest.raises(RuntimeError, match="already held"):
            lock.acquire()
    assert not lock.held
    assert (tmp_path / ".fnnet-lock").read_text() == "", "released: no holder recorded"
    lock.release()  # releasing twice does nothing
    with DirectoryLock(tmp_path):
        pass


def test_a_lock_needs_its_directory(tmp_path):
    with pytest.raises(CheckpointDirectoryError, match="cannot open the lock file .*missing"):
        DirectoryLock(tmp_path / "missing").acquire()


def test_an_unreadable_lock_file_still_names_the_directory(tmp_path):
    with DirectoryLock(tmp_path):
        (tmp_path / ".fnnet-lock").write_text("garbage")
        with pytest.raises(CheckpointLockedError) as info:
            DirectoryLock(tmp_path).acquire()
    assert info.value.pid is None
    assert f"{tmp_path} is in use by a process that has not recorded itself" in str(info.value)


def test_checkpoints_beside_the_lock_file_list_prune_and_restore(tmp_path):
    manager = CheckpointStore(tmp_path, keep=2)
    with DirectoryLock(tmp_path):
        for step in (1, 2, 3):
            manager.save(step, small_state(step), metadata=METADATA)
        assert manager.steps() == [2, 3]
        _, record = manager.restore(target=small_state(0))
        assert record["step"] == 3
        assert load_metadata(tmp_path)["step"] == 3
        assert (tmp_path / ".fnnet-lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fnnet-lock", "2", "3"]
    assert manager.steps() == [2, 3]
