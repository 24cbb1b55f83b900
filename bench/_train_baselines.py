"""The training benchmark's baselines: hand-written jax.numpy, Flax Linen and Flax NNX.

Each framework gets the MNIST-1D models of ``tests/handwritten.py``, written
the way its own documentation writes them (``nn.Dense``, ``nn.Conv``,
``nn.RNN(nn.GRUCell)`` inside ``nn.Bidirectional``, ``nn.MultiHeadDotProductAttention``,
and their NNX twins), with the same layer sizes, so every contender has the same
number of parameters as the fnnet model (``tests/test_bench_train.py`` checks it).

Every builder returns a :class:`Contender`: ``step(state, batch) -> (state, loss)``
with ``batch = (x, y)`` already on the device, ``x (batch, ...)`` float32 and
``y (batch,)`` int32, and ``ready(state)`` giving the arrays to block on. Each
trains with the optimizer it is given on the mean softmax cross-entropy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import nnx
from flax.training import train_state

from tests import handwritten

CLASSES = 10
MAX_LEN = 512  # the position table's rows, as fnnet.models.transformer_classifier's default
# The two transformers differ only in how the signal becomes tokens: (patch, table rows).
# With one token per sample the table is as long as the signal, 40 rows.
TRANSFORMERS = {"transformer": (4, MAX_LEN), "transformer_tokens": (1, 40)}


class Contender(NamedTuple):
    """A training step and the state it starts from.

    Attributes:
      state: whatever ``step`` threads through (params and optimizer state, a Flax
        TrainState, or NNX objects that the step mutates in place).
      step: ``step(state, (x, y)) -> (state, loss)``, loss a float32 scalar.
      ready: ``ready(state)`` returns a pytree of the state's arrays, for
        ``jax.block_until_ready``.
      params: the model's number of trained parameters.
    """

    state: Any
    step: Callable[[Any, Any], tuple[Any, jax.Array]]
    ready: Callable[[Any], Any]
    params: int


def _same(state):
    return state


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy: logits ``(batch, classes)``, labels ``(batch,)`` int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --- Hand-written jax.numpy ---------------------------------------------------------

HAND_FORWARD = {
    "mlp": handwritten.mlp_forward,
    "cnn": handwritten.cnn_forward,
    "gru": handwritten.gru_forward,
    "transformer": handwritten.transformer_forward,
    "transformer_tokens": handwritten.transformer_forward,
}


def handwritten_step(name, tx):
    """The hand-written training step, unjitted: ``step((params, opt_state), (x, y))
    -> ((params, opt_state), loss)``, a value_and_grad of ``tests.handwritten``'s
    batched forward pass and an optax update."""
    forward = HAND_FORWARD[name]

    def step(state, batch):
        params, opt_state = state
        x, y = batch
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(forward(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def handwritten_contender(name, params, tx, *, donate: bool = False) -> Contender:
    """Plain JAX: a jitted value_and_grad + optax update over the fnnet parameter tree.

    ``params`` come from the fnnet model's ``init`` (initialization is not timed);
    the forward pass is ``tests.handwritten``'s batched jax.numpy. With ``donate``
    the step is jitted with ``donate_argnums=0`` and starts from a copy of
    ``params``, so the caller's arrays stay valid.
    """
    if donate:
        params = jax.tree.map(jnp.copy, params)
    step = jax.jit(handwritten_step(name, tx), donate_argnums=0 if donate else ())
    return Contender((params, tx.init(params)), step, _same, count_params(params))


# --- Flax Linen ---------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # (batch, 40)
        h = nn.relu(nn.Dense(100)(x))
        h = h + nn.relu(nn.Dense(100)(h))
        return nn.Dense(CLASSES)(h)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # (batch, 40, 1)
        for k in (5, 3, 3):
            x = nn.relu(nn.Conv(25, (k,), strides=2, padding=((1, 1),))(x))
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))  # (batch, 5 * 25)


class LinenGRU(nn.Module):
    @nn.compact
    def __call__(self, x):  # (batch, 40)
        h = nn.Bidirectional(nn.RNN(nn.GRUCell(6)), nn.RNN(nn.GRUCell(6)))(x[..., None])
        return nn.Dense(CLASSES)(h.reshape(h.shape[0], -1))  # (batch, 40 * 12)


class LinenBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h):  # (batch, tokens, width)
        h = h + nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(h))
        z = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(h)))
        return h + nn.Dense(self.width)(z)


class LinenTransformer(nn.Module):
    width: int = 64
    patch: int = 4
    max_len: int = MAX_LEN

    @nn.compact
    def __call__(self, x):  # (batch, 40)
        h = nn.Dense(self.width)(x.reshape(x.shape[0], -1, self.patch))  # (batch, tokens, width)
        table = self.param("position", nn.initializers.normal(0.02), (self.max_len, self.width))
        h = h + table[: h.shape[1]]
        for _ in range(2):
            h = LinenBlock(self.width)(h)
        return nn.Dense(CLASSES)(nn.LayerNorm()(h).mean(axis=1))


LINEN = {
    "mlp": LinenMLP,
    "cnn": LinenCNN,
    "gru": LinenGRU,
    **{
        name: functools.partial(LinenTransformer, patch=patch, max_len=rows)
        for name, (patch, rows) in TRANSFORMERS.items()
    },
}


def linen_init(name, x, seed):
    """The Linen module and its params, initialized on a batch ``x``."""
    module = LINEN[name]()
    return module, module.init(jax.random.key(seed), x)["params"]


def linen_contender(name, x, tx, seed) -> Contender:
    """Linen as its examples write it: ``flax.training.train_state.TrainState`` and a
    jitted step calling ``apply_gradients``."""
    module, params = linen_init(name, x, seed)
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    @jax.jit
    def step(state, batch):
        x, y = batch

        def loss_fn(params):
            return cross_entropy(state.apply_fn({"params": params}, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return Contender(state, step, _same, count_params(params))


# --- Flax NNX -----------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden_0 = nnx.Linear(40, 100, rngs=rngs)
        self.hidden_1 = nnx.Linear(100, 100, rngs=rngs)
        self.out = nnx.Linear(100, CLASSES, rngs=rngs)

    def __call__(self, x):  # (batch, 40)
        h = nnx.relu(self.hidden_0(x))
        h = h + nnx.relu(self.hidden_1(h))
        return self.out(h)


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        sizes = ((1, 5), (25, 3), (25, 3))
        self.convs = nnx.List(
            nnx.Conv(c, 25, (k,), strides=2, padding=((1, 1),), rngs=rngs) for c, k in sizes
        )
        self.out = nnx.Linear(5 * 25, CLASSES, rngs=rngs)

    def __call__(self, x):  # (batch, 40, 1)
        for conv in self.convs:
            x = nnx.relu(conv(x))
        return self.out(x.reshape(x.shape[0], -1))


class NnxGRU(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        def direction():
            return nnx.RNN(nnx.GRUCell(1, 6, rngs=rngs), rngs=rngs)

        self.rnn = nnx.Bidirectional(direction(), direction(), rngs=rngs)
        self.out = nnx.Linear(40 * 12, CLASSES, rngs=rngs)

    def __call__(self, x):  # (batch, 40)
        h = self.rnn(x[..., None])  # (batch, 40, 12)
        return self.out(h.reshape(h.shape[0], -1))


class NnxBlock(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, width, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, h):  # (batch, tokens, width)
        h = h + self.attn(self.ln1(h))
        return h + self.down(nnx.gelu(self.up(self.ln2(h))))


class NnxTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 64, patch: int = 4, max_len: int = MAX_LEN):
        self.patch = patch
        self.embed = nnx.Linear(patch, width, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, width)))
        self.blocks = nnx.List(NnxBlock(width, rngs) for _ in range(2))
        self.ln_f = nnx.LayerNorm(width, rngs=rngs)
        self.out = nnx.Linear(width, CLASSES, rngs=rngs)

    def __call__(self, x):  # (batch, 40)
        h = self.embed(x.reshape(x.shape[0], -1, self.patch))  # (batch, tokens, width)
        h = h + self.position[: h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.out(self.ln_f(h).mean(axis=1))


NNX = {
    "mlp": NnxMLP,
    "cnn": NnxCNN,
    "gru": NnxGRU,
    **{
        name: functools.partial(NnxTransformer, patch=patch, max_len=rows)
        for name, (patch, rows) in TRANSFORMERS.items()
    },
}


def _nnx_loss(model, x, y):
    return cross_entropy(model(x), y)


def _nnx_params(objects) -> int:
    return count_params(nnx.state(objects[0], nnx.Param))


def _nnx_objects(name, tx, seed):
    model = NNX[name](nnx.Rngs(seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def _nnx_train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


def nnx_contender(name, tx, seed) -> Contender:
    """NNX as its tutorials write it: ``nnx.jit`` over the model and ``nnx.Optimizer``,
    which update in place (the state handed back is the same two objects)."""
    objects = _nnx_objects(name, tx, seed)

    def step(objects, batch):
        return objects, _nnx_train_step(*objects, *batch)

    return Contender(objects, step, nnx.state, _nnx_params(objects))


def nnx_cached_contender(name, tx, seed) -> Contender:
    """NNX with ``nnx.cached_partial``, the guide's cure for ``nnx.jit``'s Python
    overhead: the graph traversal of model and optimizer is done once."""
    objects = _nnx_objects(name, tx, seed)
    cached = nnx.cached_partial(_nnx_train_step, *objects)

    def step(objects, batch):
        return objects, cached(*batch)

    return Contender(objects, step, nnx.state, _nnx_params(objects))


def nnx_split_contender(name, tx, seed) -> Contender:
    """NNX's functional pattern, the fast one: split model and optimizer once into a
    graphdef and a state pytree; a plain ``jax.jit`` step merges them, updates, and
    returns the new state, so no graph is traversed on the host per step."""
    objects = _nnx_objects(name, tx, seed)
    params = _nnx_params(objects)
    graphdef, state = nnx.split(objects)

    @jax.jit
    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(_nnx_loss)(model, *batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return Contender(state, step, _same, params)


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(jnp.size(a)) for a in jax.tree.leaves(tree))
