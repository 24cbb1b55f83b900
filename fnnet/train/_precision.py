"""Mixed precision: which dtype parameters are kept in, computed in, and returned in.

A :class:`Policy` names three dtypes (the scheme of Micikevicius et al., 2018,
"Mixed Precision Training", with bfloat16 in place of float16 so no loss
scaling is needed):

* ``param_dtype``: the master copy of the parameters, which the optimizer
  updates. Keep it float32: a bfloat16 weight cannot absorb an update smaller
  than 1/256 of itself.
* ``compute_dtype``: what the forward pass runs in. bfloat16 halves memory
  traffic and uses the tensor cores of GPUs and TPUs.
* ``output_dtype``: what the model hands to the loss; float32, so the loss and
  its log-sum-exp are accurate.

Only floating-point leaves are cast: integer token ids, class labels and PRNG
keys pass through. Gradients taken through a cast come back in the dtype of
what was cast, so the gradients of float32 params are float32.

fnnet's normalization layers compute their statistics (mean, variance) in
float32 whatever their input and hand back the input's dtype, so under the
bfloat16 policy the matrix products that follow a normalization still run in
bfloat16; the attention's softmax runs in float32 inside
``jax.nn.dot_product_attention``; a dense layer computes in the common dtype of
its input and weights. The policy decides what goes in; the layers keep the
numerically delicate parts accurate.

A policy is static configuration: close over it (or mark it static), do not
pass it through ``jax.jit`` as an argument.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnnet._src.layer import Layer

_BFLOAT16_PLATFORMS = ("gpu", "tpu", "cuda", "rocm")
_FLOAT32_PLATFORMS = ("cpu",)


def _cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts every floating-point array leaf of ``tree`` to ``dtype``; others pass through."""

    def cast(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf).astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)


class Policy(NamedTuple):
    """The dtypes of a mixed-precision scheme.

    Attributes:
      param_dtype: dtype the parameters are stored and updated in.
      compute_dtype: dtype of the forward pass (params and inputs are cast to it).
      output_dtype: dtype of the model output given to the loss and metrics.

    Example:
      >>> policy = fnnet.train.Policy.bfloat16()
      >>> policy.cast_input(jnp.ones(3)).dtype
      dtype(bfloat16)
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    @staticmethod
    def float32() -> Policy:
        """Everything in float32: the reference, and the right choice on CPUs."""
        return Policy(jnp.float32, jnp.float32, jnp.float32)

    @staticmethod
    def bfloat16() -> Policy:
        """float32 params and outputs, bfloat16 compute: the usual GPU/TPU choice."""
        return Policy(jnp.float32, jnp.bfloat16, jnp.float32)

    def cast_to_param(self, params: Any) -> Any:
        """Floating leaves of ``params`` to ``param_dtype`` (once, after ``init``)."""
        return _cast_floating(params, self.param_dtype)

    def cast_params(self, params: Any) -> Any:
        """Floating leaves of ``params`` to ``compute_dtype``, for the forward pass."""
        return _cast_floating(params, self.compute_dtype)

    def cast_input(self, x: Any) -> Any:
        """Floating leaves of the input ``x`` to ``compute_dtype``; token ids pass."""
        return _cast_floating(x, self.compute_dtype)

    def cast_output(self, y: Any) -> Any:
        """Floating leaves of the model output ``y`` to ``output_dtype``."""
        return _cast_floating(y, self.output_dtype)


def policy_for_backend(platform: str | None = None) -> Policy:
    """The sensible default policy for a platform.

    bfloat16 compute on accelerators, whose matrix units run it at several
    times the float32 rate (on GPUs older than NVIDIA Ampere it is emulated and
    brings no speed); float32 on CPUs, where bfloat16 is emulated and slower.

    Args:
      platform: ``"cpu"``, ``"gpu"`` (or ``"cuda"``, ``"rocm"``) or ``"tpu"``;
        by default ``jax.default_backend()``.

    Returns:
      ``Policy.bfloat16()`` on GPU and TPU, ``Policy.float32()`` on CPU.
    """
    if platform is None:
        platform = jax.default_backend()
    name = str(platform).lower()
    if name in _BFLOAT16_PLATFORMS:
        return Policy.bfloat16()
    if name in _FLOAT32_PLATFORMS:
        return Policy.float32()
    raise ValueError(
        f"policy_for_backend: unknown platform {platform!r}; expected one of "
        f"{list(_FLOAT32_PLATFORMS + _BFLOAT16_PLATFORMS)}, or build a Policy directly"
    )


# What fit's (and the runner's) policy argument takes by name.
POLICY_NAMES = ("auto", "float32", "bfloat16")


def resolve_policy(policy: Any, platform: str | None = None, *, argument: str = "policy"):
    """``policy`` as fit uses it: a :class:`Policy`, or None for no casts at all.

    Args:
      policy: ``"auto"`` (:func:`policy_for_backend` of ``platform``, except that the
        CPU's float32 is None: the model computes in its parameters' own dtype,
        float32, with no casts), ``"float32"``, ``"bfloat16"`` (``Policy.float32()``,
        ``Policy.bfloat16()``), a :class:`Policy`, or None.
      platform: the platform the run computes on (default ``jax.default_backend()``).
      argument: the name errors give the argument.

    Raises:
      ValueError: ``policy`` is none of these, naming ``argument``.
    """
    if policy is None or isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and policy in POLICY_NAMES:
        if policy == "float32":
            return Policy.float32()
        if policy == "bfloat16":
            return Policy.bfloat16()
        chosen = policy_for_backend(platform)
        return None if chosen == Policy.float32() else chosen
    raise ValueError(
        f"{argument} must be one of {list(POLICY_NAMES)}, a fnnet.train.Policy or None, "
        f"got {policy!r}"
    )


def describe_policy(policy: Policy | None, params: Any = None) -> str:
    """A short phrase for summaries and logs: ``"float32"``, or ``"bfloat16 compute,
    float32 params, float32 outputs"``.

    Args:
      policy: the policy, or None: no casts, so the model computes in the dtype(s)
        of ``params``' floating leaves (``"float32"`` for fnnet's defaults).
      params: the parameters, read only when ``policy`` is None.
    """
    if policy is None:
        kinds = sorted(
            {jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)
             if jnp.issubdtype(leaf.dtype, jnp.floating)}
        )  # fmt: skip
        return "/".join(kinds) or "no casts"
    names = {
        key: jnp.dtype(getattr(policy, f"{key}_dtype")).name
        for key in ("param", "compute", "output")
    }
    if len(set(names.values())) == 1:
        return names["compute"]
    return f"{names['compute']} compute, {names['param']} params, {names['output']} outputs"


def apply_with_policy(
    model: Layer, policy: Policy, params: Any, state: Any, x: Any, **kwargs: Any
) -> tuple[Any, Any]:
    """Applies ``model`` to one example under ``policy``; returns ``(y, new_state)``.

    Params and input are cast to the compute dtype, the output to the output
    dtype. The state (BatchNorm's running statistics) is given to the model as
    it is and every new state leaf is cast back to its old dtype: running
    averages move by ``(1 - momentum)`` times a small difference each step,
    which bfloat16 would round away.

    Args:
      model: any :class:`fnnet.Layer`, stateful or not.
      policy: the dtypes to use.
      params: the model's params (in ``param_dtype``).
      state: the model's state (``{}`` when stateless).
      x: one example.
      **kwargs: passed to ``model.apply_with_state`` (``key``, ``train``,
        ``lengths``, ...).

    Returns:
      ``(y, new_state)``: ``y`` with floating leaves in ``output_dtype``,
      ``new_state`` with the dtypes of ``state``.
    """
    y, new_state = model.apply_with_state(
        policy.cast_params(params), state, policy.cast_input(x), **kwargs
    )
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
    return policy.cast_output(y), new_state
