"""Conformance cases for the combinators."""

import jax
import jax.numpy as jnp

import fnnet

from registry import Case, normal


def _mlp_block():
    return fnnet.serial(
        up=fnnet.fn(jnp.tanh, kind="tanh"),
        down=fnnet.fn(lambda x: 0.5 * x, kind="half"),
    )


def _gated():
    """A gated linear unit, ``y = (x W + b) * sigmoid(x V + c)``, written as a composite."""
    value, gate = fnnet.dense(3), fnnet.dense(3)

    def forward(call, x):
        return call("value", value, x) * jax.nn.sigmoid(call("gate", gate, x))

    return fnnet.composite(forward, "gated")


def _normalized_eval():
    """A stateful composite: dense, then BatchNorm's running statistics (evaluation)."""
    hidden, norm = fnnet.dense(4), fnnet.batch_norm()

    def forward(call, x):
        return call("norm", norm, call("hidden", hidden, x))

    return fnnet.composite(forward, "normalized", stateful=True)


CASES = [
    Case(
        "composite",
        _gated,
        normal(5),
        ("composite",),
        reference=lambda p, x: (
            (x @ p["value"]["w"] + p["value"]["b"])
            * jax.nn.sigmoid(x @ p["gate"]["w"] + p["gate"]["b"])
        ),
    ),
    Case("composite_stateful", _normalized_eval, normal(5), ("composite",)),
    Case("fn", lambda: fnnet.fn(jnp.sin, kind="sin"), normal(5), ("fn",), differentiable=False),
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
        lambda: fnnet.parallel(a=_mlp_block(), b=fnnet.fn(jnp.cos, kind="cos")),
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
