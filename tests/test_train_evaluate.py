"""Whole-dataset evaluation: equal weights, padding masked, one compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet.models as M
from fnnet._src.layer import Layer
from fnnet.train._evaluate import EvaluationError, _batch_sums_jit, evaluate
from fnnet.train._losses import softmax_cross_entropy
from fnnet.train._metrics import accuracy
from fnnet.train._precision import Policy

METRICS = {"loss": softmax_cross_entropy, "accuracy": accuracy}


def _data(rng, n, features=6, classes=4):
    x = jnp.asarray(rng.standard_normal((n, features)), jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
    return x, y


def _full_batch(model, params, state, x, y):
    """The reference: every example at once, plain means (jitted: eager ops compile one by one)."""

    @jax.jit
    def means(params, state, x, y):
        out = jax.vmap(lambda x: model.apply_with_state(params, state, x)[0])(x)
        return {name: jnp.mean(jax.vmap(fn)(out, y)) for name, fn in METRICS.items()}

    return {name: float(v) for name, v in means(params, state, x, y).items()}


@pytest.fixture(scope="module")
def mlp():
    # Dropout shows that evaluation runs with train=False: training mode would need a key.
    model = M.mlp(4, (8,), dropout_rate=0.5)
    return model, model.init(jax.random.key(0), jnp.zeros(6))


@pytest.mark.parametrize("n", [3, 13])
def test_evaluate_equals_a_full_batch_computation(mlp, rng, n):
    model, params = mlp
    x, y = _data(rng, n)
    got = evaluate(model, params, {}, (x, y), METRICS, batch_size=4)
    expected = _full_batch(model, params, {}, x, y)
    assert got.keys() == expected.keys()
    for name in METRICS:
        assert isinstance(got[name], float)
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)


def test_padding_is_masked_so_every_example_counts_once(mlp):
    """Padding repeats the last example; were it counted, the mean of y would move."""
    model, params = mlp
    n = 13
    x = jnp.zeros((n, 6), jnp.float32)
    y = jnp.arange(n, dtype=jnp.float32)
    got = evaluate(model, params, {}, (x, y), {"y": lambda out, y: y}, batch_size=4)
    assert got["y"] == (n - 1) / 2


def test_one_program_serves_every_dataset_size(rng):
    traces = []
    base = M.mlp(4, (8,))

    def apply(params, x, *, key=None, train=False):
        traces.append(jnp.shape(x))  # runs once per trace, never per example
        return base.apply(params, x, key=key, train=train)

    model = Layer(base.init, apply, "counting_mlp")
    params = model.init(jax.random.key(0), jnp.zeros(6))
    compiled_before = _batch_sums_jit._cache_size()
    results = [
        evaluate(model, params, {}, _data(rng, n), METRICS, batch_size=4) for n in (10, 13, 4)
    ]
    assert len(traces) == 1, traces
    assert _batch_sums_jit._cache_size() == compiled_before + 1
    assert all(set(r) == set(METRICS) for r in results)


def test_stateful_models_use_their_running_statistics(rng):
    model = M.cnn(4, (3,), norm="batch_norm", pool=None)
    x = jnp.asarray(rng.standard_normal((7, 5, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 7), jnp.int32)
    params, state = model.init(jax.random.key(0), x[0])
    state = jax.tree.map(lambda s: s + 0.5, state)  # statistics that differ from the batch's
    got = evaluate(model, params, state, (x, y), METRICS, batch_size=3)
    expected = _full_batch(model, params, state, x, y)
    for name in METRICS:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)


def test_evaluate_under_the_bfloat16_policy_is_close_to_float32(mlp, rng):
    model, params = mlp
    data = _data(rng, 9)
    f32 = evaluate(model, params, {}, data, {"loss": softmax_cross_entropy}, batch_size=4)
    bf16 = evaluate(
        model,
        params,
        {},
        data,
        {"loss": softmax_cross_entropy},
        batch_size=4,
        policy=Policy.bfloat16(),
    )
    np.testing.assert_allclose(bf16["loss"], f32["loss"], rtol=2e-2)


def test_evaluate_errors_say_what_is_wrong(mlp, rng):
    model, params = mlp
    x, y = _data(rng, 5)
    with pytest.raises(EvaluationError, match="batch_size must be a positive integer, got 0"):
        evaluate(model, params, {}, (x, y), METRICS, batch_size=0)
    with pytest.raises(EvaluationError, match=r"same leading example axis N.*\(5, 6\).*\(4,\)"):
        evaluate(model, params, {}, (x, y[:4]), METRICS, batch_size=2)
    with pytest.raises(EvaluationError, match=r"dataset is empty"):
        evaluate(model, params, {}, (x[:0], y[:0]), METRICS, batch_size=2)
    with pytest.raises(EvaluationError, match="dataset must be a pair"):
        evaluate(model, params, {}, x, METRICS, batch_size=2)
    with pytest.raises(EvaluationError, match="metric_fns is empty"):
        evaluate(model, params, {}, (x, y), {}, batch_size=2)
    with pytest.raises(
        EvaluationError, match=r"metric 'logits' must return a scalar per example, got shape \(4,\)"
    ):
        evaluate(model, params, {}, (x, y), {"logits": lambda out, y: out}, batch_size=2)
