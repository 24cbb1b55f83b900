"""Mixed precision: what each cast touches, and every model family under bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet.models as M
from fnnet.train._losses import softmax_cross_entropy
from fnnet.train._precision import Policy, apply_with_policy, policy_for_backend

# Measured on these tiny models: ||bf16 - f32|| / ||f32|| of the logits is 4e-3 to 7e-3
# (bfloat16 keeps 8 bits of mantissa, a relative step of 2**-8 = 3.9e-3).
LOGITS_RTOL = 2e-2


def test_casts_touch_floating_leaves_only():
    policy = Policy.bfloat16()
    tree = {
        "w": jnp.ones((2, 3), jnp.float32),
        "ids": jnp.arange(3, dtype=jnp.int32),
        "flag": jnp.asarray(True),
        "key": jax.random.key(0),
    }
    for cast in (policy.cast_params, policy.cast_input):
        out = cast(tree)
        assert out["w"].dtype == jnp.bfloat16
        assert out["ids"].dtype == jnp.int32
        assert out["flag"].dtype == jnp.bool_
        assert out["key"] is tree["key"]
    back = policy.cast_output(policy.cast_params(tree))
    assert back["w"].dtype == jnp.float32 and back["ids"].dtype == jnp.int32
    stored = Policy(jnp.bfloat16, jnp.bfloat16, jnp.float32).cast_to_param(tree)
    assert stored["w"].dtype == jnp.bfloat16


def test_presets_and_backend_defaults():
    assert Policy() == Policy.float32() == Policy(jnp.float32, jnp.float32, jnp.float32)
    assert Policy.bfloat16() == Policy(jnp.float32, jnp.bfloat16, jnp.float32)
    assert policy_for_backend("cpu") == Policy.float32()
    for platform in ("gpu", "tpu", "GPU", "cuda"):
        assert policy_for_backend(platform) == Policy.bfloat16()
    assert policy_for_backend() == policy_for_backend(jax.default_backend())
    with pytest.raises(ValueError, match=r"unknown platform 'metal'.*'cpu', 'gpu'"):
        policy_for_backend("metal")


def test_bfloat16_policy_really_computes_in_bfloat16():
    model = M.mlp(3, (4,))
    x = jnp.ones(5, jnp.float32)
    params = model.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda p, x: apply_with_policy(model, Policy.bfloat16(), p, {}, x))(
        params, x
    )
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def _tokens(rng, n):
    return jnp.asarray(rng.integers(0, 11, (n, 6)), jnp.int32)


def _reals(*shape):
    return lambda rng, n: jnp.asarray(rng.standard_normal((n, *shape)), jnp.float32)


MODELS = {
    "mlp": (lambda: M.mlp(5, (16, 16)), _reals(12)),
    "cnn": (lambda: M.cnn(5, (4, 8)), _reals(8, 8, 1)),
    "rnn": (lambda: M.rnn(5, 8, cell="lstm"), _reals(6, 3)),
    "transformer_classifier": (
        lambda: M.transformer_classifier(5, features=8, depth=1, num_heads=2, vocab=11),
        _tokens,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_runs_under_bfloat16_close_to_float32(name, rng):
    make, data = MODELS[name]
    model = make()
    xs = data(rng, 8)
    ys = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    params = model.init(jax.random.key(0), xs[0])

    def logits(params, policy):
        return jax.vmap(lambda x: apply_with_policy(model, policy, params, {}, x)[0])(xs)

    f32, bf16 = jax.jit(lambda p: (logits(p, Policy.float32()), logits(p, Policy.bfloat16())))(
        params
    )
    assert bf16.dtype == jnp.float32
    rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert rel < LOGITS_RTOL, f"{name}: relative error of bf16 logits {rel:.2e}"

    # Gradients reach the float32 master params as float32 (shapes only: no compile).
    def loss(params):
        return jnp.mean(jax.vmap(softmax_cross_entropy)(logits(params, Policy.bfloat16()), ys))

    grads = jax.eval_shape(jax.grad(loss), params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_bfloat16_gradients_point_where_float32_gradients_point(rng):
    model = M.mlp(5, (16, 16))
    xs = jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    params = model.init(jax.random.key(0), xs[0])

    def loss(params, policy):
        out = jax.vmap(lambda x: apply_with_policy(model, policy, params, {}, x)[0])(xs)
        return jnp.mean(jax.vmap(softmax_cross_entropy)(out, ys))

    g32, gbf = jax.jit(
        lambda p: (jax.grad(loss)(p, Policy.float32()), jax.grad(loss)(p, Policy.bfloat16()))
    )(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(gbf))
    flat32, flatbf = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)]) for t in (g32, gbf))
    cosine = jnp.dot(flat32, flatbf) / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flatbf))
    assert cosine > 0.99, f"cosine of bf16 and f32 gradients {cosine:.4f}"


def test_batch_norm_statistics_stay_float32_under_bfloat16(rng):
    model = M.cnn(5, (4,), norm="batch_norm")
    xs = jnp.asarray(rng.standard_normal((8, 6, 6, 1)) * 2 + 1, jnp.float32)
    params, state = model.init(jax.random.key(0), xs[0])

    def step(policy):
        return jax.vmap(
            lambda x: apply_with_policy(model, policy, params, state, x, train=True),
            axis_name="batch",
            out_axes=(0, None),
        )(xs)

    y32, s32 = step(Policy.float32())
    ybf, sbf = step(Policy.bfloat16())
    assert ybf.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(sbf))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3), sbf, s32)
    assert np.linalg.norm(ybf - y32) / np.linalg.norm(y32) < LOGITS_RTOL
