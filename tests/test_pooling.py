"""Pooling and flatten against naive NumPy loops, plus error messages."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet


def naive_pool(x, window, strides, pads, reduce, count_include_pad=True):
    """Pools a channels-last ``x`` window by window; padded cells are NaN and skipped."""
    padded = np.pad(x.astype(np.float64), [*pads, (0, 0)], constant_values=np.nan)
    sizes = zip(padded.shape[:-1], window, strides, strict=True)
    out_shape = [(n - w) // s + 1 for n, w, s in sizes]
    out = np.zeros((*out_shape, x.shape[-1]))
    for idx in itertools.product(*map(range, out_shape)):
        starts = [i * s for i, s in zip(idx, strides, strict=True)]
        cells = padded[tuple(slice(a, a + w) for a, w in zip(starts, window, strict=True))]
        cells = cells.reshape(-1, x.shape[-1])
        real = cells[~np.isnan(cells[:, 0])]
        if reduce == "max":
            out[idx] = real.max(axis=0)
        else:
            out[idx] = real.sum(axis=0) / (len(cells) if count_include_pad else len(real))
    return out


CASES = {
    # name: (layer, example shape, window, strides, (lo, hi) pads, reduce, count_include_pad)
    "max_2d_default": (fnnet.max_pool(2), (5, 4, 3), (2, 2), (2, 2), [(0, 0)] * 2, "max", True),
    "max_1d_same_overlap": (
        fnnet.max_pool(3, strides=1, padding="SAME"),
        (6, 2),
        (3,),
        (1,),
        [(1, 1)],
        "max",
        True,
    ),
    "max_2d_explicit": (
        fnnet.max_pool((2, 3), strides=(1, 2), padding=((1, 0), (1, 1))),
        (4, 5, 2),
        (2, 3),
        (1, 2),
        [(1, 0), (1, 1)],
        "max",
        True,
    ),
    "avg_2d_default": (
        fnnet.avg_pool((2, 2)),
        (4, 5, 3),
        (2, 2),
        (2, 2),
        [(0, 0)] * 2,
        "avg",
        True,
    ),
    "avg_1d_same_include_pad": (
        fnnet.avg_pool(3, strides=2, padding="SAME"),
        (7, 2),
        (3,),
        (2,),
        [(1, 1)],
        "avg",
        True,
    ),
    "avg_1d_same_exclude_pad": (
        fnnet.avg_pool(4, strides=1, padding="SAME", count_include_pad=False),
        (5, 2),
        (4,),
        (1,),
        [(1, 2)],
        "avg",
        False,
    ),
    "avg_3d_int_window": (
        fnnet.avg_pool(2, strides=1),
        (3, 3, 3, 1),
        (2, 2, 2),
        (1, 1, 1),
        [(0, 0)] * 3,
        "avg",
        True,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_window_pools_match_numpy(name, rng):
    layer, shape, window, strides, pads, reduce, include = CASES[name]
    x = rng.standard_normal(shape).astype(np.float32)
    assert layer.init(jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32)) == {}
    y = layer.apply({}, jnp.asarray(x))
    expected = naive_pool(x, window, strides, pads, reduce, include)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_max_pool_of_negative_values_ignores_padding():
    y = fnnet.max_pool(3, strides=1, padding="SAME").apply({}, -jnp.ones((3, 1)))
    np.testing.assert_array_equal(y, -np.ones((3, 1)))


def test_max_pool_keeps_integer_dtype():
    x = jnp.array([[-5], [-7], [3], [-9]], jnp.int32)
    y = fnnet.max_pool(2, padding=((1, 1),)).apply({}, x)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(y[:, 0], [-5, 3, -9])


def test_global_pools_and_flatten_match_numpy(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(
        fnnet.global_avg_pool().apply({}, jnp.asarray(x)), x.mean(axis=(0, 1)), rtol=1e-5
    )
    np.testing.assert_array_equal(
        fnnet.global_max_pool().apply({}, jnp.asarray(x)), x.max(axis=(0, 1))
    )
    np.testing.assert_array_equal(fnnet.flatten().apply({}, jnp.asarray(x)), x.reshape(-1))
    for layer in (fnnet.global_avg_pool(), fnnet.global_max_pool(), fnnet.flatten()):
        assert layer.init(jax.random.key(0), jnp.asarray(x)) == {}


def test_pool_then_flatten_infers_the_size():
    model = fnnet.serial(fnnet.max_pool(2), fnnet.flatten())
    x = jnp.ones((6, 4, 2))
    assert model.apply(model.init(jax.random.key(0), x), x).shape == (3 * 2 * 2,)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fnnet.max_pool(0), "window must be positive"),
        (lambda: fnnet.max_pool((2, 2), strides=(1,)), "strides must have 2 entries"),
        (lambda: fnnet.avg_pool(2, padding="CAUSAL"), "padding must be one of"),
        (lambda: fnnet.avg_pool("2"), "window must be a positive int"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(make, match):
    with pytest.raises(fnnet.LayerError, match=match):
        make()


@pytest.mark.parametrize(
    ("layer", "shape", "match"),
    [
        (fnnet.max_pool((2, 2)), (4, 2), r"expected one example \(\*spatial, channels\) with 2"),
        (fnnet.max_pool(2), (3,), "with at least one spatial axis"),
        (fnnet.avg_pool(5), (4, 4, 1), "window of size 5 on spatial axis 0 is larger"),
        (fnnet.global_avg_pool(), (3,), "at least one spatial axis"),
        (fnnet.global_max_pool(), (), "at least one spatial axis"),
    ],
)
def test_bad_example_fails(layer, shape, match):
    with pytest.raises(fnnet.LayerError, match=match):
        layer.init(jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    with pytest.raises(fnnet.LayerError, match=match):
        layer.apply({}, jnp.ones(shape))


def test_avg_pool_rejects_integers():
    with pytest.raises(fnnet.LayerError, match="expected a floating input"):
        fnnet.avg_pool(2).apply({}, jnp.ones((4, 1), jnp.int32))
