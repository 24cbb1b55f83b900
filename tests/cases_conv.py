"""Conformance cases for convolution, pooling, flatten, embedding and positional encodings."""

import numpy as np

import fnnet

from registry import Case, integers, normal

CASES = [
    Case("conv_1d", lambda: fnnet.conv(4, 3), normal(7, 2), ("conv",)),
    Case(
        "conv_2d_strided_groups",
        lambda: fnnet.conv(4, (3, 2), strides=2, groups=2),
        normal(6, 5, 2),
        ("conv",),
    ),
    Case(
        "conv1d_causal_dilated",
        lambda: fnnet.conv1d(3, 3, padding="CAUSAL", dilation=2),
        normal(8, 2),
        ("conv1d",),
    ),
    Case(
        "conv2d_explicit_padding",
        lambda: fnnet.conv2d(3, 3, padding=1, use_bias=False),
        normal(5, 4, 2),
        ("conv2d",),
    ),
    Case(
        "max_pool_2d",
        lambda: fnnet.max_pool(2),
        normal(6, 5, 2),
        ("max_pool",),
        differentiable=False,
    ),
    Case(
        "avg_pool_1d_same",
        lambda: fnnet.avg_pool(3, strides=2, padding="SAME"),
        normal(7, 2),
        ("avg_pool",),
        differentiable=False,
    ),
    Case(
        "global_avg_pool",
        fnnet.global_avg_pool,
        normal(4, 3, 2),
        ("global_avg_pool",),
        differentiable=False,
    ),
    Case(
        "global_max_pool",
        fnnet.global_max_pool,
        normal(5, 3),
        ("global_max_pool",),
        differentiable=False,
    ),
    Case("flatten", fnnet.flatten, normal(3, 2, 2), ("flatten",), differentiable=False),
    Case("embedding", lambda: fnnet.embedding(7, 4), integers(7, 5), ("embedding",)),
    Case(
        "learned_position", lambda: fnnet.learned_position(8), normal(5, 4), ("learned_position",)
    ),
    Case(
        "learned_position_at",
        lambda: fnnet.learned_position(8),
        normal(2, 4),
        ("learned_position",),
        apply_kwargs={"positions": np.array([5, 6], np.int32)},
    ),
    Case(
        "sinusoidal_position",
        fnnet.sinusoidal_position,
        normal(5, 6),
        ("sinusoidal_position",),
        differentiable=False,
    ),
    Case("rotary", fnnet.rotary, normal(5, 2, 4), ("rotary",), differentiable=False),
    Case(
        "rotary_at",
        fnnet.rotary,
        normal(3, 4),
        ("rotary",),
        differentiable=False,
        apply_kwargs={"positions": np.array([7, 8, 9], np.int32)},
    ),
]
