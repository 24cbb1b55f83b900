"""Where a run executes: the backend it demands, its processes, its matmul precision.

Asking for an accelerator that is not there is an error, never a quiet run on
the CPU (:func:`require_backend`). A run over several hosts starts with
:func:`init_distributed` on every host; afterwards ``jax.devices()`` lists the
devices of all of them, and only the primary process (:func:`is_primary`)
logs and writes reports, while every process takes part in each step and in
each checkpoint save.
"""

from __future__ import annotations

from typing import Any

import jax

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_BACKENDS = ("cpu", "gpu", "tpu")


class BackendError(RuntimeError):
    """The backend a run asked for is not the one JAX is using."""


BackendError.__module__ = "fnnet.distributed"  # shown where users import it, as fnnet.LayerError is


def require_backend(name: str) -> list[jax.Device]:
    """Checks that JAX computes on ``name`` and returns its devices (all processes').

    Args:
      name: ``"cpu"``, ``"gpu"`` or ``"tpu"``.

    Returns:
      ``jax.devices()``, each of platform ``name``.

    Raises:
      BackendError: JAX's default backend is another one: no such device was found
        (jax installed without ``[tpu]`` or ``[cuda12]``, the device busy or
        absent), or a CPU run was asked for on a machine whose default is an
        accelerator (set ``JAX_PLATFORMS=cpu``).
    """
    if name not in _BACKENDS:
        raise ValueError(f"require_backend: backend must be one of {_BACKENDS}, got {name!r}")
    actual = jax.default_backend()
    if actual == name or (name == "gpu" and actual in _GPU_PLATFORMS):
        return jax.devices()
    devices = jax.devices()
    found = f"{len(devices)} {actual} device(s) ({devices[0].device_kind})"
    if name == "cpu":
        hint = "set JAX_PLATFORMS=cpu before starting Python to run on the CPU"
    elif name == "tpu":
        hint = (
            'on a TPU VM install jax with `pip install "jax[tpu]"`; is another process holding it?'
        )
    else:
        hint = 'install a CUDA build of jax (`pip install "jax[cuda12]"`) and check `nvidia-smi`'
    raise BackendError(
        f"this run asked for the {name} backend, but JAX computes on {found}; refusing to "
        f"run elsewhere than asked. {hint}"
    )


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Any = None,
) -> tuple[int, int]:
    """Joins this process to a multi-process run (``jax.distributed.initialize``).

    Call it on every host before any other JAX call. On a Cloud TPU slice (and
    under SLURM or Open MPI) call it without arguments: JAX finds the
    coordinator and the process's index itself. Elsewhere give all three. A
    second call in the same process does nothing.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable by all.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 .. num_processes - 1``.
      local_device_ids: the local devices this process uses (default: all).

    Returns:
      ``(jax.process_index(), jax.process_count())``.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "init_distributed: give coordinator_address, num_processes and process_id "
            "together, or none of them (cluster auto-detection, as on Cloud TPU)"
        )
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """True in process 0, the one that logs, prints and writes reports."""
    return jax.process_index() == 0


def set_matmul_precision(value: str | None) -> str | None:
    """Sets how float32 matrix products and convolutions are computed; returns the old value.

    The setting is ``jax_default_matmul_precision``. None (JAX's default) favours
    speed: a float32 product runs as one bfloat16 pass with float32
    accumulation on TPU, in TensorFloat32 on NVIDIA GPUs since Ampere, and in
    float32 on CPUs. ``"highest"`` (or ``"float32"``) asks for float32 accuracy
    everywhere (on TPU six bfloat16 passes, several times slower); ``"high"``
    (``"bfloat16_3x"`` on TPU) is between. Products already in bfloat16 (the
    ``Policy.bfloat16`` compute dtype) are not affected.

    Args:
      value: None, ``"default"``, ``"high"``, ``"highest"``, ``"bfloat16"``,
        ``"tensorfloat32"``, ``"float32"``, or a ``jax.lax.DotAlgorithmPreset`` name.
    """
    old = jax.config.jax_default_matmul_precision
    try:
        jax.config.update("jax_default_matmul_precision", value)
    except ValueError as e:
        raise ValueError(f"matmul precision {value!r} is not a setting JAX knows: {e}") from None
    return old


def use_compilation_cache(directory, *, min_compile_seconds: float = 0.0) -> None:
    """Keeps every compiled program in ``directory`` for later processes to reuse.

    JAX's persistent compilation cache: a second run of the same program (the same
    model, shapes, devices and jax version) loads it instead of compiling it again,
    which for the runner's small models is most of a short run's time. Off unless
    asked for; on a pod slice, give every host its own local folder.

    Args:
      directory: a folder on disk (created if missing).
      min_compile_seconds: cache only programs that took at least this long to
        compile (JAX's default is 1 s; 0 keeps everything, as the runner's small
        programs compile in less).

    Raises:
      ValueError: ``directory`` is a URL, a file, or cannot be created.
    """
    import pathlib

    text = str(directory)
    if "://" in text:
        raise ValueError(f"compilation cache {text!r} is a URL; give a folder on disk")
    path = pathlib.Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"compilation cache {text!r} is a file, not a folder")
    if not (isinstance(min_compile_seconds, (int, float)) and min_compile_seconds >= 0):
        raise ValueError(
            f"min_compile_seconds must be a number of at least 0, got {min_compile_seconds!r}"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation cache {text!r} cannot be created: {e}") from None
    jax.config.update("jax_compilation_cache_dir", str(path.resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
