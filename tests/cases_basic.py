"""Conformance cases for the basic layers, and combinators built from dense layers."""

import jax
import jax.numpy as jnp

import fnnet

from registry import Case, normal


def _over_batch(layer: fnnet.Layer, axis_name: str = "batch") -> fnnet.Layer:
    """Applies ``layer`` to every example of a ``(batch, ...)`` input under a named vmap.

    batch_norm in training mode needs the batch axis bound; the conformance checks
    call ``apply`` on one example outside any vmap (eval_shape, jit, recompile), so
    the training case carries its batch inside the example and binds the axis here.
    """

    def init(key, xs):
        return layer.init(key, jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype))

    def apply(params, state, xs, *, key=None, train=False):
        def one(x):
            return layer.apply(params, state, x, key=key, train=train)

        return jax.vmap(one, axis_name=axis_name, out_axes=(0, None))(xs)

    return fnnet.Layer(init, apply, "over_batch", stateful=True)


def _act(name, make, covers=None, shape=(2, 3)):
    return Case(name, make, normal(*shape), covers or (name,), differentiable=False)


CASES = [
    Case("dense", lambda: fnnet.dense(4), normal(3), ("dense",)),
    Case("dense_seq", lambda: fnnet.dense(5), normal(2, 3), ("dense",)),
    Case("dense_no_bias", lambda: fnnet.dense(4, use_bias=False), normal(3), ("dense",)),
    Case("neuron", lambda: fnnet.neuron(), normal(4), ("neuron",)),
    Case("neuron_tanh", lambda: fnnet.neuron("tanh"), normal(3), ("neuron",)),
    _act("relu", fnnet.relu),
    _act("gelu", fnnet.gelu),
    _act("gelu_exact", lambda: fnnet.gelu(approximate=False), ("gelu",)),
    _act("sigmoid", fnnet.sigmoid),
    _act("tanh", fnnet.tanh),
    _act("softmax", lambda: fnnet.softmax(axis=0), ("softmax",)),
    _act("log_softmax", fnnet.log_softmax),
    _act("silu", fnnet.silu),
    _act("elu", lambda: fnnet.elu(alpha=0.5), ("elu",)),
    _act("leaky_relu", lambda: fnnet.leaky_relu(negative_slope=0.1), ("leaky_relu",)),
    _act("softplus", fnnet.softplus),
    _act("identity", fnnet.identity),
    _act("activation_by_name", lambda: fnnet.activation("gelu"), ("activation",)),
    _act("activation_callable", lambda: fnnet.activation(jnp.sin), ("activation",)),
    Case(
        "dropout_train",
        lambda: fnnet.dropout(0.5),
        normal(8),
        ("dropout",),
        train=True,
        needs_key=True,
        differentiable=False,
    ),
    Case("dropout_eval", lambda: fnnet.dropout(0.5), normal(8), ("dropout",), differentiable=False),
    Case("layer_norm", lambda: fnnet.layer_norm(), normal(3, 4), ("layer_norm",)),
    Case(
        "layer_norm_plain",
        lambda: fnnet.layer_norm(use_scale=False, use_bias=False),
        normal(4),
        ("layer_norm",),
        differentiable=False,
    ),
    Case("rms_norm", lambda: fnnet.rms_norm(), normal(3, 4), ("rms_norm",)),
    Case("group_norm", lambda: fnnet.group_norm(2), normal(3, 4), ("group_norm",)),
    Case("group_norm_image", lambda: fnnet.group_norm(3), normal(2, 2, 6), ("group_norm",)),
    # Training mode: the example is a (batch, length, features) batch (see _over_batch).
    Case(
        "batch_norm_train",
        lambda: _over_batch(fnnet.batch_norm(momentum=0.9)),
        normal(4, 3, 2),
        ("batch_norm",),
        train=True,
    ),
    # Evaluation uses the running statistics: examples are independent, vmap equals a loop.
    Case("batch_norm_eval", lambda: fnnet.batch_norm(), normal(3, 2), ("batch_norm",)),
    # Combinators over layers with parameters, so their gradients are checked too.
    Case(
        "serial_dense_mlp",
        lambda: fnnet.serial(hidden=fnnet.dense(8), act=fnnet.relu(), out=fnnet.dense(2)),
        normal(3),
        ("serial", "dense", "relu"),
    ),
    Case(
        "residual_dense",
        lambda: fnnet.residual(fnnet.dense(3)),
        normal(2, 3),
        ("residual", "dense"),
    ),
    Case(
        "parallel_dense",
        lambda: fnnet.parallel(a=fnnet.dense(2), b=fnnet.dense(3)),
        normal(4),
        ("parallel", "dense"),
    ),
    Case(
        "repeat_dense_tanh",
        lambda: fnnet.repeat(fnnet.serial(fnnet.dense(4), fnnet.tanh()), 3),
        normal(4),
        ("repeat", "dense", "tanh"),
    ),
]
