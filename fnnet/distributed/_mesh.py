"""Meshes: the named axes of a grid of devices, from a short spec such as ``"data=8"``.

The mesh's axes are of JAX's ``Auto`` type. fnnet's layers carry no sharding
annotations, and XLA's sharding propagation partitions them from the shardings
of the inputs and of the constraints ``sharded_step`` adds. Under ``Explicit``
axes (``jax.make_mesh``'s default) every operation must settle its output's
sharding from its operands' types, which the train step does not: it vmaps the
model over the batch together with per-example dropout keys made inside the
step, and JAX 0.10 refuses that ("Mapped away dimension of inputs passed to vmap
should be sharded the same"); an FSDP-sharded ``x @ w`` would likewise have the
batch of ``x`` and the rows of ``w`` claim one axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

_AXIS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ALL = -1  # the size of an axis that takes every device the others leave


def mesh_from_spec(
    spec: str | Mapping[str, int],
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_types: Sequence[AxisType] | None = None,
) -> Mesh:
    """A device mesh from a short description such as ``"data=8"``.

    Args:
      spec: ``"name=size,name=size"`` (``"data=4,model=2"``) or a mapping
        ``{"data": 8}``. One axis may have size ``-1`` (or no ``=size``): it
        takes all the devices the other axes leave, so ``"data"`` is pure data
        parallelism over every device.
      devices: the devices to lay out (default: ``jax.devices()``, every device
        of every process).
      axis_types: one ``jax.sharding.AxisType`` per axis; default ``Auto`` for
        every axis (see the module docstring for why).

    Returns:
      A ``jax.sharding.Mesh`` built by ``jax.make_mesh`` (which orders devices
      for fast collectives on TPU). With one process the mesh may use fewer
      devices than there are (the first ones); with several it must use them all.
    """
    axes = _parse_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    known = math.prod(size for size in axes.values() if size != _ALL)
    if _ALL in axes.values():
        if len(devices) % known:
            raise ValueError(
                f"mesh {_describe_spec(spec)}: the other axes use {known} devices, which does "
                f"not divide the {len(devices)} devices available"
            )
        axes = {
            name: len(devices) // known if size == _ALL else size for name, size in axes.items()
        }
    total = math.prod(axes.values())
    if total > len(devices):
        raise ValueError(
            f"mesh {_describe_spec(spec)} needs {total} devices, but JAX sees {len(devices)} "
            f"({_device_summary(devices)}). On a CPU, simulate more with "
            'jax.config.update("jax_num_cpu_devices", N) before JAX starts.'
        )
    if total < len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"mesh {_describe_spec(spec)} uses {total} of the {len(devices)} devices of "
            f"{jax.process_count()} processes; with several processes the mesh must cover "
            "every device, so that every process holds part of it"
        )
    if axis_types is None:
        axis_types = (AxisType.Auto,) * len(axes)
    if len(axis_types) != len(axes):
        raise ValueError(f"axis_types has {len(axis_types)} entries for {len(axes)} mesh axes")
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), axis_types=tuple(axis_types), devices=devices[:total]
    )


def _parse_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    if isinstance(spec, str):
        pairs = []
        for part in spec.split(","):
            name, _, size = part.strip().partition("=")
            try:
                value = int(size) if size.strip() else _ALL
            except ValueError:
                raise ValueError(
                    f"mesh spec {spec!r}: size {size!r} of axis {name.strip()!r} is not an "
                    "integer; write it as 'data=8' or 'data=4,model=2'"
                ) from None
            pairs.append((name.strip(), value))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise TypeError(f"mesh spec must be a string like 'data=8' or a dict, got {spec!r}")
    axes: dict[str, int] = {}
    for name, size in pairs:
        if not isinstance(name, str) or not _AXIS_NAME.fullmatch(name):
            raise ValueError(f"mesh spec {spec!r}: axis name {name!r} is not an identifier")
        if name in axes:
            raise ValueError(f"mesh spec {spec!r} names axis {name!r} twice")
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != _ALL):
            raise ValueError(
                f"mesh spec {spec!r}: axis {name!r} has size {size!r}; sizes are positive "
                "integers, or -1 for all remaining devices"
            )
        axes[name] = size
    if not axes:
        raise ValueError(f"mesh spec {spec!r} names no axes")
    if list(axes.values()).count(_ALL) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may take the remaining devices")
    return axes


def _describe_spec(spec: str | Mapping[str, int]) -> str:
    if isinstance(spec, str):
        return repr(spec)
    return repr(",".join(f"{k}={v}" for k, v in spec.items()))


def _device_summary(devices: Sequence[jax.Device]) -> str:
    kinds = sorted({d.platform for d in devices})
    return f"{'/'.join(kinds) or 'none'}, {jax.process_count()} process(es)"
