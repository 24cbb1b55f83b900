"""The layer protocol and the combinators: naming, composition, state, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet


def test_serial_names_children_by_keyword_or_kind():
    model = fnnet.serial(fnnet.dense(3), fnnet.relu(), fnnet.dense(2), out=fnnet.dense(1))
    params = model.init(jax.random.key(0), jnp.zeros(4))
    assert list(params) == ["dense_0", "dense_1", "out"]  # relu has no params: no entry


def test_serial_rejects_clashing_names_and_non_layers():
    with pytest.raises(fnnet.LayerError, match="unique"):
        fnnet.serial(fnnet.dense(3), dense_0=fnnet.dense(2))
    with pytest.raises(fnnet.LayerError, match="not a Layer"):
        fnnet.serial(hidden=jnp.tanh)
    with pytest.raises(fnnet.LayerError, match="at least one"):
        fnnet.serial()


def test_serial_equals_manual_composition(rng):
    a, b = fnnet.dense(5), fnnet.dense(2)
    model = fnnet.serial(a=a, act=fnnet.tanh(), b=b)
    x = jnp.asarray(rng.standard_normal(3), jnp.float32)
    p = model.init(jax.random.key(0), x)
    expected = b.apply(p["b"], jnp.tanh(a.apply(p["a"], x)))
    np.testing.assert_allclose(model.apply(p, x), expected, rtol=1e-6)


def test_residual_adds_input_and_checks_shape(rng):
    block = fnnet.dense(4)
    model = fnnet.residual(block)
    x = jnp.asarray(rng.standard_normal(4), jnp.float32)
    p = model.init(jax.random.key(0), x)
    np.testing.assert_allclose(model.apply(p, x), x + block.apply(p, x), rtol=1e-6)
    with pytest.raises(fnnet.LayerError, match=r"must keep the input shape \(4,\)"):
        fnnet.residual(fnnet.dense(3)).init(jax.random.key(0), x)


@pytest.mark.parametrize("merge", ["concat", "sum", "stack", "tuple"])
def test_parallel_merges(merge, rng):
    model = fnnet.parallel(a=fnnet.dense(3), b=fnnet.dense(3), merge=merge)
    x = jnp.asarray(rng.standard_normal(2), jnp.float32)
    p = model.init(jax.random.key(0), x)
    ya = fnnet.dense(3).apply(p["a"], x)
    yb = fnnet.dense(3).apply(p["b"], x)
    expected = {
        "concat": jnp.concatenate([ya, yb]),
        "sum": ya + yb,
        "stack": jnp.stack([ya, yb]),
        "tuple": (ya, yb),
    }[merge]
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), model.apply(p, x), expected
    )
    with pytest.raises(fnnet.LayerError, match="merge must be one of"):
        fnnet.parallel(fnnet.dense(2), merge="max")


def test_repeat_equals_a_loop_over_the_stacked_params(rng):
    block = fnnet.serial(lin=fnnet.dense(4), act=fnnet.tanh())
    model = fnnet.repeat(block, 3)
    x = jnp.asarray(rng.standard_normal(4), jnp.float32)
    p = model.init(jax.random.key(0), x)
    assert p["lin"]["w"].shape == (3, 4, 4)
    h = x
    for i in range(3):
        h = block.apply(jax.tree.map(lambda a, i=i: a[i], p), h)
    np.testing.assert_allclose(model.apply(p, x), h, rtol=1e-5)
    # the copies are initialized independently
    assert not np.allclose(p["lin"]["w"][0], p["lin"]["w"][1])
    with pytest.raises(fnnet.LayerError, match="n must be a positive integer"):
        fnnet.repeat(block, 0)


@pytest.mark.parametrize("n, unroll, loops", [(3, None, 0), (5, None, 1), (5, True, 0), (3, 1, 1)])
def test_repeat_unrolls_short_stacks(rng, n, unroll, loops):
    # Up to 4 copies by default there is no loop left in the program; a deeper
    # stack (or unroll=1) keeps one. Either way the result is the same.
    block = fnnet.serial(lin=fnnet.dense(4), act=fnnet.tanh())
    model = fnnet.repeat(block, n, unroll=unroll)
    x = jnp.asarray(rng.standard_normal(4), jnp.float32)
    p = model.init(jax.random.key(0), x)
    hlo = jax.jit(model.apply).lower(p, x).as_text()
    assert hlo.count("stablehlo.while") == loops
    looped = fnnet.repeat(block, n, unroll=1).apply(p, x)
    np.testing.assert_allclose(model.apply(p, x), looped, rtol=1e-6)
    with pytest.raises(fnnet.LayerError, match="unroll must be"):
        fnnet.repeat(block, n, unroll=0)


def test_stateful_child_makes_the_composite_stateful(rng):
    model = fnnet.serial(lin=fnnet.dense(3), norm=fnnet.batch_norm(), act=fnnet.relu())
    assert model.stateful and not fnnet.serial(lin=fnnet.dense(3)).stateful
    xs = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
    params, state = model.init(jax.random.key(0), xs[0])
    assert set(state) == {"norm"}
    ys, new_state = jax.vmap(
        lambda x: model.apply(params, state, x, train=True), axis_name="batch", out_axes=(0, None)
    )(xs)
    assert ys.shape == (5, 3)
    assert not np.allclose(new_state["norm"]["mean"], state["norm"]["mean"])


def test_errors_name_the_path_of_the_failing_layer():
    model = fnnet.serial(encoder=fnnet.serial(hidden=fnnet.dense(4), out=fnnet.dense(2)))
    params = model.init(jax.random.key(0), jnp.zeros(3))
    with pytest.raises(fnnet.LayerError, match="'encoder/hidden'") as err:
        model.apply(params, jnp.zeros(5))
    assert err.value.path == "encoder/hidden"
    assert "3" in err.value.message and "5" in err.value.message


def test_missing_params_name_the_path():
    model = fnnet.serial(encoder=fnnet.serial(hidden=fnnet.dense(4)))
    params = model.init(jax.random.key(0), jnp.zeros(3))
    del params["encoder"]["hidden"]["b"]
    with pytest.raises(fnnet.LayerError, match=r"params at 'encoder/hidden': missing key 'b'"):
        model.apply(params, jnp.zeros(3))


def test_foreign_exceptions_get_a_note_with_the_path():
    def boom(x):
        raise TypeError("custom layer bug")

    model = fnnet.serial(outer=fnnet.serial(inner=fnnet.fn(boom, kind="boom")))
    with pytest.raises(TypeError) as err:
        model.init(jax.random.key(0), jnp.zeros(2))
    assert "raised inside fnnet layer 'outer/inner'" in "".join(err.value.__notes__)


def test_layers_compose_with_jax_transformations_without_wrappers(rng):
    model = fnnet.serial(a=fnnet.dense(4), act=fnnet.relu(), b=fnnet.dense(1))
    xs = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    params = model.init(jax.random.key(0), xs[0])

    def loss(p):
        return jnp.mean(jax.vmap(model.apply, in_axes=(None, 0))(p, xs) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)

    def body(h, _):  # a layer inside lax.scan, params closed over
        return jnp.tanh(model.apply(params, jnp.concatenate([h, h, h]))), None

    h, _ = jax.lax.scan(body, jnp.zeros(1), None, length=4)
    assert h.shape == (1,)
