"""fnnet: neural networks as pure functions on JAX.

A layer is a :class:`Layer`, a named pair of pure functions ``init(key, x)`` and
``apply(params, x)`` over one example; batch with ``jax.vmap``. See
``docs/concepts.md`` for a tour and ``docs/extending.md`` to write your own layer.
"""

from fnnet._src.errors import LayerError
from fnnet._src.layer import Layer
from fnnet._src.combinators import fn, parallel, repeat, residual, serial

# --- dense, neuron, activations, dropout, normalization (basic layers) ---
# --- convolution, pooling, flatten, embedding, positional encodings ---
# --- recurrent cells and sequence layers ---
# --- attention and the transformer block ---
# --- inspection ---
from fnnet._src.summary import Summary, summary

from fnnet import models

__version__ = "0.1.0"
