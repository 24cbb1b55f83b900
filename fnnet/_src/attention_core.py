"""The attention core: one ``jax.nn.dot_product_attention`` call for a whole batch.

fnnet's attention sees one example and ``jax.vmap`` batches it. Left to JAX's own
batching rules, ``jax.nn.dot_product_attention`` would be traced for one example
and its insides batched afterwards; for the cuDNN kernel that batching reshapes a
mask-derived bias to ``(batch, heads, seq, kv_seq)`` and fails with more than one
head (jax-ml/jax#34920). :func:`attend` carries its own batching rule instead
(``jax.custom_batching.custom_vmap``): each ``vmap`` it runs under adds one leading
axis to its operands, and when it is finally evaluated every such axis is folded
into the kernel's batch axis, so the kernel is called once on
``(batch, seq, heads, head_dim)`` however many ``vmap`` s (replicas, examples) are
stacked. A mask that one of those ``vmap`` s does not batch keeps a size-1 axis
there, so a mask shared by the whole batch reaches the kernel as
``(1, 1, seq, kv_seq)`` and a per-example one as ``(batch, 1, seq, kv_seq)``:
broadcast over the heads, never copied per head.

Differentiation. JAX cannot transpose a ``custom_vmap`` function, so :func:`attend`
is a ``jax.custom_vjp``. For the cuDNN kernel its forward and backward passes are
each custom-batched the same way, and the backward pass recomputes the forward one
(``jax.vjp`` of the same kernel call; a custom-batched result cannot carry the
vjp's residuals, whose layout JAX chooses), as flash attention does. For XLA's
kernel the forward pass of a gradient is ``jax.vjp`` of the one-example call, which
JAX batches natively into the same single batched program and whose attention
weights it keeps for the backward pass: recomputing them would change nothing in
the compiled program on the CPU (XLA merges the two), but it would add the
attention's forward products to the jaxpr that ``fnnet.train.matmul_flops``, and so
the MFU, count. Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) is not
supported, as it is not for ``jax.nn.dot_product_attention(implementation="cudnn")``
either.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# The implementations whose gradient is custom-batched too (see the module docstring).
_BATCHED_BACKWARD = ("cudnn",)


def attend(q, k, v, mask, length, *, is_causal: bool, implementation) -> jax.Array:
    """Scaled dot-product attention for one example (batch it with ``jax.vmap``).

    Args:
      q: queries, ``(seq, heads, head_dim)``.
      k, v: keys and values, ``(kv_seq, kv_heads, head_dim)``.
      mask: ``None`` or a boolean ``(seq, kv_seq)``, True where a query may attend.
      length: ``None`` or an int32 scalar: keys at positions ``>= length`` are
        masked for every query (the kernel's ``key_value_seq_lengths``).
      is_causal: query ``i`` attends only to keys ``j <= i`` (the kernel's own mask).
      implementation: passed to ``jax.nn.dot_product_attention``.

    Returns:
      ``(seq, heads, head_dim)``.
    """
    batched_backward = implementation in _BATCHED_BACKWARD
    return _core(is_causal, implementation, batched_backward)(q, k, v, mask, length)


def _add_axis(axis_size: int, in_batched, q, k, v, mask, length):
    """Gives the operands a vmap did not batch that vmap's leading axis.

    Queries, keys, values and lengths are broadcast to ``axis_size``; a mask gets a
    size-1 axis, so that a mask shared by the batch stays shared in the kernel call.
    """
    q_b, k_b, v_b, mask_b, length_b = in_batched

    def broadcast(x, batched):
        return x if batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))

    if mask is not None and not mask_b:
        mask = mask[None]
    if length is not None:
        length = broadcast(length, length_b)
    return broadcast(q, q_b), broadcast(k, k_b), broadcast(v, v_b), mask, length


def _kernel(q, k, v, mask, length, *, is_causal: bool, implementation):
    """One kernel call for operands with any number of leading (vmap) axes.

    ``q`` is ``(*lead, seq, heads, head_dim)``, ``k``/``v`` ``(*lead, kv_seq, kv_heads,
    head_dim)``, ``length`` ``(*lead,)`` and ``mask`` ``(*lead_or_1, seq, kv_seq)``.
    """
    lead = q.shape[:-3]  # the vmap axes, outermost first; () for one example
    batch = math.prod(lead)

    def fold(x):
        return jnp.reshape(x, (batch, *x.shape[len(lead) :]))

    if mask is not None:
        seq, kv_seq = mask.shape[-2:]
        if all(n == 1 for n in mask.shape[:-2]):
            mask = jnp.reshape(mask, (1, 1, seq, kv_seq))  # shared by the batch and the heads
        else:
            mask = jnp.broadcast_to(mask, (*lead, seq, kv_seq))
            mask = jnp.reshape(mask, (batch, 1, seq, kv_seq))  # shared by the heads
    if length is not None:
        length = jnp.reshape(length, (batch,))
    # JAX's kernel mixes its float32 scale into bfloat16 inputs; allow that here so
    # callers under strict dtype promotion can still run bfloat16 attention.
    with jax.numpy_dtype_promotion("standard"):
        out = jax.nn.dot_product_attention(
            fold(q),
            fold(k),
            fold(v),
            mask=mask,
            key_value_seq_lengths=length,
            is_causal=is_causal,
            implementation=implementation,
        )  # (batch, seq, heads, head_dim)
    return jnp.reshape(out, q.shape)


def _custom_batched(fun):
    """``fun(q, k, v, mask, length)``, batched by giving every operand the vmap's axis."""
    batched = jax.custom_batching.custom_vmap(fun)

    @batched.def_vmap
    def rule(axis_size, in_batched, q, k, v, mask, length):
        # Calling `batched` again, not `fun`: an enclosing vmap then adds its axis too.
        return batched(*_add_axis(axis_size, in_batched, q, k, v, mask, length)), True

    return batched


@functools.cache
def _core(is_causal: bool, implementation, batched_backward: bool):
    """The custom-batched, differentiable core for one static configuration."""

    def kernel(q, k, v, mask, length):
        return _kernel(q, k, v, mask, length, is_causal=is_causal, implementation=implementation)

    forward = _custom_batched(kernel)

    def kernel_vjp_out(q, k, v, mask, length):
        return jax.vjp(lambda q, k, v: kernel(q, k, v, mask, length), q, k, v)[0]

    forward_vjp = _custom_batched(kernel_vjp_out)

    def kernel_vjp(q, k, v, mask, length, g):
        _, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, mask, length), q, k, v)
        with jax.numpy_dtype_promotion("standard"):
            return pullback(g)

    backward = jax.custom_batching.custom_vmap(kernel_vjp)

    @backward.def_vmap
    def backward_rule(axis_size, in_batched, q, k, v, mask, length, g):
        operands = _add_axis(axis_size, in_batched[:5], q, k, v, mask, length)
        g = g if in_batched[5] else jnp.broadcast_to(g, (axis_size, *g.shape))
        grads = backward(*operands, g)
        # An operand this vmap did not batch gets the sum of its per-example cotangents.
        grads = tuple(d if b else jnp.sum(d, axis=0) for d, b in zip(grads, in_batched[:3]))
        return grads, tuple(bool(b) for b in in_batched[:3])

    @jax.custom_vjp
    def core(q, k, v, mask, length):
        return forward(q, k, v, mask, length)

    def core_fwd(q, k, v, mask, length):
        if batched_backward:
            # The output of jax.vjp's forward call, so that it is the very call the
            # backward pass repeats (the same kernel mode), which XLA can merge.
            return forward_vjp(q, k, v, mask, length), (q, k, v, mask, length)
        out, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, mask, length), q, k, v)
        return out, pullback

    def core_bwd(residuals, g):
        if batched_backward:
            return (*backward(*residuals, g), None, None)
        with jax.numpy_dtype_promotion("standard"):
            return (*residuals(g), None, None)

    core.defvjp(core_fwd, core_bwd)
    return core
