"""Conformance cases for the combinators."""

import jax.numpy as jnp

import fnnet

from registry import Case, normal


def _mlp_block():
    return fnnet.serial(
        up=fnnet.fn(jnp.tanh, name="tanh"),
        down=fnnet.fn(lambda x: 0.5 * x, name="half"),
    )


CASES = [
    Case("fn", lambda: fnnet.fn(jnp.sin, name="sin"), normal(5), ("fn",), differentiable=False),
    Case("serial", _mlp_block, normal(4, 3), ("serial",), differentiable=False),
    Case(
        "residual",
        lambda: fnnet.residual(_mlp_block()),
        normal(6),
        ("residual",),
        differentiable=False,
    ),
    Case(
        "parallel",
        lambda: fnnet.parallel(a=_mlp_block(), b=fnnet.fn(jnp.cos, name="cos")),
        normal(3, 2),
        ("parallel",),
        differentiable=False,
    ),
    Case(
        "repeat",
        lambda: fnnet.repeat(_mlp_block(), 3),
        normal(4),
        ("repeat",),
        differentiable=False,
    ),
]
