"""Losses and metrics for one example: NumPy references, gradients, shapes and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fnnet.train._losses import (
    LabelError,
    binary_cross_entropy,
    mean_squared_error,
    softmax_cross_entropy,
)
from fnnet.train._metrics import accuracy, top_k_accuracy


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_cross_entropy(logits, q):
    return float(np.mean(-(np.asarray(q, np.float64) * _np_log_softmax(logits)).sum(axis=-1)))


def _f32(a):
    return jnp.asarray(a, jnp.float32)


# --- softmax cross entropy ------------------------------------------------------


def test_softmax_cross_entropy_matches_numpy_for_ids_one_hot_and_probabilities(rng):
    logits = rng.standard_normal(5) * 3
    expected = -_np_log_softmax(logits)[2]
    np.testing.assert_allclose(softmax_cross_entropy(_f32(logits), 2), expected, rtol=1e-6)
    one_hot = np.eye(5)[2]
    np.testing.assert_allclose(
        softmax_cross_entropy(_f32(logits), _f32(one_hot)), expected, rtol=1e-6
    )
    q = rng.dirichlet(np.ones(5))
    np.testing.assert_allclose(
        softmax_cross_entropy(_f32(logits), _f32(q)), _np_cross_entropy(logits, q), rtol=1e-6
    )


def test_label_smoothing_follows_szegedy(rng):
    """q = (1 - a) * one_hot + a / classes, for class ids and one-hot labels alike."""
    logits = rng.standard_normal(4)
    a = 0.1
    q = (1 - a) * np.eye(4)[1] + a / 4
    expected = _np_cross_entropy(logits, q)
    for label in (jnp.int32(1), _f32(np.eye(4)[1])):
        got = softmax_cross_entropy(_f32(logits), label, label_smoothing=a)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # With perfect logits the smoothed loss stays above the entropy of q: no certainty.
    assert softmax_cross_entropy(_f32([0.0, 50.0, 0.0, 0.0]), 1, label_smoothing=a) > 1.0


def test_per_step_cross_entropy_is_the_mean_over_steps(rng):
    logits = rng.standard_normal((6, 7))
    labels = rng.integers(0, 7, 6)
    expected = np.mean(-_np_log_softmax(logits)[np.arange(6), labels])
    got = softmax_cross_entropy(_f32(logits), jnp.asarray(labels, jnp.int32))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    one_hot = np.eye(7)[labels]
    np.testing.assert_allclose(
        softmax_cross_entropy(_f32(logits), _f32(one_hot)), expected, rtol=1e-6
    )
    assert got.shape == ()


def test_cross_entropy_is_float32_for_bfloat16_logits_and_large_logits_are_exact():
    logits = jnp.asarray([1000.0, 0.0, -1000.0], jnp.bfloat16)
    loss = softmax_cross_entropy(logits, 1)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, 1000.0, rtol=1e-6)


def test_out_of_range_class_ids_give_nan_not_a_wrong_class():
    logits = _f32([1.0, 2.0, 3.0])
    for bad in (3, -1):
        assert np.isnan(softmax_cross_entropy(logits, bad))
        assert np.isnan(softmax_cross_entropy(logits, bad, label_smoothing=0.1))
        assert accuracy(logits, bad) == 0.0


def test_cross_entropy_gradients():
    logits = _f32([0.3, -1.2, 2.0, 0.5])
    check_grads(lambda z: softmax_cross_entropy(z, 2), (logits,), order=2, modes=["rev"])
    check_grads(
        lambda z: softmax_cross_entropy(z, 2, label_smoothing=0.2),
        (logits,),
        order=2,
        modes=["rev"],
    )
    q = _f32([0.1, 0.2, 0.3, 0.4])
    check_grads(softmax_cross_entropy, (logits, q), order=2, modes=["rev"])
    # The analytic gradient: softmax(z) - q.
    grad = jax.grad(softmax_cross_entropy)(logits, q)
    np.testing.assert_allclose(grad, jax.nn.softmax(logits) - q, atol=1e-6)


@pytest.mark.parametrize(
    ("logits_shape", "label", "match"),
    [
        (
            (3, 4),
            jnp.int32(1),
            r"integer class label of shape \(\) needs logits of shape "
            r"\('classes',\), got logits of shape \(3, 4\); per-step .* shape \(3,\)",
        ),
        ((4,), jnp.zeros((2,), jnp.int32), r"needs logits of shape \(2, 'classes'\)"),
        ((4,), jnp.zeros((5,), jnp.float32), r"logits' shape \(4,\), got shape \(5,\)"),
        ((3, 4), jnp.zeros((4,), jnp.float32), r"logits' shape \(3, 4\), got shape \(4,\)"),
        ((), jnp.int32(0), "expected logits with a classes axis"),
    ],
)
def test_cross_entropy_and_accuracy_name_expected_and_actual_shapes(logits_shape, label, match):
    logits = jnp.zeros(logits_shape, jnp.float32)
    with pytest.raises(LabelError, match=match):
        softmax_cross_entropy(logits, label)
    with pytest.raises(LabelError, match=match):
        accuracy(logits, label)


def test_cross_entropy_rejects_bad_smoothing_and_integer_logits():
    with pytest.raises(LabelError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        softmax_cross_entropy(_f32([1.0, 2.0]), 0, label_smoothing=1.0)
    with pytest.raises(LabelError, match="floating-point logits, got dtype int32"):
        softmax_cross_entropy(jnp.asarray([1, 2]), 0)


# --- binary cross entropy and mean squared error --------------------------------


def test_binary_cross_entropy_matches_numpy_and_is_stable(rng):
    z = rng.standard_normal((3, 2)) * 4
    y = rng.integers(0, 2, (3, 2))
    p = 1 / (1 + np.exp(-z))
    expected = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    for label in (y.astype(np.float32), y.astype(np.int32), y.astype(bool)):
        got = binary_cross_entropy(_f32(z), jnp.asarray(label))
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    # One decision, scalar logits; a confident right answer costs ~0, a wrong one ~|z|.
    np.testing.assert_allclose(binary_cross_entropy(_f32(100.0), 1.0), 0.0, atol=1e-6)
    np.testing.assert_allclose(binary_cross_entropy(_f32(100.0), 0.0), 100.0, rtol=1e-6)


def test_mean_squared_error_matches_numpy(rng):
    a, b = rng.standard_normal((2, 4, 3))
    np.testing.assert_allclose(
        mean_squared_error(_f32(a), _f32(b)), np.mean((a - b) ** 2), rtol=1e-5
    )


def test_binary_cross_entropy_and_mse_gradients(rng):
    z = _f32(rng.standard_normal(5))
    y = _f32(rng.integers(0, 2, 5))
    check_grads(lambda z: binary_cross_entropy(z, y), (z,), order=2, modes=["rev"])
    t = _f32(rng.standard_normal(5))
    check_grads(mean_squared_error, (z, t), order=2, modes=["rev"])


def test_binary_cross_entropy_and_mse_reject_shape_mismatch():
    with pytest.raises(LabelError, match=r"binary_cross_entropy: expected a label of shape \(3,\)"):
        binary_cross_entropy(jnp.zeros(3), jnp.zeros((3, 1)))
    with pytest.raises(
        LabelError,
        match=r"mean_squared_error: expected a target of shape \(4, 1\) .* got shape \(4,\)",
    ):
        mean_squared_error(jnp.zeros((4, 1)), jnp.zeros(4))


# --- metrics ----------------------------------------------------------------------


def test_accuracy_and_top_k_match_numpy(rng):
    logits = rng.standard_normal((20, 6))
    labels = rng.integers(0, 6, 20)
    z, y = _f32(logits), jnp.asarray(labels, jnp.int32)
    acc = jax.vmap(accuracy)(z, y)
    np.testing.assert_array_equal(acc, (logits.argmax(-1) == labels).astype(np.float32))
    top3 = jax.vmap(lambda a, b: top_k_accuracy(a, b, 3))(z, y)
    ranks = (logits > logits[np.arange(20), labels][:, None]).sum(-1)
    np.testing.assert_array_equal(top3, (ranks < 3).astype(np.float32))
    np.testing.assert_array_equal(jax.vmap(lambda a, b: top_k_accuracy(a, b, 1))(z, y), acc)
    np.testing.assert_array_equal(jax.vmap(lambda a, b: top_k_accuracy(a, b, 6))(z, y), 1.0)
    # One-hot labels give the same answers as class ids.
    one_hot = _f32(np.eye(6)[labels])
    np.testing.assert_array_equal(jax.vmap(accuracy)(z, one_hot), acc)


def test_per_step_accuracy_is_the_fraction_of_steps_right():
    logits = _f32(np.eye(4)[[0, 1, 2, 3]])  # (seq=4, classes=4), predicts 0, 1, 2, 3
    labels = jnp.asarray([0, 1, 0, 0], jnp.int32)
    assert accuracy(logits, labels) == 0.5
    assert top_k_accuracy(logits, labels, 1) == 0.5
    assert accuracy(logits, labels.astype(jnp.uint8)) == 0.5


def test_ties_go_to_the_lowest_class_in_both_metrics():
    logits = _f32([1.0, 1.0, 0.0])
    assert accuracy(logits, 0) == 1.0 and accuracy(logits, 1) == 0.0
    assert top_k_accuracy(logits, 0, 1) == 1.0 and top_k_accuracy(logits, 1, 1) == 0.0


def test_top_k_rejects_a_bad_k():
    with pytest.raises(LabelError, match=r"k must be an integer in \[1, classes=3\], got 4"):
        top_k_accuracy(jnp.zeros(3), 0, 4)
    with pytest.raises(LabelError, match="got 0"):
        top_k_accuracy(jnp.zeros(3), 0, 0)


def test_losses_and_metrics_vmap_and_jit_over_a_batch(rng):
    """The engine's use: vmap one-example functions over the batch, inside jit."""
    logits = _f32(rng.standard_normal((8, 5)))
    labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)

    @jax.jit
    def batch_means(z, y):
        return (
            jnp.mean(jax.vmap(softmax_cross_entropy)(z, y)),
            jnp.mean(jax.vmap(accuracy)(z, y)),
        )

    loss, acc = batch_means(logits, labels)
    expected = np.mean(-_np_log_softmax(np.asarray(logits))[np.arange(8), np.asarray(labels)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(acc, np.mean(np.argmax(logits, -1) == labels))
