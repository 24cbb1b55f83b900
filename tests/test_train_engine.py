"""The training engine: state, on-device batches, the step, fused steps, replicas."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnnet
from fnnet._src.cpu_layout import canonicalize_convolutions
from fnnet.train._data import (
    batch_indices,
    epoch_orders,
    indices_from_orders,
    permutation,
    slice_batch,
    take_batch,
)
from fnnet.train._losses import softmax_cross_entropy
from fnnet.train._precision import Policy
from fnnet.train._state import TrainState, init_replicas, init_state, set_hyperparams
from fnnet.train._step import (
    NonFiniteError,
    check_finite,
    decay_mask,
    make_fused_steps,
    make_train_step,
    run_steps_python,
)

N, FEATURES, CLASSES, BATCH = 64, 12, 3, 16
THREEFRY = "threefry2x32"


def accuracy(logits, label):
    return (jnp.argmax(logits) == label).astype(jnp.float32)


def leaves(tree):
    """Every leaf as a NumPy array (PRNG keys as their raw bits), for exact comparison."""

    def raw(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.asarray(leaf)

    return [raw(leaf) for leaf in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)


def assert_trees_close(a, b, tol=1e-5):
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, N).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


@pytest.fixture(scope="module")
def mlp():
    return fnnet.models.mlp(CLASSES, hidden=(8,), dropout_rate=0.25)


@pytest.fixture(scope="module")
def mlp_step(mlp):
    return make_train_step(
        mlp, optax.adam(1e-2), softmax_cross_entropy, metric_fns={"accuracy": accuracy}
    )


# --- State ---------------------------------------------------------------------


def test_init_state_fields(mlp, data):
    opt = optax.adam(1e-2)
    state = init_state(mlp, opt, data[0][0], seed=0)
    assert isinstance(state, TrainState)
    assert jax.tree.map(jnp.shape, state.params) == {
        "hidden_0": {"b": (8,), "w": (FEATURES, 8)},
        "out": {"b": (CLASSES,), "w": (8, CLASSES)},
    }
    assert state.model_state == {}
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert int(state.nonfinite_step) == -1 and int(state.nonfinite_what) == 0
    for key in (state.key, state.data_key):
        assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert not np.array_equal(leaves(state.key)[0], leaves(state.data_key)[0])
    # data_seed decouples the shuffle from the initialization.
    a = init_state(mlp, opt, data[0][0], seed=1, data_seed=7)
    b = init_state(mlp, opt, data[0][0], seed=2, data_seed=7)
    assert_trees_equal(a.data_key, b.data_key)
    assert not np.array_equal(a.params["hidden_0"]["w"], b.params["hidden_0"]["w"])
    # A typed key is used as it is.
    c = init_state(mlp, opt, data[0][0], seed=jax.random.key(0))
    assert_trees_equal(c, init_state(mlp, opt, data[0][0], seed=0))


# --- Batches -------------------------------------------------------------------


def test_batch_indices_visit_each_example_once_per_epoch():
    key = jax.random.key(3)
    n, batch = 50, 16  # 3 full batches; 2 examples dropped per epoch
    epochs = []
    for epoch in range(2):
        idx = [
            batch_indices(key, epoch * 3 + i, num_examples=n, batch_size=batch) for i in range(3)
        ]
        idx = np.concatenate([np.asarray(i) for i in idx])
        assert idx.dtype == np.int32 and len(set(idx.tolist())) == 48
        assert idx.min() >= 0 and idx.max() < n
        epochs.append(idx)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    again = batch_indices(key, 4, num_examples=n, batch_size=batch)
    np.testing.assert_array_equal(again, epochs[1][16:32])  # a pure function of the step
    in_order = batch_indices(key, 4, num_examples=n, batch_size=batch, shuffle=False)
    np.testing.assert_array_equal(in_order, np.arange(16, 32))
    with pytest.raises(ValueError, match="larger than the dataset"):
        batch_indices(key, 0, num_examples=8, batch_size=16)


@pytest.mark.parametrize("first_step, num_steps", [(2, 4), (3, 7)])
def test_epoch_orders_give_batch_indices(first_step, num_steps):
    key = jax.random.key(5)
    sizes = {"num_examples": 40, "batch_size": 16}  # 2 steps per epoch
    orders = epoch_orders(key, first_step, num_steps=num_steps, **sizes)
    for step in range(first_step, first_step + num_steps):
        np.testing.assert_array_equal(
            indices_from_orders(orders, first_step, step, **sizes),
            batch_indices(key, step, **sizes),
        )


@pytest.mark.parametrize("n", [1, 2, 7, 4000])
def test_permutation_is_a_permutation(n):
    order = np.asarray(jax.jit(permutation, static_argnums=1)(jax.random.key(n), n))
    assert order.dtype == np.int32
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


def test_permutation_is_uniform():
    # Every one of the 24 orders of 4 items, 24,000 draws: a chi-square test of
    # equal counts (23 degrees of freedom; 49.7 is its 0.1% point). A permutation
    # that favoured the stored order on ties, or any fixed bias, fails it.
    keys = jax.random.split(jax.random.key(0), 24_000)
    orders = np.asarray(jax.jit(jax.vmap(lambda k: permutation(k, 4)))(keys))
    codes = orders @ np.array([64, 16, 4, 1])
    counts = np.bincount(np.unique(codes, return_inverse=True)[1])
    assert len(counts) == 24
    chi2 = float(np.sum((counts - 1000.0) ** 2 / 1000.0))
    assert chi2 < 49.7, counts
    # And every item is equally likely in every place.
    for place in range(4):
        assert np.all(np.abs(np.bincount(orders[:, place], minlength=4) - 6000) < 300)


def test_slice_batch_is_the_unshuffled_batch(data):
    sizes = {"num_examples": N, "batch_size": 24}  # 2 steps per epoch, 16 dropped
    for step in (0, 1, 2, 5):
        want = take_batch(data, batch_indices(None, step, shuffle=False, **sizes))
        jax.tree.map(np.testing.assert_array_equal, slice_batch(data, step, **sizes), want)


def test_take_batch_gathers_every_leaf(data):
    idx = jnp.array([3, 0, 5], jnp.int32)
    batch = take_batch({"x": data[0], "y": data[1]}, idx)
    np.testing.assert_array_equal(batch["x"], data[0][np.array([3, 0, 5])])
    np.testing.assert_array_equal(batch["y"], data[1][np.array([3, 0, 5])])


# --- The step ------------------------------------------------------------------


def test_step_matches_a_hand_written_step(data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    opt = optax.sgd(0.5)
    state = init_state(model, opt, data[0][0], seed=0)
    batch = (data[0][:BATCH], data[1][:BATCH])
    step = jax.jit(
        make_train_step(model, opt, softmax_cross_entropy, metric_fns={"accuracy": accuracy})
    )
    new, metrics = step(state, batch)

    def loss_fn(params):
        logits = jax.vmap(model.apply, in_axes=(None, 0))(params, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    assert_trees_close(new.params, jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(
        metrics["accuracy"], np.mean(np.argmax(logits, -1) == np.asarray(batch[1])), rtol=1e-6
    )
    assert int(new.step) == 1 and int(new.nonfinite_step) == -1


def test_a_donated_step_gives_the_same_state(data, mlp_step, mlp):
    # jax.jit(step, donate_argnums=0) is the fast way to run steps one by one
    # (docs/training.md): the new state reuses the old one's buffers.
    state = init_state(mlp, optax.adam(1e-2), data[0][0], seed=0)
    batch = (data[0][:BATCH], data[1][:BATCH])
    want, want_metrics = jax.jit(mlp_step)(state, batch)
    donated = jax.tree.map(jnp.copy, state)
    got, got_metrics = jax.jit(mlp_step, donate_argnums=0)(donated, batch)
    assert_trees_equal(got, want)
    assert_trees_equal(got_metrics, want_metrics)
    assert donated.params["out"]["w"].is_deleted()


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)),
        optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2)),
        optax.adamw(1e-2, weight_decay=0.1, mask=decay_mask),
    ],
    ids=["adam_schedule", "clipped_adam", "adamw_masked"],
)
def test_any_optax_transformation_trains(optimizer, data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    state = init_state(model, optimizer, data[0][0], seed=0)
    step = make_train_step(model, optimizer, softmax_cross_entropy)
    state, metrics = make_fused_steps(step, data, batch_size=BATCH, num_steps=8)(state)
    assert metrics["loss"].shape == (8,)
    assert np.all(np.isfinite(metrics["loss"])) and metrics["loss"][-1] < metrics["loss"][0]
    assert int(state.step) == 8


def test_decay_mask_spares_biases_and_norm_scales(data):
    model = fnnet.serial(
        fnnet.dense(8), fnnet.layer_norm(), fnnet.repeat(fnnet.dense(8), 2), fnnet.dense(CLASSES)
    )
    params = model.init(jax.random.key(0), data[0][0])
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert len(flat) == 8
    for path, decayed in flat.items():
        name = re.findall(r"'(\w+)'", path)[-1]
        assert decayed == (name == "w"), path  # stacked (2, 8) biases included


def test_adamw_with_the_mask_sees_the_params(data):
    # The step hands params to optimizer.update, so adamw changes each weight by
    # exactly adam's update minus lr * wd * w, and each bias by adam's update alone.
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    lr, wd = 1e-2, 0.5
    batch = (data[0][:BATCH], data[1][:BATCH])
    p0 = init_state(model, optax.sgd(lr), data[0][0], seed=0).params
    trained = {}
    for name, opt in {
        "adam": optax.adam(lr),
        "adamw": optax.adamw(lr, weight_decay=wd, mask=decay_mask),
    }.items():
        state = init_state(model, opt, data[0][0], seed=0)
        trained[name] = jax.jit(make_train_step(model, opt, softmax_cross_entropy))(state, batch)
    mask = decay_mask(p0)
    expected = jax.tree.map(
        lambda a, p, m: a - lr * wd * p if m else a, trained["adam"][0].params, p0, mask
    )
    assert_trees_close(trained["adamw"][0].params, expected, tol=1e-6)


def test_multi_steps_accumulation_equals_one_big_batch(data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    x, y = data[0][: 2 * BATCH], data[1][: 2 * BATCH]

    big_opt = optax.sgd(0.3)
    big = init_state(model, big_opt, x[0], seed=0)
    big, _ = jax.jit(make_train_step(model, big_opt, softmax_cross_entropy))(big, (x, y))

    acc_opt = optax.MultiSteps(optax.sgd(0.3), every_k_schedule=2)
    acc = init_state(model, acc_opt, x[0], seed=0)
    step = jax.jit(make_train_step(model, acc_opt, softmax_cross_entropy))
    half, _ = step(acc, (x[:BATCH], y[:BATCH]))
    assert_trees_equal(half.params, acc.params)  # nothing applied until the k-th step
    acc, _ = step(half, (x[BATCH:], y[BATCH:]))
    assert_trees_close(acc.params, big.params, tol=1e-6)


def test_policy_casts_inside_the_loss_so_gradients_stay_float32(data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    opt = optax.sgd(0.1)
    state = init_state(model, opt, data[0][0], seed=0)
    batch = (data[0][:BATCH], data[1][:BATCH])
    seen = []

    def loss_fn(logits, label):
        seen.append(logits.dtype)
        return softmax_cross_entropy(logits, label)

    low = jax.jit(make_train_step(model, opt, loss_fn, policy=Policy.bfloat16()))
    new, metrics = low(state, batch)
    assert seen == [jnp.float32]  # the loss sees the output dtype
    for leaf in jax.tree.leaves(new.params):
        assert leaf.dtype == jnp.float32
    ref, ref_metrics = jax.jit(make_train_step(model, opt, softmax_cross_entropy))(state, batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=2e-2)
    assert_trees_close(new.params, ref.params, tol=2e-2)


def test_batch_norm_state_updates_through_the_step(data):
    model = fnnet.serial(fnnet.dense(8), fnnet.batch_norm(momentum=0.5), fnnet.dense(CLASSES))
    opt = optax.sgd(0.1)
    state = init_state(model, opt, data[0][0], seed=0)
    assert jax.tree.leaves(state.model_state)
    step = make_train_step(model, opt, softmax_cross_entropy)
    new, _ = make_fused_steps(step, data, batch_size=BATCH, num_steps=2)(state)
    for old, updated in zip(leaves(state.model_state), leaves(new.model_state)):
        assert old.shape == updated.shape and not np.array_equal(old, updated)


# --- Non-finite losses and gradients -----------------------------------------


def test_nonfinite_loss_is_recorded_and_the_update_applied_by_default(data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    opt = optax.adam(1e-2)
    x = data[0].at[2 * BATCH + 3].set(jnp.nan)  # poisons batch 2 of the in-order epoch
    state = init_state(model, opt, x[0], seed=0)
    step = make_train_step(model, opt, softmax_cross_entropy)
    run = make_fused_steps(step, (x, data[1]), batch_size=BATCH, num_steps=4, shuffle=False)
    four, metrics = run(state)
    assert np.all(np.isfinite(metrics["loss"][:2])) and not np.isfinite(metrics["loss"][2])
    assert int(four.nonfinite_step) == 2 and int(four.nonfinite_what) == 1
    # The NaN reached the parameters (nothing was skipped), and later steps do not
    # overwrite the record of the first bad one.
    assert not all(np.all(np.isfinite(leaf)) for leaf in leaves(four.params))
    with pytest.raises(NonFiniteError, match="the loss was not finite at step 2"):
        check_finite(four)


def test_nonfinite_loss_skips_the_update_and_records_the_step(data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    opt = optax.adam(1e-2)
    x = data[0].at[2 * BATCH + 3].set(jnp.nan)  # poisons batch 2 of the in-order epoch
    state = init_state(model, opt, x[0], seed=0)
    step = make_train_step(model, opt, softmax_cross_entropy, skip_nonfinite=True)
    run = make_fused_steps(step, (x, data[1]), batch_size=BATCH, num_steps=2, shuffle=False)
    two, _ = run(state)
    check_finite(two)  # steps 0 and 1 were fine
    four, metrics = run(two)
    assert not np.isfinite(metrics["loss"][0]) and np.isfinite(metrics["loss"][1])
    assert int(four.step) == 4  # the step counter always advances
    assert int(four.nonfinite_step) == 2 and int(four.nonfinite_what) == 1
    with pytest.raises(NonFiniteError, match="the loss was not finite at step 2") as info:
        check_finite(four)
    assert info.value.step == 2 and info.value.what == "loss"

    # The step-by-step path agrees bit for bit (in order, too), and shows that
    # step 2 left params, optimizer state and model state as they were.
    kwargs = {"batch_size": BATCH, "shuffle": False}
    three, _ = run_steps_python(step, (x, data[1]), two, num_steps=1, **kwargs)
    assert_trees_equal(
        (three.params, three.opt_state, three.model_state),
        (two.params, two.opt_state, two.model_state),
    )
    loop, _ = run_steps_python(step, (x, data[1]), state, num_steps=4, **kwargs)
    assert_trees_equal(loop, four)


def test_nonfinite_gradient_with_finite_loss_is_recorded(data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    opt = optax.sgd(0.1)

    def loss_fn(logits, label):
        # sqrt has an infinite slope at 0: a finite loss with a non-finite gradient.
        return softmax_cross_entropy(logits, label) + jnp.sqrt(jnp.sum(logits * 0.0))

    state = init_state(model, opt, data[0][0], seed=0)
    batch = (data[0][:BATCH], data[1][:BATCH])
    for skip in (False, True):
        step = jax.jit(make_train_step(model, opt, loss_fn, skip_nonfinite=skip))
        new, metrics = step(state, batch)
        assert np.isfinite(metrics["loss"])
        assert int(new.nonfinite_step) == 0 and int(new.nonfinite_what) == 2
        if skip:
            assert_trees_equal(new.params, state.params)
        else:
            assert not all(np.all(np.isfinite(leaf)) for leaf in leaves(new.params))
        with pytest.raises(NonFiniteError, match="the gradient was not finite at step 0"):
            check_finite(new)


@pytest.mark.parametrize("finite_check", ["concat", "per_leaf"])
def test_both_finite_checks_give_the_same_verdict_and_state(data, finite_check):
    # An infinite input value poisons step 2; either reduction catches it, the
    # step is skipped, and the two runs' states agree bit for bit.
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    opt = optax.adam(1e-2)
    x = data[0].at[2 * BATCH + 3, 5].set(jnp.inf)
    state = init_state(model, opt, x[0], seed=0)
    run = {
        how: make_fused_steps(
            make_train_step(
                model, opt, softmax_cross_entropy, skip_nonfinite=True, finite_check=how
            ),
            (x, data[1]),
            batch_size=BATCH,
            num_steps=4,
            shuffle=False,
        )  # fmt: skip
        for how in ("concat", finite_check)
    }
    want, got = run["concat"](state)[0], run[finite_check](state)[0]
    assert int(got.nonfinite_step) == 2
    assert_trees_equal(want, got)


def test_the_per_leaf_check_copies_no_tree_and_a_bad_choice_is_refused(data, mlp):
    opt = optax.adam(1e-2)
    state = init_state(mlp, opt, data[0][0], seed=0)
    batch = (data[0][:BATCH], data[1][:BATCH])

    def primitives(how):
        step = make_train_step(mlp, opt, softmax_cross_entropy, finite_check=how)
        return str(jax.make_jaxpr(step)(state, batch))

    assert "concatenate" in primitives("concat")
    assert "concatenate" not in primitives("per_leaf")
    with pytest.raises(ValueError, match=r"finite_check must be one of .*got 'leaf'"):
        make_train_step(mlp, opt, softmax_cross_entropy, finite_check="leaf")


@pytest.mark.parametrize("how", ["one", "replicas", "vectorized"])
def test_donated_fused_steps_equal_undonated_ones_bitwise(data, mlp_step, mlp, how):
    opt = optax.adam(1e-2)
    replicated = how != "one"
    kw = {"batch_size": BATCH, "num_steps": 5, "replicated": replicated,
          "vectorize_replicas": how == "vectorized"}  # fmt: skip

    def fresh():
        if replicated:
            return init_replicas(mlp, opt, data[0][0], [0, 1, 2])
        return init_state(mlp, opt, data[0][0], seed=0)

    want, _ = make_fused_steps(mlp_step, data, **kw)(fresh())
    given = fresh()
    run = make_fused_steps(mlp_step, data, donate=True, **kw)
    got, _ = run(given)
    assert_trees_equal(want, got)
    # The buffers were handed over: the state given is gone.
    assert jax.tree.leaves(given.params)[0].is_deleted()
    again, _ = run(got)
    assert int(np.reshape(again.step, -1)[0]) == 10
    with pytest.raises(TypeError, match="donate must be True or False"):
        make_fused_steps(mlp_step, data, donate="yes", **kw)


def test_check_finite_names_the_replica():
    state = TrainState(
        params={},
        opt_state=(),
        model_state={},
        step=jnp.array([4, 4, 4]),
        key=jax.random.split(jax.random.key(0), 3),
        data_key=jax.random.split(jax.random.key(1), 3),
        nonfinite_step=jnp.array([-1, 3, 1], jnp.int32),
        nonfinite_what=jnp.array([0, 2, 1], jnp.int32),
    )
    with pytest.raises(NonFiniteError, match="gradient was not finite at step 3 in replica 1"):
        check_finite(state)


# --- Fused steps ---------------------------------------------------------------


def _tiny_cnn():
    return fnnet.models.cnn(CLASSES, (4, 4), kernel_size=(5, 3), strides=2, padding=1, pool=None)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fused_equals_python_loop_bitwise(kind, data, mlp):
    model = mlp if kind == "mlp" else _tiny_cnn()
    opt = optax.adam(1e-2)
    step = make_train_step(model, opt, softmax_cross_entropy, metric_fns={"accuracy": accuracy})
    state = init_state(model, opt, data[0][0], seed=0)
    # 6 steps from step 0, then 6 more: crosses epoch boundaries (4 steps per
    # epoch) in the middle of a run.
    run = make_fused_steps(step, data, batch_size=BATCH, num_steps=6)
    fused, fused_metrics = run(state)
    fused, more_metrics = run(fused)
    loop, loop_metrics = run_steps_python(step, data, state, batch_size=BATCH, num_steps=12)
    assert_trees_equal(fused, loop)
    for name in ("loss", "accuracy"):
        np.testing.assert_array_equal(
            np.concatenate([fused_metrics[name], more_metrics[name]]), loop_metrics[name]
        )


def _conv_layouts(compiled_text):
    return set(re.findall(r"dim_labels=([^,\s]+)", compiled_text))


def test_fused_convolutions_are_in_the_fast_cpu_layout(data):
    # XLA:CPU canonicalizes convolution layouts only in the entry computation;
    # inside the scan's loop the gradient convolutions would stay as they are
    # and run as naive loops. See fnnet/_src/cpu_layout.py.
    model, opt = _tiny_cnn(), optax.sgd(0.1)
    state = init_state(model, opt, data[0][0], seed=0)
    step = make_train_step(model, opt, softmax_cross_entropy)

    def layouts(canonical):
        one = canonicalize_convolutions(step) if canonical else step

        def fused(s, batch):
            return jax.lax.scan(lambda c, _: one(c, batch), s, length=2)

        batch = (data[0][:BATCH], data[1][:BATCH])
        return _conv_layouts(jax.jit(fused).lower(state, batch).compile().as_text())

    assert layouts(False) > {"b0f_0io->b0f"}  # transposed gradient convolutions
    assert layouts(True) == {"b0f_0io->b0f"}  # NHWC input, HWIO kernel, NHWC output


def test_canonicalize_convolutions_keeps_values_in_nested_programs():
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))  # (batch, height, width, channels)
    w = jax.random.normal(jax.random.key(1), (3, 2, 3, 4))  # (kh, kw, in, out)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (2, 1), [(1, 1), (0, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def f(x, w):
        def body(c, _):
            # jit inside scan: the gradient convolutions sit two programs deep.
            g = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))
            gx, gw = g(c, w)
            return c - 0.1 * gx, jnp.sum(gw)

        return jax.lax.scan(body, x, length=2)

    want = jax.jit(f)(x, w)
    got = jax.jit(canonicalize_convolutions(f))(x, w)
    assert_trees_close(got, want, tol=1e-5)
    text = jax.jit(canonicalize_convolutions(f)).lower(x, w).compile().as_text()
    assert _conv_layouts(text) == {"b01f_01io->b01f"}


def test_second_call_does_not_recompile(data, mlp_step, mlp, caplog):
    state = init_state(mlp, optax.adam(1e-2), data[0][0], seed=0)
    run = make_fused_steps(mlp_step, data, batch_size=BATCH, num_steps=3)
    state, _ = run(state)
    with jax.log_compiles(), caplog.at_level(logging.DEBUG):
        caplog.clear()
        run(state)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_fused_run_makes_no_host_transfers(data, mlp_step, mlp):
    state = jax.device_put(init_state(mlp, optax.adam(1e-2), data[0][0], seed=0))
    run = make_fused_steps(mlp_step, jax.device_put(data), batch_size=BATCH, num_steps=4)
    jax.block_until_ready(run(state))  # compile outside the guard
    with jax.transfer_guard("disallow"):
        new, metrics = run(state)
        new, metrics = run(new)  # the output state feeds straight back in
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jnp.asarray(np.ones(3))  # the guard is really on
    assert int(new.step) == 8 and metrics["loss"].shape == (4,)


# --- Replicas: seeds and hyperparameters ---------------------------------------
# Both tests share one optimizer whose learning rate lives in opt_state, so they
# share compiled programs too.


@pytest.fixture(scope="module")
def injected(data):
    model = fnnet.models.mlp(CLASSES, hidden=(8,), dropout_rate=0.25)
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    step = make_train_step(model, opt, softmax_cross_entropy)
    kwargs = {"batch_size": BATCH, "num_steps": 5}
    run = make_fused_steps(step, data, **kwargs)
    return model, opt, run, make_fused_steps(step, data, replicated=True, **kwargs)


def test_vmapped_seeds_equal_separate_runs(data, injected):
    model, opt, run, run_replicas = injected
    replicas = init_replicas(model, opt, data[0][0], jnp.arange(3), impl=THREEFRY)
    trained, metrics = run_replicas(replicas)
    assert replicas.step.shape == (3,) and metrics["loss"].shape == (3, 5)
    for r in range(3):
        single = init_state(model, opt, data[0][0], seed=r, impl=THREEFRY)
        assert_trees_equal(jax.tree.map(lambda a, r=r: a[r], replicas), single)
        single, single_metrics = run(single)
        assert_trees_close(jax.tree.map(lambda a, r=r: a[r], trained), single)
        np.testing.assert_allclose(metrics["loss"][r], single_metrics["loss"], rtol=1e-5)


def test_vmapped_learning_rates_via_injected_hyperparams(data, injected):
    model, opt, run, run_replicas = injected
    rates = jnp.array([1e-3, 1e-2, 1e-1])
    # The same seed for every replica: only the learning rate differs.
    replicas = init_replicas(model, opt, data[0][0], jnp.zeros(3, jnp.int32), impl=THREEFRY)
    replicas = set_hyperparams(replicas, learning_rate=rates)
    trained, _ = run_replicas(replicas)
    for r in range(3):
        single = init_state(model, opt, data[0][0], seed=0, impl=THREEFRY)
        single, _ = run(set_hyperparams(single, learning_rate=rates[r]))
        assert_trees_close(jax.tree.map(lambda a, r=r: a[r], trained.params), single.params)
    # Adam moves each weight by about the learning rate per step: the replicas
    # really did train with different rates.
    moved = [
        float(
            optax.tree.norm(
                jax.tree.map(lambda a, b, r=r: a[r] - b[r], trained.params, replicas.params)
            )
        )
        for r in range(3)
    ]
    assert moved[0] < moved[1] < moved[2]
    with pytest.raises(ValueError, match="no injected hyperparameter named"):
        set_hyperparams(replicas, momentum=0.9)
