"""What a training step costs: its FLOPs, the device's peak, and the fraction used (MFU).

Three counts of one step's floating-point operations, each a total over every
device the step runs on, so they can be checked against each other:

* :func:`transformer_lm_flops`: the standard analytic count of a Transformer
  language model (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
  section 2.1; Chowdhery et al. 2022, "PaLM", appendix B): per token, 2 FLOPs per
  weight of every matrix product forward and 4 backward (``6 * N``), plus
  ``12 * layers * seq * features`` for the attention scores and the weighted sum
  of values, forward and backward. This is the numerator of model FLOPs
  utilization as PaLM defines it: the arithmetic the model needs, not what an
  implementation happens to do (rematerialization would not raise it).
* :func:`matmul_flops`: the same quantity for any JAX function, read from its
  jaxpr: ``2 * m * n * k`` for every matrix product and convolution, a
  ``lax.scan`` body counted once per iteration. Elementwise work is not counted.
* :func:`xla_flops`: XLA's cost analysis of the compiled program. It also counts
  elementwise arithmetic (softmax, GELU, normalization, the optimizer's update),
  so it exceeds the other two by a few percent on a large model and more on a
  small one; and it counts a loop body once, whatever its trip count.

:func:`peak_flops` gives a device's dense peak FLOP/s from its ``device_kind``
(vendor figures, below) or from the user, and :func:`mfu` divides achieved by peak.
An unknown device gets no peak and no MFU, with the reason, rather than a guess.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnnet.models import config_of

PEAK_ENV = "FNNET_PEAK_FLOPS"

# Dense (no 2:4 sparsity) bfloat16 peak per device, FLOP/s, by a substring of
# jax.Device.device_kind (compared in lower case) without an excluded word. Variants
# with another peak that no figure here was checked for (H100 PCIe and NVL, H200 NVL)
# stay unknown.
# - H100 SXM and H200 SXM: 1,979 TFLOPS bf16 Tensor Core "with sparsity" on NVIDIA's
#   product pages (https://www.nvidia.com/en-us/data-center/h100/, .../h200/; one die),
#   half of it dense. (Checked against secondary copies of those tables, which give
#   989 dense; NVIDIA's own pages were not at hand.)
# - A100, SXM and PCIe: 312 TFLOPS bf16 dense (NVIDIA's A100 data sheet,
#   https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf).
# - TPU v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOPS bf16 per chip: Google
#   Cloud's architecture pages, https://cloud.google.com/tpu/docs/v4 (and v5e, v5p,
#   v6e). JAX names v5e "TPU v5 lite", v5p "TPU v5" and v6e "TPU v6 lite".
_BF16_PEAKS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("h100", ("pcie", "nvl"), 989.5e12),
    ("h200", ("nvl",), 989.5e12),
    ("a100", (), 312e12),
    ("tpu v4", ("lite",), 275e12),  # "TPU v4 lite" (v4i) is another chip
    ("tpu v5 lite", (), 197e12),
    ("tpu v5e", (), 197e12),
    ("tpu v5p", (), 459e12),
    ("tpu v6 lite", (), 918e12),
    ("tpu v6e", (), 918e12),
)
# JAX calls a v5p plain "TPU v5", a prefix of "TPU v5 lite": matched whole.
_EXACT_BF16_PEAKS = {"tpu v5": 459e12}


class Peak(NamedTuple):
    """A device's peak FLOP/s and where the figure came from.

    Attributes:
      flops: peak FLOP/s of ONE device, or None when unknown.
      source: ``"argument"``, ``"FNNET_PEAK_FLOPS"``, ``"table: <device_kind>"``, or,
        when ``flops`` is None, why there is no figure and how to give one.
    """

    flops: float | None
    source: str


def _positive(value: Any, name: str) -> float:
    """``value`` as a positive finite float, else a ValueError naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def _table_peak(kind: str) -> float | None:
    kind = kind.lower()
    if kind in _EXACT_BF16_PEAKS:
        return _EXACT_BF16_PEAKS[kind]
    for name, excluded, flops in _BF16_PEAKS:
        if name in kind and not any(word in kind for word in excluded):
            return flops
    return None


def peak_flops(device: Any = None, dtype: Any = jnp.bfloat16, *, override: Any = None) -> Peak:
    """The peak FLOP/s of one device, for matrix products in ``dtype``.

    In order: ``override`` if given; else the environment variable
    ``FNNET_PEAK_FLOPS`` (FLOP/s, e.g. ``989.5e12``) if set; else the vendor's dense
    bfloat16 figure for the device's ``device_kind`` (H100/H200 SXM, A100, TPU v4,
    v5e, v5p, v6e). The CPU, other devices, and any dtype but bfloat16 have no
    figure in the table (a float32 matrix product's peak depends on whether XLA
    uses TF32 or bf16 passes): their :class:`Peak` has ``flops=None`` and says why.

    Args:
      device: a ``jax.Device``; default ``jax.devices()[0]``.
      dtype: the compute dtype the peak is for.
      override: peak FLOP/s of one device, which wins over everything else.

    Returns:
      A :class:`Peak`.

    Raises:
      ValueError: ``override`` or ``FNNET_PEAK_FLOPS`` is not a positive finite
        number (zero, negative, nan, inf, text), named in the message.
    """
    if override is not None:
        return Peak(_positive(override, "peak_flops override"), "argument")
    from_env = os.environ.get(PEAK_ENV)
    if from_env is not None and from_env.strip():
        return Peak(_positive(from_env.strip(), PEAK_ENV), PEAK_ENV)
    device = jax.devices()[0] if device is None else device
    kind = str(getattr(device, "device_kind", device))
    how = f"pass the peak FLOP/s of one device, or set {PEAK_ENV}"
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return Peak(None, f"no {jnp.dtype(dtype).name} peak is recorded for {kind}; {how}")
    flops = _table_peak(kind)
    if flops is None:
        return Peak(None, f"unknown peak for {kind}; {how}")
    return Peak(flops, f"table: {kind}")


def mfu(
    flops_per_step: float, seconds_per_step: float, peak: float | None, devices: int = 1
) -> float | None:
    """Model FLOPs utilization: achieved FLOP/s over the devices' combined peak.

    ``flops_per_step / seconds_per_step / (peak * devices)``, a fraction (0.4 is 40%).

    Args:
      flops_per_step: the model's FLOPs for one whole step, over all devices
        (:func:`transformer_lm_flops` or :func:`matmul_flops`).
      seconds_per_step: wall-clock seconds one step took.
      peak: peak FLOP/s of ONE device (``peak_flops().flops``); None gives None.
      devices: how many devices ran the step.

    Returns:
      The fraction, or None when ``peak`` is None.

    Raises:
      ValueError: an argument is not positive and finite (``devices`` not a positive int).
    """
    flops_per_step = _positive(flops_per_step, "flops_per_step")
    seconds_per_step = _positive(seconds_per_step, "seconds_per_step")
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)) or devices < 1:
        raise ValueError(f"devices must be a positive int, got {devices!r}")
    if peak is None:
        return None
    peak = _positive(peak, "peak")
    return flops_per_step / seconds_per_step / (peak * int(devices))


def transformer_lm_flops(model_or_config: Any, *, batch: int, seq: int) -> float:
    """The FLOPs of one training step of a :func:`fnnet.models.transformer_lm`.

    Per token, with ``d = features``, ``L = depth``, ``h = mlp_ratio * d``:
    ``6 * N + 12 * L * seq * d``, where ``N`` counts the weights of matrix products:
    ``L * (2 * d * d + 2 * d * d_kv + 2 * d * h) + d * vocab`` (queries, keys and
    values, output projection, the MLP's two layers; then the output layer, which is
    the token table when tied). Biases, norms and the position table are not matrix
    products and are left out, as Kaplan et al. (2020) leave out embeddings; the
    attention term counts the full ``seq x seq`` scores, as PaLM (appendix B) does,
    although a causal model needs only half of them.

    Args:
      model_or_config: the model (built by ``transformer_lm``), or
        ``fnnet.models.config_of(model)``, or its ``"kwargs"``.
      batch: sequences per step (over all devices).
      seq: tokens per sequence.

    Returns:
      FLOPs of one forward and backward pass over ``batch * seq`` tokens
      (the optimizer's update is elementwise and not counted).
    """
    kwargs = _lm_kwargs(model_or_config)
    for name, value in (("batch", batch), ("seq", seq)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"transformer_lm_flops: {name} must be a positive int, got {value!r}")
    d, depth, heads = (
        kwargs.get("features", 128),
        kwargs.get("depth", 4),
        kwargs.get("num_heads", 4),
    )
    kv_heads = kwargs.get("num_kv_heads") or heads
    hidden = int(kwargs.get("mlp_ratio", 4) * d)
    d_kv = d // heads * kv_heads
    matmul_weights = depth * (2 * d * d + 2 * d * d_kv + 2 * d * hidden) + d * kwargs["vocab"]
    per_token = 6 * matmul_weights + 12 * depth * seq * d
    return float(per_token * batch * seq)


def _lm_kwargs(model_or_config: Any) -> dict:
    config = model_or_config
    if not isinstance(config, dict):
        config = config_of(model_or_config)
    if "model" in config:
        if config["model"] != "transformer_lm":
            raise ValueError(
                f"transformer_lm_flops counts a transformer_lm, got a {config['model']}; "
                "use matmul_flops for other models"
            )
        config = config["kwargs"]
    if "vocab" not in config:
        raise ValueError(f"transformer_lm_flops: the config names no vocab: {sorted(config)}")
    return config


def _sub_jaxprs(value: Any):
    """The jaxprs inside one equation parameter (a jaxpr, a closed one, or a tuple)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _equation_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        # Every lhs element meets every rhs column it is not contracted or batched with.
        rhs_free = [n for i, n in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
        return 2.0 * math.prod(lhs) * math.prod(rhs_free)
    if name == "conv_general_dilated":
        out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
        out_channels = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * math.prod(out) * math.prod(rhs) / out_channels
    if name == "while":
        raise ValueError(
            "matmul_flops: a while loop's trip count is not known when tracing; count "
            "its body and multiply, or write the loop as a lax.scan"
        )
    if name == "cond":
        return max(_jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
    inner = sum(_jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
    if name == "scan":
        return inner * eqn.params["length"]
    if name == "shard_map":
        return inner * math.prod(eqn.params["mesh"].shape.values())  # the body sees one shard
    return inner


def _jaxpr_flops(jaxpr) -> float:
    return float(sum(_equation_flops(eqn) for eqn in jaxpr.eqns))


def matmul_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
    """The FLOPs of the matrix products and convolutions ``fn(*args, **kwargs)`` runs.

    Read from the jaxpr (nothing is compiled or run; arrays may be
    ``jax.ShapeDtypeStruct``): ``2 * m * n * k`` per ``(m, k) @ (k, n)`` product and
    the like for batched products and convolutions, a ``lax.scan`` body times its
    length, a ``lax.cond`` by its costliest branch, a ``shard_map`` body times its
    mesh. For a training step this is the model's FLOPs (forward and backward),
    the numerator of MFU; a fused kernel that hides its products from JAX (cuDNN
    attention) is not seen, so count such a model with :func:`transformer_lm_flops`.

    Raises:
      ValueError: ``fn`` contains a ``lax.while_loop`` (its trip count is unknown).
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return _jaxpr_flops(closed.jaxpr)


def xla_flops(fn: Callable, *args: Any, allow_loops: bool = False) -> float:
    """XLA's count of the FLOPs of ``jax.jit(fn)(*args)``, over all its devices.

    The compiled program's ``cost_analysis()["flops"]`` (a dict in current JAX, a
    list of one dict per program in older ones), which is per device for a program
    partitioned over several, times the number of partitions. It counts elementwise
    and reduction arithmetic too (not the transcendentals, which it reports apart),
    so it exceeds :func:`matmul_flops`.

    Args:
      fn: the function, e.g. a training step ``step(state, batch)``; compiled here.
      *args: its arguments (arrays or ``jax.ShapeDtypeStruct``s, with shardings).
      allow_loops: XLA counts a loop's body once, whatever its trip count, so a
        program with a loop left after compilation (``fnnet.repeat`` over more
        than 4 blocks) gets too small a count: by default that is an error;
        True returns the count anyway.

    Raises:
      ValueError: the compiled program has a loop and ``allow_loops`` is False, or
        XLA reports no FLOP count.
    """
    return compiled_flops(jax.jit(fn).lower(*args).compile(), allow_loops=allow_loops)


def compiled_flops(compiled: Any, *, allow_loops: bool = False) -> float:
    """:func:`xla_flops` of a program already compiled (``jax.jit(f).lower(...).compile()``),
    e.g. the one a benchmark or a training loop runs, so nothing compiles twice."""
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else {}
    if not costs or "flops" not in costs:
        raise ValueError("xla_flops: XLA's cost analysis reported no FLOP count on this backend")
    text = compiled.as_text()
    if not allow_loops and re.search(r"\swhile\(", text):
        raise ValueError(
            "xla_flops: the compiled program has a loop, whose body XLA counts once; use "
            "matmul_flops, or pass allow_loops=True for XLA's count as it is"
        )
    partitions = re.search(r"num_partitions=(\d+)", text.split("\n", 1)[0])
    return float(costs["flops"]) * (int(partitions.group(1)) if partitions else 1)
