"""fnnet: neural networks as pure functions on JAX.

A layer is a :class:`Layer`, a named pair of pure functions ``init(key, x)`` and
``apply(params, x)`` over one example; batch with ``jax.vmap``. See
``docs/concepts.md`` for a tour and ``docs/extending.md`` to write your own layer.

The house, bottom up: the layer protocol and the layers (below, from
``fnnet._src``); the four architectures (``fnnet.models``); training
(``fnnet.train``); distribution over devices and hosts (``fnnet.distributed``).
Each floor imports only from the floors beneath it. ``import fnnet`` loads the
first two; the other two are imported on their own (``from fnnet import train``).
"""

# The protocol and composition.
from fnnet._src.errors import LayerError
from fnnet._src.layer import Call, Layer, composite
from fnnet._src.combinators import parallel, repeat, residual, serial

# Neurons, dense layers, activations, dropout, normalization.
from fnnet._src.dense import dense, neuron
from fnnet._src.activations import (
    activation,
    elu,
    fn,
    gelu,
    get_activation,
    identity,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    softplus,
    tanh,
)
from fnnet._src.dropout import dropout
from fnnet._src.normalization import batch_norm, group_norm, layer_norm, rms_norm

# Convolution, pooling, embedding, positions.
from fnnet._src.conv import conv, conv1d, conv2d
from fnnet._src.pooling import avg_pool, flatten, global_avg_pool, global_max_pool, max_pool
from fnnet._src.embedding import attend, embedding
from fnnet._src.positional import apply_rotary, learned_position, rotary, sinusoidal_position

# Recurrence.
from fnnet._src.cells import Cell, gru_cell, lstm_cell, simple_cell
from fnnet._src.recurrent import bidirectional, gru, lstm, recurrent, simple_rnn

# Attention and the transformer block.
from fnnet._src.attention import init_attention_cache, multi_head_attention
from fnnet._src.transformer_block import transformer_block

# Inspection.
from fnnet._src.summary import Summary, summary

# The four architectures, and the error helpers for writing layers.
from fnnet import errors, models

__version__ = "0.1.0"

# The public face is exactly what is imported above, so exporting a new layer is
# one import line.
__all__ = sorted(name for name in dir() if not name.startswith("_"))
