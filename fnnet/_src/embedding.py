"""Token embeddings: a learned table looked up by integer id, and its transpose.

The same table can map ids to vectors (:func:`embedding`) and vectors back to
scores over the vocabulary (:func:`attend`), which is how language models tie
their input embedding to their output layer.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.layer import Layer, Params


def embedding(
    vocab: int,
    features: int,
    *,
    init: Callable | None = None,
    param_dtype=jnp.float32,
) -> Layer:
    """A learned vector for each of ``vocab`` integer ids.

    Ids outside ``[0, vocab)``, negative ones included, give NaN rows rather than
    a silently clamped or wrapped lookup, so a bad tokenizer shows up at once.

    Args:
      vocab: number of distinct ids.
      features: size of each vector.
      init: ``init(key, shape, dtype)`` for the table (default normal with
        standard deviation 1, as PyTorch's ``nn.Embedding``).
      param_dtype: dtype of the table.

    Input: integer ids of any shape ``(...)``, e.g. ``(seq,)``.
    Output: ``(..., features)``.

    ``apply(params, h, transpose=True)`` runs the table the other way, vectors
    ``(..., features)`` to scores ``(..., vocab)`` (:func:`attend`): in a
    composite, calling the same child again this way ties the output layer to
    the input embedding.
    Params: ``{"table": (vocab, features)}``.
    """
    errors.positive_int(vocab, "embedding", "vocab")
    errors.positive_int(features, "embedding", "features")
    init_fn = jax.nn.initializers.normal(stddev=1.0) if init is None else init

    def check_ids(x):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            errors.fail(
                "embedding",
                f"expected integer ids, got dtype {x.dtype} (input shape {tuple(x.shape)}); "
                "cast token ids with .astype(jnp.int32)",
            )

    def init_(key, x):
        check_ids(x)
        return {"table": init_fn(key, (vocab, features), param_dtype)}

    def apply(params, x, *, key=None, train=False, transpose=False):
        del key, train
        if transpose:  # vectors back to scores over the vocabulary: a tied output layer
            return attend(params, x)  # (..., vocab)
        check_ids(x)
        table = params["table"]  # (vocab, features)
        n = table.shape[0]
        # mode="fill" turns ids >= vocab into NaN; negatives are sent there too instead of
        # wrapping around to the end of the table as NumPy indexing would.
        ids = jnp.where(x < 0, jnp.array(n, x.dtype), x)
        return jnp.take(table, ids, axis=0, mode="fill")  # (..., features)

    return Layer(init_, apply, "embedding")


def attend(embedding_params: Params, x: jax.Array) -> jax.Array:
    """Scores of ``x`` against every row of an embedding table: ``x @ table.T``.

    This is the transposed use of :func:`embedding`, for an output layer tied to
    the input embedding: ``logits = fnnet.attend(params["embed"], h)``.

    Args:
      embedding_params: the params of an :func:`embedding` layer,
        ``{"table": (vocab, features)}``.
      x: vectors ``(..., features)`` of a floating dtype.

    Returns:
      Logits ``(..., vocab)`` in ``x``'s dtype.
    """
    table = embedding_params["table"]  # (vocab, features)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        errors.fail("attend", f"expected a floating input, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != table.shape[-1]:
        errors.fail(
            "attend",
            f"expected input with last dimension {table.shape[-1]} (the embedding's features), "
            f"got shape {tuple(x.shape)}",
        )
    return jnp.einsum("...f,vf->...v", x, table.astype(x.dtype))  # (..., vocab)
