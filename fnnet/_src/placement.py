"""Placement across processes: ``jax.device_put`` for shardings no one process holds.

Private, and at the bottom of the house because two floors need it: checkpoints
(``fnnet.train``) restore arrays onto the shardings of a placed state, and
``fnnet.distributed`` places states and datasets on a mesh. It imports only JAX.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works across processes.

    ``jax.device_put`` refuses a sharding with devices of other processes; then
    each process builds its own shards from its (identical) copy of the value
    with ``jax.make_array_from_callback``. Typed PRNG keys go through their key data.

    Args:
      tree: pytree of arrays (NumPy or JAX, the same value in every process).
      shardings: a sharding, or a pytree of shardings matching ``tree``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(_place_leaf, tree, shardings)


def _place_leaf(leaf: Any, sharding: jax.sharding.Sharding) -> Any:
    if sharding.is_fully_addressable:
        return jax.device_put(leaf, sharding)
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        data = _place_leaf(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
