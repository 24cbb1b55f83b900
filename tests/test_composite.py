"""The composite mechanism: one forward function initializes and applies a layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet


def _two(*names):
    """A composite calling a dense child of width 3 under each name, summing them."""
    children = {n: fnnet.dense(3) for n in names}

    def forward(call, x):
        return sum(call(n, children[n], x) for n in names)

    return fnnet.composite(forward, "sum_of")


def test_child_keys_come_from_names_not_order():
    x = jnp.ones((4,))
    key = jax.random.key(0)
    base = _two("a", "b").init(key, x)
    more = _two("c", "b", "z", "a").init(key, x)
    for name in ("a", "b"):
        np.testing.assert_array_equal(base[name]["w"], more[name]["w"])
    assert not np.array_equal(base["a"]["w"], base["b"]["w"])


def test_init_under_jit_and_vmap_equals_eager_init():
    model = fnnet.models.transformer_lm(20, features=16, depth=2, max_len=8)
    x = jnp.zeros((5,), jnp.int32)
    # threefry: rbg bits under vmap differ from a loop's (see conftest.py)
    keys = jax.random.split(jax.random.key(3, impl="threefry2x32"), 2)
    eager = [model.init(k, x) for k in keys]
    jitted = jax.jit(model.init)(keys[0], x)
    vmapped = jax.jit(jax.vmap(model.init, in_axes=(0, None)))(keys, x)  # one program
    same = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)  # XLA may fuse
    jax.tree.map(same, eager[0], jitted)
    for i, params in enumerate(eager):
        jax.tree.map(same, params, jax.tree.map(lambda a, i=i: a[i], vmapped))


def test_init_reads_shapes_only():
    model = fnnet.models.cnn(3, (4,), hidden=(5,))
    params = model.init(jax.random.key(0), jax.ShapeDtypeStruct((12, 2), jnp.float32))
    assert params["hidden_0"]["w"].shape == (6 * 4, 5)  # the flatten size, found by init


def test_same_name_twice_ties_the_parameters():
    table = fnnet.embedding(7, 4)

    def forward(call, ids):
        return call("embed", table, call("embed", table, ids), transpose=True)

    model = fnnet.composite(forward, "tied")
    ids = jnp.array([1, 2, 3])
    params = model.init(jax.random.key(0), ids)
    assert jax.tree.map(jnp.shape, params) == {"embed": {"table": (7, 4)}}
    expected = params["embed"]["table"][ids] @ params["embed"]["table"].T
    np.testing.assert_allclose(model.apply(params, ids), expected, rtol=1e-6)


def test_one_name_for_two_layers_is_an_error():
    a, b = fnnet.dense(3), fnnet.dense(3)
    model = fnnet.composite(lambda call, x: call("h", b, call("h", a, x)), "clash")
    with pytest.raises(fnnet.LayerError, match="'h' is called with two different layers"):
        model.init(jax.random.key(0), jnp.ones((3,)))


def test_a_stateful_child_needs_a_stateful_composite():
    norm = fnnet.batch_norm()
    model = fnnet.composite(lambda call, x: call("norm", norm, x), "forgot")
    with pytest.raises(fnnet.LayerError, match="stateful=True"):
        model.init(jax.random.key(0), jnp.ones((3,)))


def test_params_with_an_unknown_child_are_refused():
    model = _two("a")
    params = model.init(jax.random.key(0), jnp.ones((4,)))
    params["extra"] = {"w": jnp.ones((4, 3))}
    with pytest.raises(fnnet.LayerError, match=r"no child named \['extra'\]"):
        model.apply(params, jnp.ones((4,)))


def test_a_missing_child_names_its_path():
    model = fnnet.serial(outer=_two("a", "b"))
    params = model.init(jax.random.key(0), jnp.ones((4,)))
    del params["outer"]["b"]
    with pytest.raises(fnnet.LayerError, match="outer/b"):
        model.apply(params, jnp.ones((4,)))


def test_unknown_keyword_input_is_an_error_not_ignored():
    model = fnnet.models.transformer_classifier(3, features=8, depth=1, num_heads=2)
    x = jnp.ones((6,))
    params = model.init(jax.random.key(0), x)
    with pytest.raises(fnnet.LayerError, match=r"unknown keyword input\(s\) \['maks'\]"):
        model.apply(params, x, maks=jnp.ones((6,), bool))
    stack = fnnet.serial(fnnet.dense(3), fnnet.relu())
    p = stack.init(jax.random.key(0), x)
    with pytest.raises(fnnet.LayerError, match="no layer inside takes"):
        stack.apply(p, x, mask=jnp.ones((6,), bool))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda b: fnnet.serial(block=b),
        lambda b: fnnet.residual(fnnet.serial(block=b)),
        lambda b: fnnet.parallel(one=b, merge="sum"),
        lambda b: fnnet.repeat(b, 1),
    ],
    ids=["serial", "residual", "parallel", "repeat"],
)
def test_keyword_inputs_flow_through_every_combinator(wrap):
    """A mask given to the combinator reaches the attention inside it."""
    block = fnnet.transformer_block(2)
    model = wrap(block)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    mask = jnp.array([True, True, True, False, False])
    params = model.init(jax.random.key(0), x)
    with_mask = model.apply(params, x, mask=mask)
    without = model.apply(params, x)
    assert not np.allclose(with_mask, without)
    # The masked positions do not influence the valid ones.
    changed = x.at[3:].set(100.0)
    np.testing.assert_allclose(
        model.apply(params, changed, mask=mask)[:3], with_mask[:3], rtol=1e-5, atol=1e-5
    )


def test_train_and_key_reach_every_child():
    model = fnnet.serial(hidden=fnnet.dense(16), drop=fnnet.dropout(0.5))
    x = jnp.ones((4,))
    params = model.init(jax.random.key(0), x)
    np.testing.assert_array_equal(model.apply(params, x), model.apply(params, x, train=False))
    a = model.apply(params, x, key=jax.random.key(1), train=True)
    b = model.apply(params, x, key=jax.random.key(2), train=True)
    assert np.any(np.asarray(a) == 0) and not np.array_equal(a, b)


def test_state_is_threaded_by_the_mechanism():
    net = fnnet.models.cnn(2, (3,), norm="batch_norm", pool=None)
    x = jax.random.normal(jax.random.key(0), (8, 6))
    params, state = net.init(jax.random.key(1), x[0])
    apply = functools.partial(net.apply, train=True)
    _, new_state = jax.vmap(apply, (None, None, 0), (0, None), axis_name="batch")(params, state, x)
    assert set(new_state) == {"norm_0"}
    assert not np.allclose(new_state["norm_0"]["mean"], state["norm_0"]["mean"])


def test_composite_advertises_its_keyword_inputs():
    import inspect

    model = fnnet.models.rnn(2, 3)
    parameters = inspect.signature(model.apply).parameters
    assert [p for p in parameters if parameters[p].kind is inspect.Parameter.KEYWORD_ONLY] == [
        "key",
        "train",
        "lengths",
        "mask",
    ]


def _deep_stack(remat, *, n=8, width=64):
    block = fnnet.residual(fnnet.serial(fnnet.layer_norm(), fnnet.dense(width), fnnet.gelu()))
    return fnnet.repeat(block, n, remat=remat)


def _loss_and_grad(model, params, x, key=None):
    def loss(params, x):
        y = jax.vmap(lambda e: model.apply(params, e, key=key, train=key is not None))(x)
        return jnp.mean(jnp.sin(y))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("remat", [True, "dots_saveable", jax.checkpoint_policies.nothing_saveable])
def test_repeat_with_remat_equals_repeat_and_holds_less(remat):
    # A stack of 8 residual blocks over a batch of 16 sequences of 32: without remat
    # the backward pass keeps every copy's activations; with it, one copy's at a time.
    x = jax.random.normal(jax.random.key(1), (16, 32, 64))
    plain, rematted = _deep_stack(False), _deep_stack(remat)
    params = plain.init(jax.random.key(0), x[0])
    assert jax.tree.structure(params) == jax.tree.structure(rematted.init(jax.random.key(0), x[0]))
    want = _loss_and_grad(plain, params, x)(params, x)
    got = _loss_and_grad(rematted, params, x)(params, x)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)

    def temp_bytes(model):
        compiled = _loss_and_grad(model, params, x).lower(params, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    if remat != "dots_saveable":  # it keeps the products, so it saves less here
        assert temp_bytes(rematted) < 0.6 * temp_bytes(plain)
    else:
        assert temp_bytes(rematted) < temp_bytes(plain)


def test_repeat_with_remat_keeps_dropout_and_state():
    # A recomputed forward pass must draw the same dropout masks; BatchNorm's state
    # still comes out of the scan.
    x = jax.random.normal(jax.random.key(1), (4, 6, 16))
    block = fnnet.residual(fnnet.serial(fnnet.dense(16), fnnet.dropout(0.5)))
    key = jax.random.key(7)
    plain, rematted = fnnet.repeat(block, 3), fnnet.repeat(block, 3, remat=True)
    params = plain.init(jax.random.key(0), x[0])
    want = _loss_and_grad(plain, params, x, key)(params, x)
    got = _loss_and_grad(rematted, params, x, key)(params, x)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    norm = fnnet.serial(fnnet.dense(16), fnnet.batch_norm(axis_name="batch"))
    stateful = fnnet.repeat(norm, 2, remat=True)
    p, s = stateful.init_with_state(jax.random.key(0), x[0, 0])
    _, new = jax.vmap(
        lambda e: stateful.apply_with_state(p, s, e, train=True), axis_name="batch",
        out_axes=(0, None),
    )(x[:, 0])  # fmt: skip
    assert jax.tree.structure(new) == jax.tree.structure(s)
    assert not np.allclose(jax.tree.leaves(new)[0], jax.tree.leaves(s)[0])


@pytest.mark.parametrize(
    "remat, message",
    [("dots", "is not a policy name"), (3, "remat must be True, False")],
)
def test_a_bad_remat_is_an_error_naming_it(remat, message):
    with pytest.raises(fnnet.LayerError, match=message):
        fnnet.repeat(fnnet.dense(4), 2, remat=remat)
