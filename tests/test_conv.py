"""Convolution: parity with flax.linen.Conv after copying weights, and error messages."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet

# (fnnet factory, flax kwargs, example shape): 1D and 2D, strides, dilation, groups and
# every padding mode, including the MNIST-1D paper's PyTorch-style padding=1.
PARITY = {
    "1d_same": (lambda: fnnet.conv(5, 3), dict(kernel_size=(3,)), (9, 2)),
    "1d_valid_stride": (
        lambda: fnnet.conv1d(4, 3, strides=2, padding="VALID"),
        dict(kernel_size=(3,), strides=2, padding="VALID"),
        (9, 3),
    ),
    "1d_causal_dilated": (
        lambda: fnnet.conv1d(4, 3, padding="CAUSAL", dilation=2),
        dict(kernel_size=(3,), padding="CAUSAL", kernel_dilation=2),
        (8, 2),
    ),
    "1d_mnist1d_padding1": (
        lambda: fnnet.conv1d(6, 5, strides=2, padding=1),
        dict(kernel_size=(5,), strides=2, padding=1),
        (12, 1),
    ),
    "2d_same_stride_even_kernel": (
        lambda: fnnet.conv2d(3, (2, 4), strides=(2, 1)),
        dict(kernel_size=(2, 4), strides=(2, 1)),
        (5, 6, 2),
    ),
    "2d_groups_pairs": (
        lambda: fnnet.conv(6, (3, 3), groups=3, padding=((1, 0), (2, 1)), use_bias=False),
        dict(kernel_size=(3, 3), feature_group_count=3, padding=((1, 0), (2, 1)), use_bias=False),
        (5, 4, 3),
    ),
    "2d_dilated_valid": (
        lambda: fnnet.conv2d(2, 2, dilation=(2, 1), padding="VALID"),
        dict(kernel_size=(2, 2), kernel_dilation=(2, 1), padding="VALID"),
        (5, 4, 2),
    ),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_matches_flax_conv(name, rng):
    make, flax_kwargs, shape = PARITY[name]
    layer = make()
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    # Random weights (a nonzero bias too, so a misplaced bias would show); filling them from
    # the shapes alone skips compiling the initializers, which dominates the runtime here.
    structure = jax.eval_shape(layer.init, jax.random.key(0), x)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32)), structure
    )
    ref = nn.Conv(params["w"].shape[-1], **flax_kwargs)
    ref_structure = jax.eval_shape(ref.init, jax.random.key(1), x[None])["params"]
    names = {"w": "kernel", "b": "bias"}
    assert jax.tree.map(jnp.shape, ref_structure) == {names[k]: v.shape for k, v in params.items()}
    expected = ref.apply({"params": {names[k]: v for k, v in params.items()}}, x[None])[0]
    np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-5, atol=1e-5)


def test_mnist1d_output_length_follows_pytorch_formula():
    # floor((length + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1
    layer = fnnet.conv1d(25, 5, strides=2, padding=1)
    x = jax.ShapeDtypeStruct((40, 1), jnp.float32)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    y = jax.eval_shape(layer.apply, params, x)
    assert y.shape == ((40 + 2 - 4 - 1) // 2 + 1, 25)


def test_spatial_rank_comes_from_the_example():
    layer = fnnet.conv(4, 3)
    x = jax.ShapeDtypeStruct((5, 6, 7, 2), jnp.float32)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"w": (3, 3, 3, 2, 4), "b": (4,)}
    assert jax.eval_shape(layer.apply, params, x).shape == (5, 6, 7, 4)


def test_default_init_is_lecun_normal():
    layer = fnnet.conv2d(64, 3)
    w = jax.jit(layer.init)(jax.random.key(0), jnp.ones((8, 8, 32)))["w"]
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.std(w)), (3 * 3 * 32) ** -0.5, rtol=0.1)


def test_computes_in_the_input_dtype():
    layer = fnnet.conv1d(3, 3)
    x = jax.ShapeDtypeStruct((6, 2), jnp.bfloat16)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    assert params["w"].dtype == jnp.float32
    assert jax.eval_shape(layer.apply, params, x).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fnnet.conv(0, 3), "features must be a positive integer"),
        (lambda: fnnet.conv(4, (3, 0)), "kernel_size must be a positive int"),
        (lambda: fnnet.conv(4, 3.0), "kernel_size must be a positive int"),
        (lambda: fnnet.conv2d(4, 3, strides=0), "strides must be positive"),
        (lambda: fnnet.conv2d(4, 3, strides=(1, 2, 1)), "strides must have 2 entries"),
        (lambda: fnnet.conv2d(4, 3, dilation=(1, -1)), "dilation must be a positive int"),
        (lambda: fnnet.conv2d(4, 3, padding="FULL"), "padding must be one of"),
        (lambda: fnnet.conv2d(4, 3, padding="CAUSAL"), "'CAUSAL' needs one spatial axis"),
        (lambda: fnnet.conv2d(4, 3, padding=-1), "padding must be non-negative"),
        (lambda: fnnet.conv2d(4, 3, padding=((1, 1),)), "padding must have 2 entries"),
        (lambda: fnnet.conv1d(4, 3, padding=((1, 2, 3),)), "padding entries must be"),
        (lambda: fnnet.conv(5, 3, groups=2), r"features \(5\) must be divisible by groups"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(make, match):
    with pytest.raises(fnnet.LayerError, match=match):
        make()


@pytest.mark.parametrize(
    ("layer", "shape", "match"),
    [
        (fnnet.conv1d(4, 3), (5, 5, 2), r"expected one example \(length, channels\) of rank 2"),
        (fnnet.conv2d(4, 3), (5, 2), r"\(height, width, channels\) of rank 3"),
        (fnnet.conv(4, (3, 3)), (5, 2), "rank 3"),
        (fnnet.conv(4, 3), (2,), "at least one spatial axis"),
        (fnnet.conv1d(4, 5, padding="VALID"), (4, 2), r"window of size 5 .* larger than the pad"),
        (fnnet.conv1d(4, 3, dilation=3, padding=1), (4, 2), "window of size 7"),
        (fnnet.conv(4, 3, groups=2), (6, 3), r"input channels \(3\) must be divisible"),
        (fnnet.conv(4, 3, strides=(1, 2)), (6, 3), "strides .* has 2 entries but the input has 1"),
        (fnnet.conv(4, 3, padding="CAUSAL"), (6, 6, 3), "'CAUSAL' needs one spatial axis, got 2"),
    ],
)
def test_bad_example_fails_at_init(layer, shape, match):
    with pytest.raises(fnnet.LayerError, match=match):
        layer.init(jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_wrong_channels_fail_at_apply():
    layer = fnnet.conv1d(4, 3)
    params = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((6, 2)))
    with pytest.raises(fnnet.LayerError, match="expected input with last dimension 2, got 3"):
        layer.apply(params, jnp.ones((6, 3)))
    with pytest.raises(fnnet.LayerError, match="rank 2"):
        layer.apply(params, jnp.ones((1, 6, 2)))


def test_error_names_the_path_inside_a_model():
    model = fnnet.serial(features=fnnet.conv1d(4, 3), head=fnnet.conv1d(2, 9, padding="VALID"))
    with pytest.raises(fnnet.LayerError, match="conv1d at 'head'"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.ones((6, 2)))
