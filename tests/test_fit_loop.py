"""fit as the one loop: replicas, meshes, chunks, callbacks, resume, and no silent traps.

Every test here failed on the loop that came before (it trained one seed on device 0,
ignored eval_data without eval_every, fell back to one step per call, and resumed any
checkpoint it found).
"""

import inspect
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnnet
from fnnet import train

MODEL = fnnet.models.mlp(3, (8,))
LOSS = train.softmax_cross_entropy
METRICS = {"accuracy": train.accuracy}


def _blobs(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int32)
    centers = np.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]], np.float32)
    x = (centers[y] + 0.5 * rng.standard_normal((n, 2))).astype(np.float32)
    return x, y


DATA, HELD_OUT = _blobs(), _blobs(40, seed=1)


def _fit(**kw):
    args = {"steps": 12, "batch_size": 16, "mesh": None, "progress": False, **kw}
    optimizer = args.pop("optimizer", optax.adam(1e-2))
    data = args.pop("data", DATA)
    loss_fn = args.pop("loss_fn", LOSS)
    return train.fit(args.pop("model", MODEL), optimizer, loss_fn, data, **args)


def _leaves(tree):
    def host(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(a))
        return np.asarray(a)

    return [host(a) for a in jax.tree.leaves(tree)]


# --- Arguments that cannot work are errors before any work -------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"steps": -4}, "steps must be a positive integer, got -4"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"batch_size": 1000}, "batch_size 1000 exceeds the 96 examples"),
        ({"eval_every": 4}, "eval_every=4 was given without eval_data"),
        ({"steps_per_call": 0}, "steps_per_call must be a positive integer"),
        ({"seed": [[0, 1]]}, "seed must be an int, or a 1-D sequence of ints"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"metric_fns": {"loss": train.accuracy}}, 'must not use the name "loss"'),
        ({"mesh": "everything"}, "mesh must be 'auto', None or a jax Mesh"),
        ({"vectorize_replicas": True}, "vectorize_replicas=True has no effect on one run"),
    ],
)
def test_bad_arguments_are_named_errors(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _fit(**kw)


def test_early_stopping_without_evaluation_and_a_misspelt_metric_are_errors(tmp_path):
    stop = train.EarlyStopping("eval_loss", patience=2)
    with pytest.raises(ValueError, match="no eval_data was given"):
        _fit(early_stopping=stop)
    typo = train.EarlyStopping("eval_acuracy", patience=2, mode="max")
    with pytest.raises(ValueError, match="eval_acuracy.*eval_loss, eval_accuracy"):
        _fit(early_stopping=typo, eval_data=HELD_OUT, metric_fns=METRICS)
    with pytest.raises(ValueError, match="mode='max' or mode='min'"):
        _fit(early_stopping=train.EarlyStopping("eval_accuracy", 2), eval_data=HELD_OUT,
             metric_fns=METRICS)  # fmt: skip
    with pytest.raises(TypeError, match="EarlyStopping"):
        _fit(early_stopping=("-loss", 2), eval_data=HELD_OUT)
    with pytest.raises(ValueError, match="RestoreBest monitors 'eval_accuracy'"):
        _fit(callbacks=[train.RestoreBest("eval_accuracy", "max")], eval_data=HELD_OUT)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_path_that_is_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    clock = []
    with pytest.raises(train.CheckpointError, match="checkpoint"):
        _fit(checkpoint=blocker / "run", callbacks=[_Recorder(clock)])
    assert clock == []  # not one hook ran: nothing trained


def test_a_directory_in_use_by_another_process_is_refused_by_name(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fnnet.train import DirectoryLock\n"
         "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
         str(directory)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(train.CheckpointLockedError, match=str(holder.pid)):
            _fit(checkpoint=directory)
    finally:
        holder.kill()
        holder.communicate()
    assert _fit(checkpoint=directory).resumed_from is None  # free once its holder is gone


# --- Evaluation and chunks ----------------------------------------------------------------


def test_eval_data_alone_evaluates_every_epoch_and_after_the_last_step():
    result = _fit(steps=14, eval_data=HELD_OUT, metric_fns=METRICS)  # 6 steps per epoch
    evaluated = [row["step"] for row in result.history if "eval_loss" in row]
    assert evaluated == [6, 12, 14]


def test_eval_every_off_the_epoch_does_not_fall_back_to_one_step_per_call():
    # 21-step epochs and an evaluation every 50: the old loop chose gcd(21, 50) = 1
    # step per call, 630 history rows for 630 steps. Chunks are now cut to land on
    # every evaluation: 50 = 2 x 21 + 8.
    data = _blobs(21 * 4)
    result = _fit(data=data, batch_size=4, steps=100, eval_every=50, eval_data=HELD_OUT)
    assert [row["step"] for row in result.history] == [21, 42, 50, 71, 92, 100]
    assert [row["step"] for row in result.history if "eval_loss" in row] == [50, 100]


def test_named_evaluation_sets_report_under_their_names():
    result = _fit(eval_data={"test": HELD_OUT, "shifted": (HELD_OUT[0] + 1, HELD_OUT[1])},
                  metric_fns=METRICS)  # fmt: skip
    last = result.history[-1]
    assert {"test_loss", "test_accuracy", "shifted_loss", "shifted_accuracy"} <= set(last)
    direct = train.evaluate(MODEL, result.state.params, {}, HELD_OUT, {"loss": LOSS, **METRICS},
                            batch_size=16)  # fmt: skip
    assert last["test_loss"] == pytest.approx(direct["loss"], rel=1e-5)


# --- Replicas -----------------------------------------------------------------------------


def test_four_seeds_equal_four_separate_runs_bitwise(threefry):
    model = fnnet.models.mlp(3, (8,), dropout_rate=0.1)  # dropout: the keys matter too
    together = _fit(model=model, seed=[0, 1, 2, 3], steps=18)
    assert together.replicas == 4 and len(together.history) == 4 * 3
    for r in range(4):
        alone = _fit(model=model, seed=r, steps=18)
        mine = jax.tree.map(lambda a, r=r: a[r], together.state)
        for a, b in zip(_leaves(alone.state), _leaves(mine)):
            np.testing.assert_array_equal(a, b)
        mine = [row["loss"] for row in together.history if row["replica"] == r]
        assert mine == [row["loss"] for row in alone.history]


def test_vectorized_replicas_equal_separate_runs_to_rounding(threefry):
    together = _fit(seed=[0, 1, 2], steps=12, vectorize_replicas=True)
    for r in (0, 2):
        alone = _fit(seed=r, steps=12)
        mine = jax.tree.map(lambda a, r=r: a[r], together.state.params)
        for a, b in zip(_leaves(alone.state.params), _leaves(mine)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_diverged_replica_stops_changing_while_the_others_train_on():
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    result = _fit(
        seed=[0, 1, 2], optimizer=optimizer, steps=24,
        hyperparams={"learning_rate": jnp.array([0.1, 1e30, 0.1])},
    )  # fmt: skip
    assert result.diverged[0] is None and result.diverged[2] is None
    assert result.diverged[1] is not None
    assert any("replica 1" in line and "diverged" in line for line in result.notices)
    for leaf in jax.tree.leaves(result.state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))
    losses = {r: [row["loss"] for row in result.history if row["replica"] == r] for r in (0, 2)}
    assert all(v[-1] < v[0] for v in losses.values())


def test_per_replica_early_stopping_freezes_the_stopped_replica():
    noise = (DATA[0], np.random.default_rng(3).integers(0, 3, len(DATA[1])).astype(np.int32))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    result = _fit(
        data=noise, seed=[0, 1], optimizer=optimizer, steps=120, eval_every=6,
        hyperparams={"learning_rate": jnp.array([0.3, 0.0])},  # replica 1 never improves
        eval_data=HELD_OUT, early_stopping=train.EarlyStopping("eval_loss", patience=2),
    )  # fmt: skip
    assert result.stopped_early[1]
    last_step = max(row["step"] for row in result.history if row["replica"] == 1)
    assert last_step < 120 and int(result.state.step[1]) == last_step


def _without_rates(history):
    """The rows without what the clock decides (the rates and the MFU)."""
    return [
        {k: v for k, v in row.items() if not k.endswith("_per_second") and k != "mfu"}
        for row in history
    ]


def test_a_donating_fit_equals_one_that_keeps_its_state(tmp_path):
    # The hard cases of giving the chunks the state's buffers: a replica frozen by
    # early stopping (its rows are restored after each chunk), RestoreBest (it keeps
    # params across chunks), checkpoints, evaluation; on the 8-device mesh (the
    # fused steps' donation on one device: tests/test_train_engine.py).
    noise = (DATA[0], np.random.default_rng(3).integers(0, 3, len(DATA[1])).astype(np.int32))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    kw = {
        "data": noise, "seed": [0, 1], "optimizer": optimizer, "steps": 36, "eval_every": 6,
        "hyperparams": {"learning_rate": jnp.array([0.3, 0.0])}, "eval_data": HELD_OUT,
        "early_stopping": train.EarlyStopping("eval_loss", patience=2), "mesh": "auto",
    }  # fmt: skip
    runs = {
        donate: _fit(donate=donate, checkpoint=tmp_path / str(donate),
                     callbacks=[train.RestoreBest("eval_loss", "min")], **kw)
        for donate in (False, True)
    }  # fmt: skip
    kept, given = runs[False], runs[True]
    assert given.stopped_early == kept.stopped_early and kept.stopped_early[1]
    last = [max(row["step"] for row in kept.history if row["replica"] == r) for r in (0, 1)]
    assert last[1] < last[0]  # replica 1 stood frozen while replica 0 trained on
    assert given.best_step == kept.best_step
    assert _without_rates(given.history) == _without_rates(kept.history)
    for a, b in zip(_leaves(kept.state), _leaves(given.state)):
        np.testing.assert_array_equal(a, b)
    one = _fit(donate=True, steps=12)
    assert _leaves(one.state) and all(np.isfinite(a).all() for a in _leaves(one.state.params))


def test_a_donating_fit_that_diverges_says_its_state_was_given_away():
    x = DATA[0].copy()
    x[20] = np.nan
    with pytest.raises(train.NonFiniteError) as info:
        _fit(data=(x, DATA[1]), donate=True, shuffle=False)
    assert info.value.last_finite_state is None
    with pytest.raises(train.NonFiniteError) as kept:
        _fit(data=(x, DATA[1]), donate=False, shuffle=False)
    assert kept.value.last_finite_state is not None
    with pytest.raises(TypeError, match="donate must be True, False or None"):
        _fit(donate="yes")


# --- Several devices (the suite runs with 8 simulated CPU devices) -----------------------


def test_three_seeds_on_the_default_mesh_equal_one_device():
    assert len(jax.devices()) == 8
    one = _fit(seed=[0, 1, 2], eval_data=HELD_OUT)
    many = _fit(seed=[0, 1, 2], eval_data=HELD_OUT, mesh="auto")  # batch 16 split over 8
    leaf = jax.tree.leaves(many.state.params)[0]
    assert len(leaf.sharding.device_set) == 8
    for a, b in zip(_leaves(one.state.params), _leaves(many.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [r["eval_loss"] for r in one.history if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in many.history if "eval_loss" in r], rel=1e-5
    )


@pytest.mark.parametrize(
    ("replicas", "batch", "devices", "how"),
    [(8, 12, 8, "replica"), (3, 16, 8, "batch"), (3, 100, 5, "batch"), (6, 9, 6, "replica"),
     (None, 7, 7, "batch"), (None, 13, 1, None)],
)  # fmt: skip
def test_the_mesh_is_reduced_with_a_notice_when_nothing_divides(replicas, batch, devices, how):
    where = train.place_run("auto", replicas, batch)
    used = 1 if where.mesh is None else where.mesh.shape["data"]
    assert used == devices
    assert {"replica": where.replica_axis, "batch": where.batch_axis}.get(how) == (
        "data" if how else None
    )
    assert (where.notice is None) == (devices == 8)
    if where.notice:
        assert f"training on {devices} of them" in where.notice


# --- Inputs with more than one field ------------------------------------------------------


def test_dict_inputs_reach_the_model_as_keywords():
    # Padded sequences: the label is the sum of the valid steps' first feature > 0.
    rng = np.random.default_rng(0)
    seqs = rng.standard_normal((64, 6, 2)).astype(np.float32)
    lengths = rng.integers(1, 7, 64).astype(np.int32)
    valid = np.arange(6)[None, :] < lengths[:, None]
    seqs[~valid] = 9.0  # padding that would dominate if the model saw it
    labels = ((seqs[..., 0] * valid).sum(1) > 0).astype(np.int32)
    model = fnnet.models.rnn(2, hidden=8, cell="gru")
    inputs = {"x": seqs, "lengths": lengths}
    result = _fit(model=model, data=(inputs, labels), steps=8, eval_data=(inputs, labels))
    assert np.isfinite(result.history[-1]["eval_loss"])
    blind = train.evaluate(model, result.state.params, {}, (seqs, labels), {"loss": LOSS},
                           batch_size=16)  # fmt: skip
    assert blind["loss"] != pytest.approx(result.history[-1]["eval_loss"], rel=1e-3)


def test_labels_outside_the_model_range_are_an_error_naming_value_and_index():
    x, y = DATA
    y = y.copy()
    y[17] = 3  # the model has 3 outputs
    with pytest.raises(train.LabelError, match=r"3.*17"):
        _fit(data=(x, y))


# --- Non-finite values --------------------------------------------------------------------


def test_an_overflowing_update_stops_with_a_finite_last_state(tmp_path):
    # Finite loss and gradients at step 3, and a learning rate there that overflows
    # the parameters: only a check of what the update produced can see it.
    spike = optax.scale_by_schedule(lambda n: jnp.where(n == 3, jnp.inf, 1.0))
    optimizer = optax.chain(optax.sgd(1e-2), spike)
    with pytest.raises(train.NonFiniteError) as error:
        _fit(optimizer=optimizer, steps=12, checkpoint=train.Checkpoints(tmp_path, every=6))
    assert (error.value.step, error.value.what) == (3, "update")
    last = error.value.last_finite_state
    assert all(np.all(np.isfinite(leaf)) for leaf in _leaves(last.params))
    assert train.CheckpointStore(tmp_path).steps() == []


# --- Resume -------------------------------------------------------------------------------


def test_resume_with_a_changed_learning_rate_is_refused(tmp_path):
    _fit(checkpoint=tmp_path, steps=12)
    with pytest.raises(train.ResumeError, match="step_size: -0.01 in the checkpoint, -0.03 now"):
        _fit(checkpoint=tmp_path, steps=24, optimizer=optax.adam(3e-2))
    with pytest.raises(train.ResumeError, match="batch_size: 16 in the checkpoint, 32 now"):
        _fit(checkpoint=tmp_path, steps=24, batch_size=32)
    with pytest.raises(train.ResumeError, match="seed"):
        _fit(checkpoint=tmp_path, steps=24, seed=1)


def test_precision_auto_is_float32_on_the_cpu_and_bfloat16_trains_in_bfloat16(tmp_path):
    # "auto" (the default) on the CPU is no casts at all: the run of policy=None, so a
    # checkpoint written with policy=None resumes under the default.
    first = _fit(checkpoint=tmp_path, steps=12, policy=None)
    auto = _fit(checkpoint=tmp_path, steps=24)
    assert auto.resumed_from == 12 and auto.policy is None and auto.precision == "float32"
    # A different precision is a different run: refused, with the difference shown.
    with pytest.raises(train.ResumeError, match="policy"):
        _fit(checkpoint=tmp_path, steps=36, policy="bfloat16")
    low = _fit(steps=12, policy="bfloat16", eval_data=HELD_OUT)
    assert low.policy == train.Policy.bfloat16()
    assert low.precision == "bfloat16 compute, float32 params, float32 outputs"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(low.state.params))
    # bfloat16 arithmetic, so the losses are near float32's but not equal to them.
    want = [row["loss"] for row in first.history]
    got = [row["loss"] for row in low.history]
    assert got != want and np.allclose(got, want, rtol=0.05)
    assert inspect.signature(train.fit).parameters["policy"].default == "auto"


@pytest.mark.parametrize(
    ("platform", "want"),
    [("cpu", None), ("gpu", "bfloat16"), ("cuda", "bfloat16"), ("tpu", "bfloat16")],
)
def test_auto_precision_is_bfloat16_on_accelerators(platform, want):
    from fnnet.train._precision import resolve_policy

    resolved = resolve_policy("auto", platform)
    assert resolved == (None if want is None else train.Policy.bfloat16())
    assert resolve_policy("float32", platform) == train.Policy.float32()


def test_an_unknown_precision_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"fit: policy must be one of \['auto', 'float32', 'bfl"):
        _fit(checkpoint=tmp_path / "run", policy="bf16")
    assert not (tmp_path / "run").exists()


def test_unfinished_saves_of_any_step_are_removed_on_the_next_start(tmp_path, capsys):
    _fit(checkpoint=tmp_path, steps=12)
    # What killed saves leave (orbax's names, old and new): of a later step and of an
    # earlier one, which orbax itself would clean only when saving that step again.
    left = [tmp_path / "18.orbax-checkpoint-tmp-1733220000", tmp_path / "6.orbax-checkpoint-tmp"]
    for path in left:
        (path / "arrays").mkdir(parents=True)
        (path / "arrays" / "part").write_bytes(b"half written")
    kept = tmp_path / "notes.orbax-checkpoint-tmp"  # not a step's: not ours to delete
    kept.mkdir()
    result = _fit(checkpoint=tmp_path, steps=24)
    assert result.resumed_from == 12
    assert not any(path.exists() for path in left) and kept.exists()
    err = capsys.readouterr().err
    assert all(f"removed {path}, the unfinished save" in err for path in left)


def test_the_history_reports_examples_tokens_per_second_and_mfu_against_a_given_peak():
    # The MLP 2 -> 8 -> 3 on batches of 16, by hand: forward 2*16*(2*8 + 8*3) = 1280;
    # backward the two weight gradients 2*16*2*8 + 2*16*8*3 = 1280 and the hidden
    # layer's input gradient 2*16*8*3 = 768 (the data's gradient is never needed).
    result = _fit(peak_flops=1e12)
    assert result.cost["flops_per_step"] == 1280 + 1280 + 768
    assert result.cost["peak_flops"] == 1e12 and result.cost["peak_source"] == "argument"
    for row in result.history:
        assert row["examples_per_second"] == pytest.approx(16 * row["steps_per_second"])
        assert row["mfu"] == pytest.approx(3328 * row["steps_per_second"] / 1e12)
        assert "tokens_per_second" not in row  # real-valued inputs are not tokens
    replicas = _fit(peak_flops=1e12, seed=[0, 1, 2])
    assert replicas.cost["flops_per_step"] == 3 * 3328  # the program runs all three
    # The CPU has no known peak: no MFU, and the reason, without counting anything.
    plain = _fit()
    assert (
        plain.cost["flops_per_step"] is None and "unknown peak for cpu" in plain.cost["peak_source"]
    )
    assert all("mfu" not in row for row in plain.history)
    # Token ids: tokens per second is examples per second times the sequence length.
    ids = (np.random.default_rng(0).integers(0, 7, (96, 5)).astype(np.int32), DATA[1])
    tokens = _fit(
        model=fnnet.serial(fnnet.embedding(7, 4), fnnet.flatten(), fnnet.dense(3)), data=ids
    )
    row = tokens.history[-1]
    assert row["tokens_per_second"] == pytest.approx(5 * row["examples_per_second"])
    with pytest.raises(ValueError, match="peak_flops override"):
        _fit(peak_flops=0)


def test_resuming_a_finished_run_says_so_and_returns_it(tmp_path, capsys):
    first = _fit(checkpoint=tmp_path, steps=12)
    again = _fit(checkpoint=tmp_path, steps=12)
    assert again.resumed_from == 12 and again.history == first.history
    assert "finished (step 12 of steps=12)" in capsys.readouterr().err
    for a, b in zip(_leaves(first.state), _leaves(again.state)):
        np.testing.assert_array_equal(a, b)


def test_resume_continues_history_early_stopping_and_the_best_weights(tmp_path):
    kw = {
        "seed": [0, 1], "eval_data": HELD_OUT, "eval_every": 6, "metric_fns": METRICS,
        "early_stopping": train.EarlyStopping("eval_accuracy", patience=50, mode="max"),
    }  # fmt: skip
    straight = _fit(steps=36, callbacks=[train.RestoreBest("eval_loss", "min")], **kw)
    _fit(steps=18, checkpoint=tmp_path, callbacks=[train.RestoreBest("eval_loss", "min")], **kw)
    resumed = _fit(steps=36, checkpoint=tmp_path, callbacks=[train.RestoreBest("eval_loss", "min")],
                   **kw)  # fmt: skip
    assert resumed.resumed_from == 18
    strip = _without_rates
    assert strip(resumed.history) == strip(straight.history)
    assert resumed.best_step == straight.best_step
    for a, b in zip(_leaves(straight.state.params), _leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)


class _Recorder:
    def __init__(self, calls):
        self.calls = calls

    def on_start(self, event):
        self.calls.append(("start", event.step))

    def on_chunk_end(self, event):
        self.calls.append(("chunk", event.step))

    def on_evaluation(self, event):
        self.calls.append(("eval", event.step))

    def on_checkpoint(self, event):
        self.calls.append(("checkpoint", event.step, event.checkpoint.name))

    def on_end(self, result):
        self.calls.append(("end", int(result.state.step)))


def test_callbacks_hear_every_chunk_evaluation_and_checkpoint(tmp_path):
    calls = []
    every = train.Checkpoints(tmp_path, every=6)
    _fit(
        steps=12, eval_data=HELD_OUT, eval_every=12, checkpoint=every, callbacks=[_Recorder(calls)]
    )
    assert calls == [
        ("start", 0), ("chunk", 6), ("checkpoint", 6, "6"), ("chunk", 12), ("eval", 12),
        ("checkpoint", 12, "12"), ("end", 12),
    ]  # fmt: skip


def test_restore_best_hands_back_the_best_evaluated_weights():
    calls = []

    class Keep:
        def on_evaluation(self, event):
            calls.append((event.rows[0]["eval_loss"], jax.tree.map(np.asarray, event.state.params)))

    result = _fit(steps=60, eval_every=6, eval_data=HELD_OUT, optimizer=optax.sgd(3.0),
                  callbacks=[Keep(), train.RestoreBest("eval_loss", "min")])  # fmt: skip
    best_loss, best_params = min(calls, key=lambda c: c[0])
    assert result.best_step == 6 * (1 + [c[0] for c in calls].index(best_loss))
    for a, b in zip(_leaves(best_params), _leaves(result.state.params)):
        np.testing.assert_array_equal(a, b)


def test_tensorboard_writes_scalars_tensorboard_can_read(tmp_path):
    from tensorboardX.proto import event_pb2

    _fit(steps=12, eval_data=HELD_OUT, callbacks=[train.TensorBoard(tmp_path)])
    (events,) = tmp_path.glob("events.out.tfevents.*")
    tags, raw, at = {}, events.read_bytes(), 0
    while at < len(raw):  # TFRecord: length, its CRC, the record, its CRC
        length = int.from_bytes(raw[at : at + 8], "little")
        event = event_pb2.Event.FromString(raw[at + 12 : at + 12 + length])
        at += 16 + length
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append((event.step, value.simple_value))
    assert [s for s, _ in tags["train/loss"]] == [6, 12]
    assert [s for s, _ in tags["eval/loss"]] == [6, 12]


# --- The JSON-lines log and a killed process ------------------------------------------------

WORKER = pathlib.Path(__file__).with_name("_fit_worker.py")


def test_the_log_repeats_no_rows_after_a_kill(tmp_path):
    log = tmp_path / "log.jsonl"
    cmd = [sys.executable, str(WORKER), str(tmp_path / "run"), "60", str(tmp_path / "out.npz"),
           "--log", str(log)]  # fmt: skip
    proc = subprocess.Popen([*cmd, "--slow"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manager = train.CheckpointStore(tmp_path / "run")
    deadline = time.time() + 90
    while not (manager.steps() and log.exists() and len(log.read_text().splitlines()) >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True, timeout=120)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(6, 61, 6))


# --- Progress -------------------------------------------------------------------------------


def test_progress_without_a_terminal_prints_lines_and_leaves_compilation_out(monkeypatch):
    class Pipe:
        def __init__(self):
            self.lines = []

        def write(self, text):
            self.lines += [line for line in text.splitlines() if line]

        def flush(self):
            pass

    pipe = Pipe()
    progress = train.Progress(stream=pipe)
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    event = train.Event(step=0, steps=40, state=None, rows=[], history=[], replicas=None,
                        primary=True)  # fmt: skip
    progress.on_start(event)
    for step, compile_seconds in [(10, 9.0), (20, 0.0), (30, 0.0), (40, 0.0)]:
        now[0] += 1.0 + compile_seconds  # one second of training per chunk
        event.step, event.compile_seconds, event.rows = step, compile_seconds, [{"loss": 0.5}]
        progress.on_chunk_end(event)
    # The first line at once, then none until LINE_SECONDS pass, and the last.
    assert len(pipe.lines) == 2, pipe.lines
    assert "step 10/40" in pipe.lines[0] and "10.0 steps/s" in pipe.lines[0]
    assert "about 3 s left" in pipe.lines[0]  # 30 steps at 10 per second, compile excluded
    assert "step 40/40" in pipe.lines[1]


def test_only_process_0_shows_progress(monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    _fit(progress=True)
    assert "fit: step" not in capsys.readouterr().err


# --- predict, evaluate and the params they are given ----------------------------------


def test_predict_compiles_once_for_any_number_of_examples():
    params = MODEL.init(jax.random.key(0), DATA[0][0])
    from fnnet.train import _evaluate

    before = _evaluate._batch_outputs_jit._cache_size()
    outputs = [train.predict(MODEL, params, {}, DATA[0][:n], batch_size=16) for n in (5, 37, 96)]
    assert _evaluate._batch_outputs_jit._cache_size() == before + 1
    assert [o.shape for o in outputs] == [(5, 3), (37, 3), (96, 3)]
    direct = jax.vmap(lambda x: MODEL.apply(params, x))(DATA[0])
    np.testing.assert_allclose(outputs[2], direct, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(outputs[1], outputs[2][:37])


def test_predict_takes_dict_inputs_and_rejects_a_dict_without_x():
    model = fnnet.models.rnn(2, hidden=4, cell="gru")
    seqs = np.random.default_rng(0).standard_normal((10, 5, 2)).astype(np.float32)
    lengths = np.full(10, 3, np.int32)
    params = model.init(jax.random.key(0), seqs[0])
    cut = train.predict(model, params, {}, {"x": seqs, "lengths": lengths}, batch_size=4)
    short = train.predict(model, params, {}, seqs[:, :3], batch_size=4)
    np.testing.assert_allclose(cut, short, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs the key 'x'.*'lengths', 'tokens'"):
        train.predict(model, params, {}, {"tokens": seqs, "lengths": lengths}, batch_size=4)


def test_params_with_an_extra_or_missing_entry_are_named():
    params = MODEL.init(jax.random.key(0), DATA[0][0])
    extra = {**params, "stray": {"w": jnp.zeros(3)}}
    with pytest.raises(train.ParamsError, match=r"not in the model \['stray'\]\['w'\]"):
        train.evaluate(MODEL, extra, {}, DATA, {"loss": LOSS}, batch_size=16)
    missing = dict(params)
    gone = sorted(missing)[0]
    del missing[gone]
    with pytest.raises(train.ParamsError, match=rf"missing \['{gone}'\]"):
        train.predict(MODEL, missing, {}, DATA[0], batch_size=16)


def test_eval_labels_are_checked_too_and_float_targets_are_left_alone():
    x, y = HELD_OUT
    bad = y.copy()
    bad[4] = -1
    with pytest.raises(train.LabelError, match=r"eval_data: label -1 at index 4"):
        _fit(eval_data=(x, bad))
    # A regression target is not a class label: no range applies.
    targets = np.full((96, 3), 7.0, np.float32)
    result = _fit(data=(DATA[0], targets), loss_fn=train.mean_squared_error, steps=6)
    assert result.state.step == 6


def test_a_replica_whose_update_overflows_stops_and_the_others_train_on():
    # Replica 1's learning rate overflows its parameters at its first step.
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1e-2)
    result = _fit(optimizer=optimizer, seed=[0, 1], hyperparams={"learning_rate": [1e-2, np.inf]})
    assert result.diverged == [None, 0]
    for leaf in _leaves(result.state.params):
        assert np.all(np.isfinite(leaf))


def test_a_hyperparameter_its_dtype_cannot_hold_is_named():
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    with pytest.raises(ValueError, match=r"learning_rate=.*does not fit .*float32"):
        _fit(seed=[0, 1], optimizer=optimizer, hyperparams={"learning_rate": [0.1, 1e39]})


# --- Checkpoints written in the background ------------------------------------------------


def _slow_commits(monkeypatch, gate):
    """Makes every orbax commit (the rename into place) wait for ``gate``."""
    from orbax.checkpoint._src.path import atomicity

    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        gate.wait(timeout=60)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def test_a_save_returns_before_its_commit_and_wait_blocks_until_it(tmp_path, monkeypatch):
    gate = threading.Event()
    _slow_commits(monkeypatch, gate)
    store = train.CheckpointStore(tmp_path)
    state = {"w": jnp.arange(6.0)}
    store.save(1, state, metadata={})  # returns with the commit still held back
    assert not (tmp_path / "1").exists()
    assert [p.name for p in tmp_path.iterdir() if "orbax-checkpoint-tmp" in p.name]
    gate.set()
    store.wait()
    assert store.steps() == [1]
    np.testing.assert_array_equal(store.restore(1)[0]["w"], state["w"])


def test_fit_trains_on_while_a_checkpoint_is_written_and_returns_after_the_last(
    tmp_path, monkeypatch
):
    gate = threading.Event()
    _slow_commits(monkeypatch, gate)
    seen = []

    class Watch:  # at each chunk end: is step 6's save still uncommitted?
        def on_chunk_end(self, event):
            seen.append((event.step, (tmp_path / "6").exists()))
            if event.step == 12:
                gate.set()  # let the commits through, from here on

    result = _fit(steps=18, checkpoint=train.Checkpoints(tmp_path, every=6), callbacks=[Watch()])
    # Step 12 trained while step 6 was still being written.
    assert (12, False) in seen
    # fit returned after its last checkpoint was committed, with nothing left half-written.
    assert train.CheckpointStore(tmp_path).steps() == [6, 12, 18]
    assert not [p for p in tmp_path.iterdir() if "orbax-checkpoint-tmp" in p.name]
    restored, _ = train.CheckpointStore(tmp_path).restore(18)
    for a, b in zip(_leaves(restored["state"].params), _leaves(result.state.params)):
        np.testing.assert_array_equal(a, b)
