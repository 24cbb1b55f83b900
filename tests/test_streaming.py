"""Training on batches streamed from the host: NpyBatches, sources, resume, and their errors."""

import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import fnnet
from fnnet import train

BATCH = 16
SEED = 3


def _problem(n=100):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    return x, y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("npy")
    x, y = _problem()
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return folder, (x, y)


def _fit(data, **kwargs):
    settings = {"steps": 14, "batch_size": BATCH, "seed": SEED, "progress": False, "mesh": None}
    return train.fit(
        fnnet.models.mlp(2, (16,)), optax.adam(1e-2), train.softmax_cross_entropy, data,
        **{**settings, **kwargs},
    )  # fmt: skip


def _leaves(result):
    return [np.asarray(a) for a in jax.tree.leaves((result.state.params, result.state.opt_state))]


def _batches(folder, **kwargs):
    return train.NpyBatches(folder / "x.npy", folder / "y.npy", batch_size=BATCH, **kwargs)


# --- The same training as in memory -------------------------------------------------------


def test_fit_on_npy_files_is_bitwise_fit_on_the_arrays(files):
    folder, data = files
    # 14 steps of 6 per epoch: three epochs, each shuffled, the last one cut short.
    memory, streamed = _fit(data), _fit(_batches(folder, seed=SEED))
    for a, b in zip(_leaves(memory), _leaves(streamed)):
        np.testing.assert_array_equal(a, b)
    assert [r["loss"] for r in memory.history] == [r["loss"] for r in streamed.history]
    assert int(streamed.state.step) == 14


def test_another_seed_of_the_reader_is_another_order(files):
    folder, _ = files
    one, other = _batches(folder, seed=SEED), _batches(folder, seed=SEED + 1)
    assert not np.array_equal(next(one)[1], next(other)[1]) or not np.array_equal(
        next(one)[0], next(other)[0]
    )


def test_on_the_mesh_it_matches_the_arrays(files):
    folder, data = files
    memory = _fit(data, mesh="auto", steps=8)
    streamed = _fit(_batches(folder, seed=SEED), mesh="auto", steps=8)
    for a, b in zip(_leaves(memory), _leaves(streamed)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    leaf = jax.tree.leaves(streamed.state.params)[0]
    assert len(leaf.sharding.device_set) == 8


def test_unshuffled_reader_reads_the_files_in_order(files):
    folder, (x, y) = files
    source = _batches(folder, shuffle=False)
    for step in range(8):  # 6 batches an epoch: the 4 last rows are dropped, then again
        bx, by = next(source)
        start = (step % 6) * BATCH
        np.testing.assert_array_equal(bx, x[start : start + BATCH])
        np.testing.assert_array_equal(by, y[start : start + BATCH])


def test_each_process_reads_its_share_of_every_batch(files):
    folder, _ = files
    whole = _batches(folder, seed=1)
    halves = [_batches(folder, seed=1, process_index=i, process_count=2) for i in range(2)]
    for _ in range(7):
        x, y = next(whole)
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(x, np.concatenate([p[0] for p in parts]))
        np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]))


def test_next_batches_stacks_what_next_gives(files):
    folder, _ = files
    one, many = (_batches(folder, seed=2, process_index=1, process_count=2) for _ in range(2))
    one.set_state({"step": 4})
    many.set_state({"step": 4})
    expected = [next(one) for _ in range(5)]  # steps 4 to 8: across the end of epoch 0
    x, y = many.next_batches(5)
    assert x.shape == (5, BATCH // 2, 6) and y.shape == (5, BATCH // 2)
    np.testing.assert_array_equal(x, np.stack([bx for bx, _ in expected]))
    np.testing.assert_array_equal(y, np.stack([by for _, by in expected]))
    assert many.get_state() == one.get_state() == {"step": 9}
    with pytest.raises(ValueError, match="next_batches: count must be a positive int, got 0"):
        many.next_batches(0)


class _Counted:
    """An NpyBatches that notes how it is read: ``"next"``, or the count of a
    ``next_batches``; ``cut`` drops the last rows of every chunk it gives."""

    def __init__(self, source, cut=0):
        self.source, self.cut, self.reads = source, cut, []
        self.batch_size = source.batch_size

    def __next__(self):
        self.reads.append("next")
        return next(self.source)

    def next_batches(self, count):
        self.reads.append(count)
        x, y = self.source.next_batches(count)
        rows = x.shape[1] - self.cut
        return x[:, :rows], y[:, :rows]

    def get_state(self):
        return self.source.get_state()

    def set_state(self, state):
        self.source.set_state(state)


def test_fit_reads_each_chunk_of_a_source_with_one_call(files):
    folder, data = files
    source = _Counted(_batches(folder, seed=SEED))
    streamed = _fit(source, steps=12, steps_per_call=4)
    # The first batch alone (fit learns the batches' shapes from it), then a call a chunk.
    assert source.reads == ["next", 3, 4, 4]
    memory = _fit(data, steps=12, steps_per_call=4)
    for a, b in zip(_leaves(memory), _leaves(streamed)):
        np.testing.assert_array_equal(a, b)


def test_a_chunk_of_the_wrong_size_names_its_steps(files):
    folder, _ = files
    # The first chunk: the first batch (whole), then next_batches(3) for steps 1 to 3.
    message = r"batches at steps 1 to 3 have 13 rows in \[0\] \(shape \(3, 13, 6\)\), expected 16"
    with pytest.raises(train.SourceError, match=message):
        _fit(_Counted(_batches(folder), cut=3), steps=8, steps_per_call=4)


def test_dict_inputs_come_from_one_file_each(tmp_path):
    x, y = _problem(40)
    lengths = np.arange(40, dtype=np.int32)
    for name, a in {"x": x, "lengths": lengths, "y": y}.items():
        np.save(tmp_path / f"{name}.npy", a)
    source = train.NpyBatches(
        {"x": tmp_path / "x.npy", "lengths": tmp_path / "lengths.npy"}, tmp_path / "y.npy",
        batch_size=8, shuffle=False,
    )  # fmt: skip
    source.set_state({"step": 2})
    bx, by = next(source)
    assert sorted(bx) == ["lengths", "x"]
    np.testing.assert_array_equal(bx["lengths"], lengths[16:24])
    np.testing.assert_array_equal(bx["x"], x[16:24])
    np.testing.assert_array_equal(by, y[16:24])


def test_the_readers_state_is_the_step_and_set_state_is_exact(files):
    folder, _ = files
    source = _batches(folder, seed=2)
    for _ in range(9):
        next(source)
    assert source.get_state() == {"step": 9}
    expected = next(source)
    other = _batches(folder, seed=2)
    other.set_state({"step": 9})
    got = next(other)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    with pytest.raises(ValueError, match="set_state"):
        other.set_state({"step": -1})


def test_make_fused_steps_on_a_source_equals_it_on_the_arrays(files):
    folder, data = files
    model = fnnet.models.mlp(2, (16,))
    step = train.make_train_step(model, optax.sgd(0.1), train.softmax_cross_entropy)

    def start():
        return train.init_state(model, optax.sgd(0.1), data[0][0], seed=SEED)

    memory = train.make_fused_steps(step, data, batch_size=BATCH, num_steps=4)
    streamed = train.make_fused_steps(step, _batches(folder, seed=SEED), batch_size=BATCH,
                                      num_steps=4)  # fmt: skip
    a, b = start(), start()
    for _ in range(3):  # 12 steps: across two epochs
        a, _ = memory(a)
        b, _ = streamed(b)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(u, v)
    # The third chunk was read ahead; the state is the one after the batches trained on.
    assert streamed.feed.consumed_state == {"step": 12}


def test_every_replica_trains_on_the_same_batches(files, threefry):
    folder, _ = files
    both = _fit(_batches(folder, seed=7), seed=[0, 1], steps=6)
    alone = _fit(_batches(folder, seed=7), seed=1, steps=6)
    for u, v in zip(jax.tree.leaves(both.state.params), jax.tree.leaves(alone.state.params)):
        np.testing.assert_array_equal(u[1], v)


# --- The device never holds the whole dataset -----------------------------------------------


def test_only_chunks_of_batches_reach_the_device(tmp_path, monkeypatch):
    n, steps, per_call = 4096, 12, 4
    x, y = _problem(n)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    rows_sent = []
    real_put = jax.device_put

    def counting_put(value, *args, **kwargs):
        for leaf in jax.tree.leaves(value):
            if np.ndim(leaf) >= 2 and np.shape(leaf)[-1] == 6:  # inputs: (..., 6)
                rows_sent.append(int(np.prod(np.shape(leaf)[:-1])))
        return real_put(value, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", counting_put)
    source = train.NpyBatches(tmp_path / "x.npy", tmp_path / "y.npy", batch_size=8, seed=0)
    result = _fit(source, steps=steps, batch_size=8, steps_per_call=per_call)
    assert int(result.state.step) == steps
    # Three chunks of 4 batches of 8 rows; none read ahead past the last step.
    assert rows_sent == [per_call * 8] * (steps // per_call)
    # The same probe sees the in-memory path move all 4,096 rows at once.
    rows_sent.clear()
    _fit((x, y), steps=steps, batch_size=8, steps_per_call=per_call)
    assert max(rows_sent) == n


# --- Checkpoints: the data's position is saved, and resumed ----------------------------------


def test_a_resumed_run_ends_as_an_unbroken_one(files, tmp_path):
    folder, _ = files
    unbroken = _fit(_batches(folder, seed=SEED), steps=16)
    # 9 steps: a checkpoint in the middle of the second epoch.
    first = _fit(_batches(folder, seed=SEED), steps=9, checkpoint=tmp_path / "run")
    saved = train.load_metadata(tmp_path / "run")["loop"]["data"]
    assert saved == {"step": 9, "states": [{"step": 9}]}
    resumed = _fit(_batches(folder, seed=SEED), steps=16, checkpoint=tmp_path / "run")
    assert first.resumed_from is None and resumed.resumed_from == 9
    for a, b in zip(_leaves(unbroken), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_resuming_on_other_data_is_refused(tmp_path):
    x, y = _problem()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    _fit(_batches(tmp_path), steps=3, checkpoint=tmp_path / "run")
    np.save(tmp_path / "y.npy", 1 - y)  # the same shape and dtype, other labels
    with pytest.raises(train.ResumeError, match="data"):
        _fit(_batches(tmp_path), steps=6, checkpoint=tmp_path / "run")
    np.save(tmp_path / "y.npy", y)
    with pytest.raises(train.ResumeError, match="seed"):
        _fit(_batches(tmp_path, seed=9), steps=6, checkpoint=tmp_path / "run")


STREAM_WORKER = pathlib.Path(__file__).with_name("_stream_worker.py")


def test_a_run_killed_mid_epoch_resumes_bitwise(tmp_path):
    def command(run):
        return [sys.executable, str(STREAM_WORKER), str(tmp_path), str(tmp_path / run),
                str(tmp_path / f"{run}.npz")]  # fmt: skip

    subprocess.run(command("unbroken"), check=True, timeout=120)
    proc = subprocess.Popen([*command("killed"), "--slow"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    manager = train.CheckpointStore(tmp_path / "killed")
    deadline = time.time() + 90
    while not manager.steps():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(command("killed"), check=True, timeout=120)
    unbroken, resumed = np.load(tmp_path / "unbroken.npz"), np.load(tmp_path / "killed.npz")
    assert int(resumed["resumed"]) in (5, 10, 15, 20, 25)  # mid-epoch: 6 steps an epoch
    assert int(unbroken["resumed"]) == -1
    arrays = [k for k in unbroken.files if k != "resumed"]
    assert arrays
    for k in arrays:
        np.testing.assert_array_equal(unbroken[k], resumed[k])


# --- Errors, before any work where they can be ----------------------------------------------


def test_reader_errors_name_the_file(tmp_path):
    x, y = _problem()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "short.npy", y[:50])
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    np.savez(tmp_path / "both.npz", x=x)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-10])
    cases = {
        "missing.npy": (FileNotFoundError, "does not exist"),
        "both.npz": (ValueError, "is not a .npy file"),
        "cut.npy": (ValueError, "is truncated"),
        "words.npy": (ValueError, "holds <U1"),
    }
    for name, (kind, message) in cases.items():
        path = tmp_path / name
        with pytest.raises(kind, match=message) as caught:
            train.NpyBatches(path, tmp_path / "y.npy", batch_size=BATCH)
        assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match="row counts differ") as caught:
        train.NpyBatches(tmp_path / "x.npy", tmp_path / "short.npy", batch_size=BATCH)
    assert "short.npy' (50)" in str(caught.value) and "x.npy' (100)" in str(caught.value)


def _generator(batches):
    yield from batches


def test_a_source_without_state_is_refused_with_a_checkpoint(tmp_path):
    x, y = _problem()
    source = _generator([(x[:BATCH], y[:BATCH])] * 20)
    with pytest.raises(TypeError, match="train_data .*get_state"):
        _fit(source, checkpoint=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was written
    assert next(source)[0].shape == (BATCH, 6)  # nothing was read either


def test_a_batch_of_the_wrong_size_names_its_step():
    x, y = _problem()
    batches = [(x[:BATCH], y[:BATCH])] * 5 + [(x[:7], y[:7])]
    with pytest.raises(train.SourceError, match="batch at step 5 has 7 rows"):
        _fit(_generator(batches), steps=8, steps_per_call=2)


def test_a_source_that_ends_early_names_the_step():
    x, y = _problem()
    result = _fit(_generator([(x[:BATCH], y[:BATCH])] * 8), steps=8, steps_per_call=4)
    assert int(result.state.step) == 8  # exactly enough batches is enough
    with pytest.raises(train.SourceError, match="ended after 7 batches, at step 7"):
        _fit(_generator([(x[:BATCH], y[:BATCH])] * 7), steps=8, steps_per_call=4)


def test_a_source_of_another_batch_size_is_refused(files):
    folder, _ = files
    with pytest.raises(ValueError, match="batch_size=8, but train_data yields batches of 16"):
        _fit(_batches(folder), batch_size=8)


def test_make_sharded_steps_on_a_source_splits_each_chunk_over_the_mesh(files):
    from fnnet import distributed

    folder, data = files
    mesh = distributed.mesh_from_spec("data")
    model = fnnet.models.mlp(2, (16,))
    step = train.make_train_step(model, optax.sgd(0.1), train.softmax_cross_entropy)
    start = train.init_state(model, optax.sgd(0.1), data[0][0], seed=SEED)
    memory = distributed.make_sharded_steps(step, data, mesh, batch_size=BATCH, num_steps=4)
    streamed = distributed.make_sharded_steps(step, _batches(folder, seed=SEED), mesh,
                                              batch_size=BATCH, num_steps=4)  # fmt: skip
    a = b = distributed.shard_state(start, mesh)
    for _ in range(2):
        a, _ = memory(a)
        b, _ = streamed(b)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6)
    ahead = streamed.feed._ahead[1]  # the third chunk, read while the second ran
    assert ahead[0].shape == (4, BATCH, 6)
    assert ahead[0].sharding.spec == jax.sharding.PartitionSpec(None, "data")
