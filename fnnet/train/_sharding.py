"""Sharding: one training program over many devices, on JAX's own SPMD runtime.

The batch is split over the mesh's ``data`` axis (a mesh from
``mesh_from_spec``): each device runs the forward and backward pass of its
slice, and because the step is still one program over the global batch
(``jax.jit`` partitions it), XLA inserts the all-reduce that makes the gradient
the mean over the whole batch. Parameters are replicated by default, or split by
a rule from parameter path to ``PartitionSpec``; :func:`fsdp_rule` splits every
large parameter over the same ``data`` axis (FSDP, ZeRO-3): XLA gathers each one
where it is used and reduce-scatters its gradient. The optimizer's state follows
its parameters.

The same code runs on one device, on eight simulated CPU devices, on a GPU
host and on every host of a TPU slice: with several processes each one passes
its own rows to :func:`shard_data` and runs the same program.

It lives in ``fnnet.train`` because :func:`fnnet.train.fit` trains on a mesh by
default; ``fnnet.distributed`` is its public face, beside meshes and hosts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fnnet._src.placement import place
from fnnet.train import _stream
from fnnet.train._state import TrainState
from fnnet.train._step import make_fused_steps

# rule(path, shape) -> PartitionSpec, or None for "replicated".
RuleFn = Callable[[str, tuple[int, ...]], P | None]
Rule = RuleFn | Sequence[tuple[str, P]] | None


# --- Rules: from parameter path to PartitionSpec ---------------------------------------


def fsdp_rule(mesh: Mesh, axis: str = "data", *, min_size: int = 2**14) -> RuleFn:
    """A rule that splits every parameter of ``min_size`` elements or more over ``axis``.

    The split dimension is the largest one divisible by the axis's size (the
    first, on ties); a parameter with no such dimension, and every smaller one
    (biases, norm scales), stays replicated, where the cost of gathering it
    would exceed the memory saved.

    Args:
      mesh: the mesh whose ``axis`` the parameters are split over.
      axis: the mesh axis; usually the data axis (each device then holds
        ``1/size`` of every large matrix and of its optimizer state).
      min_size: the smallest parameter (in elements) that is split.

    Returns:
      ``rule(path, shape) -> PartitionSpec | None`` for :func:`shard_state`.
    """
    if axis not in mesh.shape:
        raise ValueError(f"fsdp_rule: axis {axis!r} is not in the mesh {dict(mesh.shape)}")
    ways = mesh.shape[axis]

    def rule(path: str, shape: tuple[int, ...]) -> P | None:
        del path
        if math.prod(shape) < min_size:
            return None
        divisible = [d for d, n in enumerate(shape) if n % ways == 0]
        if not divisible:
            return None
        dim = max(divisible, key=lambda d: (shape[d], -d))
        return P(*([None] * dim), axis)

    return rule


def _rule_fn(rule: Rule) -> RuleFn:
    """``rule`` as a function: None replicates, pairs are ``(regex, spec)`` tried in order."""
    if rule is None:
        return lambda path, shape: None
    if callable(rule):
        return rule
    if isinstance(rule, str | bytes) or not isinstance(rule, Sequence):
        raise TypeError(
            "a sharding rule is None, a function (path, shape) -> PartitionSpec, or a list "
            f"of (regex, PartitionSpec) pairs; got {rule!r}"
        )
    compiled = []
    for entry in rule:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise TypeError(f"a sharding rule's entries are (regex, PartitionSpec), got {entry!r}")
        if not isinstance(entry[1], P | None):
            raise TypeError(f"rule entry for {entry[0]!r}: {entry[1]!r} is not a PartitionSpec")
        compiled.append((re.compile(entry[0]), entry[1]))

    def by_pattern(path: str, shape: tuple[int, ...]) -> P | None:
        for pattern, spec in compiled:
            if pattern.search(path):
                return spec
        return None

    return by_pattern


def _path_parts(keypath: tuple) -> tuple[str, ...]:
    out = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            out.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            out.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            out.append(str(key.idx))
        else:
            out.append(str(getattr(key, "key", key)))
    return tuple(out)


def _checked(spec: Any, path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` for the parameter at ``path``, checked against its shape and the mesh."""
    if spec is None:
        return P()
    if not isinstance(spec, P):
        raise TypeError(
            f"the sharding rule gave {spec!r} for parameter {path!r}; expected a "
            "jax.sharding.PartitionSpec or None (replicated)"
        )
    if len(spec) > len(shape):
        raise ValueError(
            f"the sharding rule gave {spec} for parameter {path!r} of shape {shape}: more "
            "entries than the parameter has dimensions"
        )
    for dim, (size, entry) in enumerate(zip(shape, spec)):
        if entry is None or entry is P.UNCONSTRAINED:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        unknown = [n for n in names if n not in mesh.shape]
        if unknown:
            raise ValueError(
                f"the sharding rule gave {spec} for parameter {path!r}: mesh axis "
                f"{unknown[0]!r} is not one of {tuple(mesh.axis_names)}"
            )
        ways = math.prod(mesh.shape[n] for n in names)
        if size % ways:
            raise ValueError(
                f"the sharding rule gave {spec} for parameter {path!r} of shape {shape}: "
                f"dimension {dim} ({size}) cannot be split {ways} ways over mesh axis "
                + " x ".join(repr(n) for n in names)
            )
    return spec


def state_specs(state: TrainState, mesh: Mesh, rule: Rule = None, *, replica_axis=None) -> Any:
    """The ``PartitionSpec`` of every leaf of a training state.

    Parameters get ``rule(path, shape)`` (paths like ``"hidden_0/w"``; None
    means replicated). A leaf of the optimizer's state that mirrors a parameter
    (Adam's ``mu`` and ``nu``: its path ends with the parameter's path and its
    shape is the parameter's) gets the parameter's spec; every other leaf (step,
    keys, BatchNorm statistics, optimizer counts) is replicated.

    Args:
      state: a :class:`TrainState` (arrays, tracers or ``jax.ShapeDtypeStruct``).
      mesh: the mesh the specs refer to.
      rule: None, ``rule(path, shape) -> PartitionSpec | None``, or a list of
        ``(regex, PartitionSpec)`` pairs, the first whose regex is found in the
        path deciding.
      replica_axis: for a state stacked by ``init_replicas``: the mesh axis that
        splits the leading replica axis (None: replicas stay whole on every device).

    Returns:
      A :class:`TrainState` of ``PartitionSpec``.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"expected a fnnet.train.TrainState, got {type(state).__name__}")
    rule_fn = _rule_fn(rule)
    lead = 0 if replica_axis is None else 1
    if replica_axis is not None:
        if replica_axis not in mesh.shape:
            raise ValueError(f"replica_axis {replica_axis!r} is not in the mesh {dict(mesh.shape)}")
        replicas = np.shape(state.step)[0] if np.ndim(state.step) else None
        if replicas is None or replicas % mesh.shape[replica_axis]:
            raise ValueError(
                f"replica_axis {replica_axis!r} has {mesh.shape[replica_axis]} devices, which "
                f"must divide the number of replicas (the leading axis of the state: {replicas})"
            )

    def outer(spec: P) -> P:
        return spec if replica_axis is None else P(replica_axis, *spec)

    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}

    def param_spec(keypath, leaf):
        parts = _path_parts(keypath)
        path, shape = "/".join(parts), tuple(np.shape(leaf))[lead:]
        spec = _checked(rule_fn(path, shape), path, shape, mesh)
        by_path[parts] = (shape, spec)
        return outer(spec)

    def mirror_spec(keypath, leaf):
        parts, shape = _path_parts(keypath), tuple(np.shape(leaf))[lead:]
        for start in range(len(parts) + 1):
            hit = by_path.get(parts[start:])
            if hit is not None and hit[0] == shape:
                return outer(hit[1])
        return outer(P())

    params = jax.tree_util.tree_map_with_path(param_spec, state.params)
    opt_state = jax.tree_util.tree_map_with_path(mirror_spec, state.opt_state)
    rest = {
        name: jax.tree.map(lambda _: outer(P()), getattr(state, name))
        for name in TrainState._fields
        if name not in ("params", "opt_state")
    }
    return TrainState(params=params, opt_state=opt_state, **rest)


def _named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def state_sharding(state: TrainState, mesh: Mesh, rule: Rule = None, *, replica_axis=None) -> Any:
    """:func:`state_specs` as ``NamedSharding`` on ``mesh`` (for ``jax.device_put``, or
    as the target of a checkpoint restore)."""
    return _named(mesh, state_specs(state, mesh, rule, replica_axis=replica_axis))


def shard_state(state: TrainState, mesh: Mesh, rule: Rule = None, *, replica_axis=None):
    """Places a training state on ``mesh``: see :func:`state_specs` for who goes where.

    With several processes every process passes the same state (same seed), as
    ``init_state`` gives them.
    """
    return place(state, state_sharding(state, mesh, rule, replica_axis=replica_axis))


def init_sharded(
    init: Callable[[], TrainState], mesh: Mesh, rule: Rule = None, *, replica_axis=None
):
    """Runs ``init`` as one program whose outputs are born split by ``rule``.

    ``shard_state(init_state(...), mesh, rule)`` builds the whole state on one
    device before splitting it, so a model too large for one device cannot start.
    Here the state's shapes come from ``jax.eval_shape``, the same specs as
    :func:`shard_state` give its output shardings, and XLA computes each device's
    part where it lies: no device holds more than its own shards (plus what is
    replicated).

    Args:
      init: a function of no arguments returning a :class:`TrainState`, for
        example ``lambda: init_state(model, optimizer, example, seed=0)`` or
        ``lambda: init_replicas(model, optimizer, example, seeds)``.
      mesh, rule, replica_axis: as for :func:`shard_state`.

    Returns:
      The state, placed as ``shard_state(init(), mesh, rule, replica_axis=...)``
      places it, and with its values.

    Example::

      state = init_sharded(lambda: init_state(model, adam, x[0], seed=0), mesh,
                           fsdp_rule(mesh))
    """
    shapes = jax.eval_shape(init)
    if not isinstance(shapes, TrainState):
        raise TypeError(f"init_sharded: init must return a TrainState, got {type(shapes).__name__}")
    sharding = state_sharding(shapes, mesh, rule, replica_axis=replica_axis)
    return jax.jit(init, out_shardings=sharding)()


# --- The step and the data --------------------------------------------------------------


def sharded_step(step_fn: Callable, mesh: Mesh, *, rule: Rule = None, batch_axis="data"):
    """``step_fn`` with its batch split over ``batch_axis`` and its state kept as placed.

    Wraps ``step(state, batch) -> (state, metrics)`` (from ``make_train_step``)
    for ``make_fused_steps`` or ``jax.jit``: the batch drawn inside the program
    is constrained to ``PartitionSpec(batch_axis)`` (each device computes its
    slice; the loss and gradient stay means over the global batch), and the new
    state to the specs :func:`state_specs` gives with the same ``rule``, so a
    fused scan carries it with one sharding from step to step.

    Args:
      step_fn: the step to wrap.
      mesh: the mesh the state was placed on with :func:`shard_state`.
      rule: the parameter rule given to :func:`shard_state`.
      batch_axis: the mesh axis (or tuple of axes) that splits the batch; None
        leaves the batch to XLA, which is the choice when the replicas of
        ``init_replicas`` are split over the devices instead
        (``shard_state(..., replica_axis="data")``).

    Returns:
      ``step(state, batch) -> (state, metrics)``.
    """
    explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
    if explicit:
        raise ValueError(
            f"sharded_step needs a mesh whose axes are of type Auto; {explicit} are not. "
            "Build the mesh with mesh_from_spec (Auto by default) or pass "
            "axis_types=(AxisType.Auto, ...) to jax.make_mesh."
        )
    ways = 1 if batch_axis is None else _axis_size(mesh, batch_axis, "sharded_step")
    batch_sharding = None if batch_axis is None else NamedSharding(mesh, P(batch_axis))

    def step(state: TrainState, batch: Any):
        if batch_sharding is not None:
            size = jax.tree.leaves(batch)[0].shape[0]
            if size % ways:
                raise ValueError(
                    f"a batch of {size} examples cannot be split evenly over the {ways} devices "
                    f"of mesh axis {batch_axis!r}; use a batch size divisible by {ways}"
                )
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        new_state, metrics = step_fn(state, batch)
        new_state = jax.lax.with_sharding_constraint(
            new_state, state_sharding(new_state, mesh, rule)
        )
        return new_state, metrics

    return step


def make_sharded_steps(
    step_fn: Callable,
    dataset: Any,
    mesh: Mesh,
    *,
    rule: Rule = None,
    batch_axis: Any = "data",
    replica_axis: str | None = None,
    **fused: Any,
) -> Callable:
    """``make_fused_steps`` of :func:`sharded_step` that returns the state as it was placed.

    A jitted program chooses the shardings of its outputs itself, and XLA may
    return a replicated leaf split (it is free to do so); the next call would
    then see new input shardings and compile again. ``run`` moves any such leaf
    back to the sharding :func:`shard_state` gave it (no copy when it is already
    there), so every call reuses one program.

    Args:
      step_fn: ``step(state, batch)`` from ``make_train_step``.
      dataset: ``(x, y)`` arrays; NumPy arrays are replicated on every device of
        ``mesh`` (:func:`replicate`), ``jax.Array`` (from :func:`shard_data`) used
        as placed. Or a source of host batches (as for ``make_fused_steps``),
        each process yielding its own rows of every batch: each chunk is
        placed with its batch split over ``batch_axis``.
      mesh, rule, batch_axis: as for :func:`sharded_step`.
      replica_axis: as for :func:`shard_state`; needs ``replicated=True``.
      **fused: ``batch_size``, ``num_steps``, ``shuffle``, ``replicated``,
        ``vectorize_replicas``, ``canonical_convs``, ``donate``, passed to ``make_fused_steps``
        (replicas split over ``replica_axis`` are always vectorized).

    Returns:
      ``run(state) -> (state, metrics)`` for a state placed with
      ``shard_state(state, mesh, rule, replica_axis=replica_axis)``.
    """
    if replica_axis is not None and not fused.get("replicated", False):
        raise ValueError("replica_axis splits stacked replicas: pass replicated=True as well")
    if _stream.is_source(dataset):
        step = sharded_step(step_fn, mesh, rule=rule, batch_axis=batch_axis)
        fused.pop("shuffle", None)  # the source's order is its own

        def keep(new_state):
            placed = state_sharding(new_state, mesh, rule, replica_axis=replica_axis)
            return jax.tree.map(_keep_placed, new_state, placed)

        vectorize = fused.pop("vectorize_replicas", False) or replica_axis is not None
        return _stream.streamed_steps(
            step, dataset, sharding=_stream.batch_sharding(mesh, batch_axis),
            keep_placed=keep, vectorize_replicas=vectorize, **fused,
        )  # fmt: skip
    if not all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(dataset)):
        dataset = replicate(dataset, mesh)
    step = sharded_step(step_fn, mesh, rule=rule, batch_axis=batch_axis)
    # Replicas split over devices must run side by side: a loop over a split axis
    # would gather it.
    vectorize = fused.pop("vectorize_replicas", False) or replica_axis is not None
    fused_run = make_fused_steps(step, dataset, vectorize_replicas=vectorize, **fused)

    def run(state: TrainState):
        new_state, metrics = fused_run(state)
        placed = state_sharding(new_state, mesh, rule, replica_axis=replica_axis)
        return jax.tree.map(_keep_placed, new_state, placed), metrics

    run.lower = fused_run.lower  # the program, as make_fused_steps's run.lower gives it
    return run


def _keep_placed(leaf: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``leaf`` on ``sharding``: as it is when it already is, else moved there.

    ``jax.device_put`` refuses a sharding with devices of other processes, so
    across processes the move is a compiled identity with that output sharding.
    """
    if leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
        return leaf
    if sharding.is_fully_addressable:
        return jax.device_put(leaf, sharding)
    return jax.jit(lambda a: a, out_shardings=sharding)(leaf)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...], where: str) -> int:
    """The number of devices along ``axis`` (a name or a tuple of names) of ``mesh``."""
    names = axis if isinstance(axis, tuple) else (axis,)
    unknown = [n for n in names if n not in mesh.shape]
    if unknown:
        raise ValueError(f"{where}: axis {unknown[0]!r} is not one of {tuple(mesh.axis_names)}")
    return math.prod(mesh.shape[n] for n in names)


def process_rows(num_examples: int) -> slice:
    """The rows of a dataset of ``num_examples`` that this process loads: an equal,
    contiguous share (process ``i`` of ``n`` gets the ``i``-th ``n``-th)."""
    count, index = jax.process_count(), jax.process_index()
    if num_examples % count:
        raise ValueError(
            f"{num_examples} examples cannot be shared equally by {count} processes; "
            f"drop the last {num_examples % count}"
        )
    share = num_examples // count
    return slice(index * share, (index + 1) * share)


def shard_data(local: Any, mesh: Mesh, *, axis: str | tuple[str, ...] = "data") -> Any:
    """A global array of every process's rows, split over ``axis`` on its leading dimension.

    Each process passes only the rows it loaded (a batch, or its share of a
    dataset from :func:`process_rows`); ``jax.make_array_from_process_local_data``
    assembles the global array without copying rows between hosts. With one
    process this is ``jax.device_put`` with the sharding.

    Args:
      local: pytree of arrays with a leading example axis, the same shape on every
        process.
      mesh: the mesh.
      axis: the mesh axis (or axes) that splits the examples.

    Returns:
      The same pytree of global ``jax.Array`` whose leading size is the sum over
      processes.
    """
    ways = _axis_size(mesh, axis, "shard_data")
    sharding = NamedSharding(mesh, P(axis))

    def one(keypath, leaf):
        host = np.asarray(leaf)
        global_rows = host.shape[0] * jax.process_count() if host.ndim else 0
        if host.ndim == 0 or global_rows % ways:
            raise ValueError(
                f"shard_data: leaf {jax.tree_util.keystr(keypath) or '(root)'} of shape "
                f"{host.shape} on each of {jax.process_count()} process(es) gives "
                f"{global_rows} rows, which cannot be split over the {ways} devices of "
                f"axis {axis!r}"
            )
        return jax.make_array_from_process_local_data(sharding, host)

    return jax.tree_util.tree_map_with_path(one, local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` copied whole to every device of ``mesh`` (every process passes the same).

    For a dataset small enough to sit on every device, the fused loop then draws
    each device's share of a batch locally, with no communication.
    """
    return place(tree, NamedSharding(mesh, P()))
