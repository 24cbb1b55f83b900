"""Training on a mesh of 8 simulated CPU devices equals training on one device.

conftest.py gives the suite 8 CPU devices. Each architecture trains a few fused
steps unsharded and on the ``data=8`` mesh; the parameters agree within float32
rounding (the sharded program sums the batch in another order), and the state
and the batch drawn inside the program carry the shardings asked for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import fnnet
from fnnet import distributed, train

CLASSES = 3
BATCH = 16
STEPS = 2
TOL = {"rtol": 2e-5, "atol": 2e-6}


@pytest.fixture(scope="module")
def mesh():
    return distributed.mesh_from_spec("data=8")


def _data(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, *shape)).astype(np.float32)
    y = (np.arange(32) % CLASSES).astype(np.int32)
    return x, y


ARCHITECTURES = {
    "mlp": (lambda: fnnet.models.mlp(CLASSES, hidden=(16,)), (12, 2)),
    "cnn": (lambda: fnnet.models.cnn(CLASSES, (4, 8), pool=None), (12, 2)),
    "gru": (lambda: fnnet.models.rnn(CLASSES, hidden=8, cell="gru"), (12, 2)),
    "transformer": (
        lambda: fnnet.models.transformer_classifier(
            CLASSES, features=8, depth=1, num_heads=1, mlp_ratio=1, max_len=16
        ),
        (12, 2),
    ),
}


def _specs_of(tree):
    return [leaf.sharding for leaf in jax.tree.leaves(tree)]


def _assert_sharded_as(tree, specs, mesh):
    for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=_is_spec)):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (
            leaf.shape,
            leaf.sharding,
            spec,
        )


def _is_spec(x):
    return isinstance(x, P)


def _recording(step_fn, seen):
    """``step_fn`` that records the sharding XLA chose for the batch it receives."""

    def step(state, batch):
        jax.debug.inspect_array_sharding(batch[0], callback=seen.append)
        return step_fn(state, batch)

    return step


# Every architecture trains on the mesh; the transformer, with the most kinds of
# parameter (stacked blocks, norms, embeddings), under the FSDP rule: its small
# leaves stay replicated, so it checks both placements. Each case compiles two
# fused programs, the bulk of this file's time.
CASES = [("mlp", False), ("cnn", False), ("gru", False), ("transformer", True)]


@pytest.mark.parametrize(
    "name, fsdp", CASES, ids=[f"{n}-{'fsdp' if f else 'replicated'}" for n, f in CASES]
)
def test_sharded_training_matches_one_device(name, fsdp, mesh):
    build, shape = ARCHITECTURES[name]
    model = build()
    optimizer = optax.sgd(0.1, momentum=0.9)
    data = _data(shape)
    state = train.init_state(model, optimizer, data[0][0], seed=0)
    step = train.make_train_step(model, optimizer, train.softmax_cross_entropy)
    want, want_metrics = train.make_fused_steps(step, data, batch_size=BATCH, num_steps=STEPS)(
        state
    )

    rule = distributed.fsdp_rule(mesh, min_size=64) if fsdp else None
    placed = distributed.shard_state(state, mesh, rule)
    specs = distributed.state_specs(state, mesh, rule)
    _assert_sharded_as(placed, specs, mesh)
    seen = []
    run = distributed.make_sharded_steps(
        _recording(step, seen), data, mesh, rule=rule, batch_size=BATCH, num_steps=STEPS
    )
    got, got_metrics = run(placed)

    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL)
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], **TOL)
    _assert_sharded_as(got, specs, mesh)  # returned as placed, so the next call reuses the program
    assert seen, "the batch sharding was never inspected"
    batch_sharding = NamedSharding(mesh, P("data"))
    assert all(s.is_equivalent_to(batch_sharding, 1 + len(shape)) for s in seen), seen
    if fsdp:
        split = [s for s in jax.tree.leaves(specs.params, is_leaf=_is_spec) if s != P()]
        assert split, "the FSDP rule split no parameter"


def test_fsdp_rule_splits_large_parameters_and_their_optimizer_state(mesh):
    model = fnnet.models.mlp(CLASSES, hidden=(16,))
    state = train.init_state(model, optax.adam(1e-2), jnp.zeros(24), seed=0)
    specs = distributed.state_specs(state, mesh, distributed.fsdp_rule(mesh, min_size=64))
    # hidden_0/w is (24, 16): both divisible by 8, the larger (rows) is split;
    # out/w (16, 3) has 48 < 64 elements and the biases are small: replicated.
    assert specs.params == {
        "hidden_0": {"w": P("data"), "b": P()},
        "out": {"w": P(), "b": P()},
    }
    adam = specs.opt_state[0]
    assert adam.mu == specs.params and adam.nu == specs.params
    assert adam.count == P() and specs.step == P() and specs.key == P()


def test_regex_rule_and_its_errors(mesh):
    model = fnnet.models.mlp(CLASSES, hidden=(16,))
    state = train.init_state(model, optax.sgd(0.1), jnp.zeros(24), seed=0)
    rule = [(r"hidden_\d+/w$", P(None, "data")), (r"/b$", None)]
    assert distributed.state_specs(state, mesh, rule).params["hidden_0"] == {
        "w": P(None, "data"),
        "b": P(),
    }
    with pytest.raises(ValueError, match=r"'out/w'.*dimension 1 \(3\) cannot be split 8 ways"):
        distributed.state_specs(state, mesh, [(r"w$", P(None, "data"))])
    with pytest.raises(ValueError, match="mesh axis 'model' is not one of"):
        distributed.state_specs(state, mesh, [(r"w$", P("model"))])
    with pytest.raises(ValueError, match="more entries than the parameter has dimensions"):
        distributed.state_specs(state, mesh, [(r"b$", P(None, "data"))])
    with pytest.raises(TypeError, match="expected a jax.sharding.PartitionSpec"):
        distributed.state_specs(state, mesh, lambda path, shape: "data")
    with pytest.raises(TypeError, match=r"entries are \(regex, PartitionSpec\)"):
        distributed.state_specs(state, mesh, [r"w$"])
    with pytest.raises(TypeError, match="expected a fnnet.train.TrainState"):
        distributed.state_specs(state.params, mesh)


def test_data_parallel_gradient_is_the_full_batch_gradient(mesh):
    """One SGD step with learning rate 1 moves the params by exactly the gradient.

    A data-parallel step that summed the per-device mean gradients (instead of
    averaging them) would move them 8 times too far."""
    model = fnnet.models.mlp(CLASSES, hidden=(16,))
    x, y = _data((24,))
    x, y = x[:BATCH], y[:BATCH]
    state = train.init_state(model, optax.sgd(1.0), x[0], seed=0)

    def full_batch_loss(params):
        logits = jax.vmap(model.apply, in_axes=(None, 0))(params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    want = jax.grad(full_batch_loss)(state.params)
    step = distributed.sharded_step(
        train.make_train_step(model, optax.sgd(1.0), train.softmax_cross_entropy), mesh
    )
    batch = distributed.shard_data((x, y), mesh)
    assert batch[0].sharding == NamedSharding(mesh, P("data"))
    new, _ = jax.jit(step)(distributed.shard_state(state, mesh), batch)
    got = jax.tree.map(lambda old, new: old - new, state.params, new.params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_replicas_split_over_devices_match_replicas_on_one(mesh):
    model = fnnet.models.mlp(CLASSES, hidden=(8,))
    optimizer = optax.sgd(0.1)
    data = _data((24,))
    # threefry: the replicas here are vmapped, those on one device looped, and only
    # threefry draws the same bits either way (the suite's default, rbg, does not).
    replicas = train.init_replicas(model, optimizer, data[0][0], jnp.arange(8), impl="threefry2x32")
    step = train.make_train_step(model, optimizer, train.softmax_cross_entropy)
    want, _ = train.make_fused_steps(
        step, data, batch_size=BATCH, num_steps=STEPS, replicated=True
    )(replicas)

    placed = distributed.shard_state(replicas, mesh, replica_axis="data")
    assert placed.params["out"]["w"].sharding.spec == P("data")
    run = distributed.make_sharded_steps(
        step,
        data,
        mesh,
        batch_axis=None,
        replica_axis="data",
        batch_size=BATCH,
        num_steps=STEPS,
        replicated=True,
    )
    got, _ = run(placed)
    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL)
        assert b.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), b.ndim)
    with pytest.raises(ValueError, match="must divide the number of replicas"):
        distributed.shard_state(
            train.init_replicas(model, optimizer, data[0][0], jnp.arange(3)),
            mesh,
            replica_axis="data",
        )


def test_mesh_from_spec():
    mesh = distributed.mesh_from_spec("data=4,model=2")
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert dict(distributed.mesh_from_spec("data").shape) == {"data": 8}
    assert dict(distributed.mesh_from_spec("data=-1, model=2").shape) == {"data": 4, "model": 2}
    assert dict(distributed.mesh_from_spec({"data": 2}).shape) == {"data": 2}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=16", "needs 16 devices, but JAX sees 8"),
        ("data=x", "size 'x' of axis 'data' is not an integer"),
        ("data=0", "axis 'data' has size 0"),
        ("data=2,data=4", "names axis 'data' twice"),
        ("a=-1,b", "at most one axis"),
        ("1x=2", "is not an identifier"),
        ("data=-1,model=3", "does not divide the 8 devices"),
    ],
)
def test_mesh_from_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        distributed.mesh_from_spec(spec)


def test_sharded_step_refuses_explicit_meshes_and_uneven_batches(mesh):
    model = fnnet.models.mlp(CLASSES, hidden=(4,))
    step = train.make_train_step(model, optax.sgd(0.1), train.softmax_cross_entropy)
    explicit = distributed.mesh_from_spec("data=8", axis_types=(AxisType.Explicit,))
    with pytest.raises(ValueError, match=r"axes are of type Auto; \['data'\] are not"):
        distributed.sharded_step(step, explicit)
    x, y = _data((24,))
    state = train.init_state(model, optax.sgd(0.1), x[0], seed=0)
    with pytest.raises(ValueError, match="batch of 12 examples cannot be split evenly"):
        jax.eval_shape(distributed.sharded_step(step, mesh), state, (x[:12], y[:12]))
    with pytest.raises(ValueError, match="cannot be split over the 8 devices"):
        distributed.shard_data((x[:12], y[:12]), mesh)
    with pytest.raises(ValueError, match=r"sharded_step: axis 'batch' is not one of \('data',\)"):
        distributed.sharded_step(step, mesh, batch_axis="batch")


def test_process_rows_in_one_process():
    assert distributed.process_rows(10) == slice(0, 10)


def test_sharded_checkpoint_restores_with_its_shardings(mesh, tmp_path):
    model = fnnet.models.mlp(CLASSES, hidden=(16,))
    state = train.init_state(model, optax.adam(1e-2), jnp.zeros(24), seed=0)
    rule = distributed.fsdp_rule(mesh, min_size=64)
    placed = distributed.shard_state(state, mesh, rule)
    manager = train.CheckpointStore(tmp_path)
    manager.save(0, placed, metadata={})
    restored, _ = manager.restore(target=placed)
    assert _specs_of(restored) == _specs_of(placed)
    assert placed.params["hidden_0"]["w"].sharding.spec == P("data")  # really split
    np.testing.assert_array_equal(
        jax.random.key_data(restored.key), jax.random.key_data(placed.key)
    )
    for a, b in zip(jax.tree.leaves(placed.opt_state), jax.tree.leaves(restored.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain, _ = manager.restore()  # without a target: on the default device, as before
    assert plain.params["hidden_0"]["w"].sharding.num_devices == 1


def test_a_checkpoint_saved_on_eight_devices_restores_onto_four_and_onto_one(mesh, tmp_path):
    model = fnnet.models.mlp(CLASSES, hidden=(16,))
    state = train.init_state(model, optax.adam(1e-2), jnp.zeros(24), seed=0)
    saved = distributed.shard_state(state, mesh, distributed.fsdp_rule(mesh, min_size=64))
    manager = train.CheckpointStore(tmp_path)
    manager.save(0, saved, metadata={})
    four = distributed.mesh_from_spec("data=4", devices=jax.devices()[4:])
    for target in (
        distributed.shard_state(state, four, distributed.fsdp_rule(four, min_size=64)),
        jax.device_put(state, jax.devices()[3]),
    ):
        restored, _ = manager.restore(target=target)
        for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(restored)):
            assert b.sharding == a.sharding  # placed as the target is, not as saved
            np.testing.assert_array_equal(_raw(a), _raw(b))


def test_require_backend():
    assert distributed.require_backend("cpu") == jax.devices()
    for name in ("tpu", "gpu"):
        with pytest.raises(distributed.BackendError, match=f"asked for the {name} backend.*cpu"):
            distributed.require_backend(name)
    with pytest.raises(ValueError, match="must be one of"):
        distributed.require_backend("cuda")


def test_set_matmul_precision():
    old = distributed.set_matmul_precision("highest")
    try:
        assert jax.config.jax_default_matmul_precision == "highest"
        with pytest.raises(ValueError, match="'fast' is not a setting JAX knows"):
            distributed.set_matmul_precision("fast")
    finally:
        assert distributed.set_matmul_precision(old) == "highest"
    assert jax.config.jax_default_matmul_precision == old


def test_init_distributed_wants_all_three_or_none():
    with pytest.raises(ValueError, match="together, or none of them"):
        distributed.init_distributed("127.0.0.1:1234")


def test_a_constraint_inside_the_model_keeps_the_batch_split(mesh):
    # A layer written for one example that pins its activation's sharding (features
    # not split). Under the batch vmap without spmd_axis_name the constraint leaves
    # the batch dimension open, for XLA to choose (features, even); with it, as fit
    # passes it, the batch dimension is pinned to the mesh's data axis.
    def pinned(h):
        return jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P(None)))

    pin = fnnet.Layer(
        lambda key, h: {}, lambda params, h, *, key=None, train=False: pinned(h), "pin"
    )
    model = fnnet.serial(fnnet.dense(32), pin, fnnet.relu(), fnnet.dense(3))
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    y = (np.arange(64) % 3).astype(np.int32)
    opt = optax.sgd(0.1)

    def pinned_batch_dims(spmd_axis_name):
        step = train.make_train_step(
            model, opt, train.softmax_cross_entropy, spmd_axis_name=spmd_axis_name
        )
        state = distributed.shard_state(train.init_state(model, opt, x[0], seed=0), mesh)
        batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
        text = jax.jit(distributed.sharded_step(step, mesh)).lower(state, batch).as_text()
        # The constraint on the (batch 64, 32 features) activation, forward and backward.
        lines = [l for l in text.splitlines() if "sharding_constraint" in l and "64x32" in l]
        assert lines, "the activation's constraint is missing from the program"
        return {l.split("<@mesh, [")[1].split(",")[0] for l in lines}

    assert pinned_batch_dims(None) == {"{?}"}
    assert pinned_batch_dims("data") == {'{"data"}'}


def test_a_data_parallel_fused_program_gathers_neither_the_dataset_nor_the_batch(mesh):
    # fit's placement: the dataset replicated, the batch drawn inside the program and
    # split over the data axis. Each device cuts its own rows of the batch from its
    # own copy, so the compiled program moves no data between devices; only the
    # gradients (and the finiteness flags, the loss) are all-reduced.
    model = fnnet.models.mlp(CLASSES, hidden=(16,))
    data = _data((24,))
    opt = optax.adam(1e-2)
    step = train.make_train_step(model, opt, train.softmax_cross_entropy)
    placed = distributed.shard_state(train.init_state(model, opt, data[0][0], seed=0), mesh)
    for shuffle in (True, False):
        run = distributed.make_sharded_steps(
            step, distributed.replicate(data, mesh), mesh, batch_size=BATCH, num_steps=2,
            shuffle=shuffle,
        )  # fmt: skip
        text = run.lower(placed).compile().as_text()
        moved = [
            op for op in ("all-gather", "all-to-all", "collective-permute") if f" {op}(" in text
        ]
        assert not moved, f"shuffle={shuffle}: {moved}"
        assert " all-reduce(" in text  # the gradients' mean: the check sees the program


def test_an_fsdp_fused_program_keeps_parameters_and_optimizer_state_split(mesh):
    # What the compiled program holds per device: every large parameter and its Adam
    # moments stay split 8 ways in and out of the program. The gradients' sum over the
    # devices is where XLA:CPU differs from XLA:TPU/GPU: it all-reduces the whole
    # gradient and then slices each device's part (a reduce-scatter elsewhere), so
    # one gradient-sized temporary exists per device; docs/scaling.md says so.
    model = fnnet.models.mlp(CLASSES, hidden=(256, 256))
    data = _data((24,))
    opt = optax.adam(1e-2)
    rule = distributed.fsdp_rule(mesh, min_size=1024)
    step = train.make_train_step(model, opt, train.softmax_cross_entropy)
    placed = distributed.shard_state(train.init_state(model, opt, data[0][0], seed=0), mesh, rule)
    run = distributed.make_sharded_steps(
        step, distributed.replicate(data, mesh), mesh, rule=rule, batch_size=BATCH, num_steps=2
    )
    compiled = run.lower(placed).compile()
    specs = distributed.state_specs(placed, mesh, rule)
    state_out = compiled.output_shardings[0]
    for tree in ("params", "opt_state"):
        want = jax.tree.leaves(getattr(specs, tree), is_leaf=_is_spec)
        got = [s.spec for s in jax.tree.leaves(getattr(state_out, tree))]
        # (A leaf the rule leaves whole, XLA may return split; make_sharded_steps
        # places it back as it was.)
        assert [g for g, w in zip(got, want) if w != P()] == [w for w in want if w != P()], tree
        assert len(got) == len(want) and any(w != P() for w in want), tree
    split = [leaf for leaf in jax.tree.leaves(placed.params) if leaf.size >= 1024]
    assert split and all(leaf.addressable_shards[0].data.size == leaf.size // 8 for leaf in split)
    whole = sum(leaf.nbytes for leaf in jax.tree.leaves((placed.params, placed.opt_state)))
    assert compiled.memory_analysis().argument_size_in_bytes < whole / 4  # per device
    text = compiled.as_text()
    assert " reduce-scatter(" in text or (" all-reduce(" in text and " dynamic-slice(" in text)


def _raw(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def test_a_state_born_sharded_equals_the_state_split_after_and_no_device_holds_it_all(mesh):
    model = fnnet.models.mlp(CLASSES, hidden=(256, 256))
    opt = optax.adam(1e-3)
    x = jnp.zeros(128)
    rule = distributed.fsdp_rule(mesh, min_size=1024)

    def init():
        return train.init_state(model, opt, x, seed=3)

    want = distributed.shard_state(init(), mesh, rule)
    got = distributed.init_sharded(init, mesh, rule)
    _assert_sharded_as(got, distributed.state_specs(want, mesh, rule), mesh)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(_raw(a), _raw(b))
    # The program writes each device's shards only: its per-device output is about
    # an eighth of the state (the small leaves replicated), and it holds no copy.
    total = sum(_raw(a).nbytes for a in jax.tree.leaves(want))
    memory = jax.jit(init, out_shardings=distributed.state_sharding(want, mesh, rule))
    analysis = memory.lower().compile().memory_analysis()
    assert analysis.output_size_in_bytes < 0.2 * total
    assert analysis.temp_size_in_bytes < 0.2 * total

    seeds = list(range(8))
    replicas = distributed.init_sharded(
        lambda: train.init_replicas(model, opt, x, seeds), mesh, replica_axis="data"
    )
    split = distributed.shard_state(train.init_replicas(model, opt, x, seeds), mesh,
                                    replica_axis="data")  # fmt: skip
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(replicas)):
        np.testing.assert_array_equal(_raw(a), _raw(b))
        assert b.sharding.is_equivalent_to(a.sharding, a.ndim)
    with pytest.raises(TypeError, match="init must return a TrainState"):
        distributed.init_sharded(lambda: {"w": jnp.zeros(3)}, mesh)
