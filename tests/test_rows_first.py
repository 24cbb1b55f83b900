"""Products over many rows taken over one (``fnnet._src.cpu_layout.rows_first_dots``),
and the training step that differentiates through them (``make_train_step(rows_first=)``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnnet
from fnnet._src.cpu_layout import rows_first_dots
from fnnet.train import init_state, make_train_step, softmax_cross_entropy

SEQ, WIDTH, HEADS = 6, 8, 2


def assert_trees_close(a, b, tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _contractions(jaxpr):
    """Every dot_general without batch axes, at any depth: how many leading axes of
    both operands it contracts (2 for a weight gradient over (batch, seq), the form
    XLA:CPU runs slowly; 1 over merged rows; 0 for a product over trailing axes)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is jax.lax.dot_general_p:
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            if not lb:
                lead = 0
                while lead in lc and lead in rc and lc.index(lead) == rc.index(lead):
                    lead += 1
                out.append(lead)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _contractions(sub)
    return out


def _layers(params, x):
    """A dense layer, attention's two projections (features to heads, heads to
    features), in a jit inside a scan: one example, ``x`` of shape (seq, width)."""
    dense = fnnet.dense(WIDTH)

    def body(h, w):
        h = jnp.tanh(dense.apply(w, h))
        q = jnp.einsum("sf,fhd->shd", h, params["qkv"])  # (seq, heads, head_dim)
        return jax.jit(lambda q: jnp.einsum("shd,hdo->so", q, params["out"]))(q), None

    h, _ = jax.lax.scan(body, x, params["dense"])
    return jnp.sum(jnp.sin(h))


@pytest.fixture(scope="module")
def layers():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "dense": jax.vmap(lambda k: fnnet.dense(WIDTH).init(k, jnp.zeros(WIDTH)))(keys[:2]),
        "qkv": jax.random.normal(keys[2], (WIDTH, HEADS, WIDTH // HEADS)) / 3,
        "out": jax.random.normal(keys[3], (HEADS, WIDTH // HEADS, WIDTH)) / 3,
    }
    x = jax.random.normal(jax.random.key(1), (5, SEQ, WIDTH))  # a batch of 5 sequences
    return params, x


def _batched(f):
    return lambda params, x: jnp.mean(jax.vmap(f, (None, 0))(params, x))


def test_rows_first_keeps_values_gradients_and_forward_mode(layers):
    params, x = layers
    loss = _batched(_layers)
    fast = rows_first_dots(loss)
    assert_trees_close(jax.jit(fast)(params, x), loss(params, x), tol=1e-6)
    assert_trees_close(jax.jit(jax.grad(fast))(params, x), jax.grad(loss)(params, x), tol=1e-5)
    # Unlike a custom_vjp, the rewrite keeps forward mode and second derivatives.
    tangent = jax.tree.map(jnp.ones_like, params)
    assert_trees_close(
        jax.jvp(lambda p: fast(p, x), (params,), (tangent,)),
        jax.jvp(lambda p: loss(p, x), (params,), (tangent,)),
        tol=1e-5,
    )
    hess = jax.hessian(lambda q: fast({**params, "qkv": q}, x))(params["qkv"])
    want = jax.hessian(lambda q: loss({**params, "qkv": q}, x))(params["qkv"])
    assert_trees_close(hess, want, tol=1e-4)


def test_rows_first_leaves_every_weight_gradient_one_contracted_axis(layers):
    params, x = layers
    loss = _batched(_layers)
    before = _contractions(jax.make_jaxpr(jax.grad(loss))(params, x).jaxpr)
    after = _contractions(jax.make_jaxpr(jax.grad(rows_first_dots(loss)))(params, x).jaxpr)
    # Without the rewrite, the weight gradients contract over (batch, seq).
    assert before.count(2) == 3
    assert max(after) == 1 and after.count(1) == 3
    assert len(after) == len(before)  # the same products, none added or dropped


def test_rows_first_leaves_other_products_alone():
    def f(x, w, v):
        a = x @ w  # one row axis, one contracted axis: nothing to merge
        b = jnp.einsum("bij,bjk->bik", v, v)  # batch axes: left to XLA
        c = jnp.einsum("ij,ki->jk", w, w)  # the contracted axis is not the last
        return a, b, c

    args = (jnp.ones((3, 4)), jnp.ones((4, 4)), jnp.ones((2, 4, 4)))
    eqns = jax.make_jaxpr(rows_first_dots(f))(*args).jaxpr.eqns
    assert [e.primitive.name for e in eqns] == [
        e.primitive.name for e in jax.make_jaxpr(f)(*args).jaxpr.eqns
    ]
    assert_trees_close(rows_first_dots(f)(*args), f(*args), tol=0)


def test_a_transformer_step_with_rows_first_trains_like_one_without():
    model = fnnet.models.transformer_classifier(
        3, features=WIDTH, depth=2, num_heads=HEADS, patch_size=2
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 12)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 3, 16).astype(np.int32))
    # Plain SGD: Adam would scale the key biases' gradients, zero but for rounding
    # (softmax ignores a shift shared by every key), up to full-size steps.
    tx = optax.sgd(0.1)
    states, losses = {}, {}
    for rows_first in (False, True):
        step = jax.jit(make_train_step(model, tx, softmax_cross_entropy, rows_first=rows_first))
        state = init_state(model, tx, x[0], seed=0)
        history = []
        for _ in range(3):
            state, metrics = step(state, (x, y))
            history.append(float(metrics["loss"]))
        states[rows_first], losses[rows_first] = state, history
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert_trees_close(states[True].params, states[False].params, tol=1e-5)
    # The rewritten step really differentiates one-axis products.
    jaxpr = jax.make_jaxpr(make_train_step(model, tx, softmax_cross_entropy, rows_first=True))(
        states[True], (x, y)
    ).jaxpr
    assert max(_contractions(jaxpr)) == 1
    jaxpr = jax.make_jaxpr(make_train_step(model, tx, softmax_cross_entropy, rows_first=False))(
        states[True], (x, y)
    ).jaxpr
    assert 2 in _contractions(jaxpr)


def test_rows_first_must_be_a_bool_or_none():
    model = fnnet.dense(2)
    with pytest.raises(TypeError, match="rows_first must be True, False or None, got 'yes'"):
        make_train_step(model, optax.sgd(0.1), softmax_cross_entropy, rows_first="yes")
