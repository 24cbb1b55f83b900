"""Distribution: one training run over many devices and many hosts (docs/scaling.md).

A mesh names the axes of a grid of devices (:func:`mesh_from_spec`); a rule says
how each parameter is split over it (:func:`fsdp_rule`, or ``(regex, spec)``
pairs); :func:`shard_state` places a training state by the rule, and
:func:`make_sharded_steps` runs ``fnnet.train``'s fused steps with each batch
split over the devices. Over several processes every host calls
:func:`init_distributed` first, loads its rows (:func:`process_rows`,
:func:`shard_data`), and leaves logging to the primary (:func:`is_primary`).
:func:`require_backend` refuses to run on a device other than the one asked for.

This package is the floor above ``fnnet.train``: it names meshes, joins hosts
and chooses backends, and nothing below imports it. The sharding of a training
state and its steps is written in ``fnnet.train._sharding``, because ``fit``
trains on every local device by default; this package is its public face.
"""

from fnnet.distributed._mesh import mesh_from_spec
from fnnet.train._sharding import (
    fsdp_rule,
    init_sharded,
    make_sharded_steps,
    process_rows,
    replicate,
    shard_data,
    shard_state,
    sharded_step,
    state_sharding,
    state_specs,
)
from fnnet.distributed._platform import (
    BackendError,
    init_distributed,
    is_primary,
    require_backend,
    set_matmul_precision,
    use_compilation_cache,
)

__all__ = [
    # Meshes and how parameters are split over them.
    "fsdp_rule", "mesh_from_spec", "state_sharding", "state_specs",
    # Placing state and data, and training on the mesh.
    "init_sharded", "make_sharded_steps", "process_rows", "replicate", "shard_data",
    "shard_state",
    "sharded_step",
    # Where a run executes: its backend, its processes, its matmul precision.
    "BackendError", "init_distributed", "is_primary", "require_backend", "set_matmul_precision",
    "use_compilation_cache",
]  # fmt: skip
