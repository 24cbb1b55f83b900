"""The training state: everything that changes from one step to the next, as one pytree.

:class:`TrainState` holds the parameters, the optimizer's state, the model's
non-trained state (BatchNorm statistics), the step counter, the two PRNG keys and
the record of the first non-finite step. Because it is a plain pytree of arrays,
``jax.jit``, ``jax.lax.scan`` and ``jax.vmap`` apply to it directly: a scan over
steps fuses many steps into one program, and a vmap over seeds trains many
replicas at once (:func:`init_replicas`).

Randomness is explicit and reproducible: ``key`` gives each step's dropout keys
(folded with the step number), ``data_key`` gives each epoch's shuffle (folded
with the epoch number), so a run restarted from a saved state draws exactly the
same numbers as one that never stopped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnnet._src.layer import Layer
from fnnet.train._inputs import init_example


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    With a leading replica axis (from :func:`init_replicas`) every field gains an
    axis of size ``replicas`` in front.

    Attributes:
      params: the trained parameters, a nested dict of arrays.
      opt_state: the optimizer's state (any optax state pytree).
      model_state: the model's non-trained state (``{}`` for a stateless model).
      step: int32 scalar, the number of steps taken (including skipped ones).
      key: typed PRNG key; step ``t`` draws dropout keys from ``fold_in(key, t)``.
      data_key: typed PRNG key; epoch ``e`` is shuffled with ``fold_in(data_key, e)``.
      nonfinite_step: int32 scalar, ``-1`` while every loss and gradient has been
        finite, else the first step whose loss, gradients or update were not.
      nonfinite_what: int32 scalar, what was not finite at that step:
        0 nothing, 1 the loss, 2 the gradients (with a finite loss), 3 the
        values the update produced (with finite loss and gradients).
    """

    params: Any
    opt_state: Any
    model_state: Any
    step: jax.Array
    key: jax.Array
    data_key: jax.Array
    nonfinite_step: jax.Array
    nonfinite_what: jax.Array


def _as_key(seed: int | jax.Array, impl: str | None) -> jax.Array:
    """A typed PRNG key from an int seed (possibly traced) or a typed key (used as is)."""
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    return jax.random.key(seed, impl=impl)


def init_state(
    model: Layer,
    optimizer: optax.GradientTransformation,
    example: Any,
    *,
    seed: int | jax.Array,
    data_seed: int | jax.Array | None = None,
    impl: str | None = None,
) -> TrainState:
    """A fresh training state for ``model`` trained by ``optimizer``.

    Args:
      model: the model, a :class:`fnnet.Layer` (stateful or not).
      optimizer: any optax gradient transformation.
      example: ONE example (no batch axis), an array or ``jax.ShapeDtypeStruct``;
        only its shape and dtype are read.
      seed: an int (a Python int, or an int32 scalar that may be traced, so
        ``jax.vmap`` over seeds works) or a typed PRNG key. It is split three ways:
        parameter initialization, dropout, and shuffling.
      data_seed: if given, the shuffle key comes from it instead of ``seed``, so
        replicas with different initializations can see the same batches.
      impl: the PRNG implementation for int seeds (``"threefry2x32"``, ``"rbg"``,
        ...); None means JAX's default. Vmapped replicas equal separate runs only
        for threefry, whose bits do not depend on batching.

    Returns:
      A :class:`TrainState` at step 0 with ``nonfinite_step == -1``.
    """
    init_key, dropout_key, data_key = jax.random.split(_as_key(seed, impl), 3)
    if data_seed is not None:
        data_key = _as_key(data_seed, impl)
    params, model_state = init_example(model, init_key, example)
    # optax mixes dtypes freely; see _step._optax_promotion.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        opt_state = optimizer.init(params)
    return TrainState(
        params=params,
        opt_state=opt_state,
        model_state=model_state,
        step=jnp.zeros((), jnp.int32),
        key=dropout_key,
        data_key=data_key,
        nonfinite_step=jnp.full((), -1, jnp.int32),
        nonfinite_what=jnp.zeros((), jnp.int32),
    )


def init_replicas(
    model: Layer,
    optimizer: optax.GradientTransformation,
    example: Any,
    seeds: Any,
    *,
    data_seeds: Any = None,
    impl: str | None = None,
) -> TrainState:
    """``len(seeds)`` training states stacked on a leading replica axis.

    Replica ``r`` is ``init_state(..., seed=seeds[r])``. Train all of them as one
    program with ``make_fused_steps(..., replicated=True)`` (or ``jax.vmap`` over
    a step).

    Args:
      seeds: int array ``(replicas,)``.
      data_seeds: None (each replica shuffles with its own seed) or int array
        ``(replicas,)``; equal entries give replicas the same batches.
      impl: PRNG implementation; use ``"threefry2x32"`` when replica ``r`` must
        equal a separate run with seed ``r`` bit for bit.

    Returns:
      A :class:`TrainState` whose every leaf has a leading axis ``(replicas, ...)``.
    """
    seeds = jnp.asarray(seeds, jnp.int32)
    if seeds.ndim != 1:
        raise ValueError(f"init_replicas: seeds must be a 1-D array, got shape {seeds.shape}")

    def one(seed, data_seed):
        return init_state(model, optimizer, example, seed=seed, data_seed=data_seed, impl=impl)

    # One compiled program rather than op-by-op dispatch of a vmapped init.
    if data_seeds is None:
        return _compile_for_one_run(jax.vmap(lambda s: one(s, None)), seeds)
    data_seeds = jnp.asarray(data_seeds, jnp.int32)
    if data_seeds.shape != seeds.shape:
        raise ValueError(
            f"init_replicas: data_seeds must have the shape of seeds {seeds.shape}, "
            f"got {data_seeds.shape}"
        )
    return _compile_for_one_run(jax.vmap(one), seeds, data_seeds)


# An initialization runs once, so only its compile time matters. On the CPU, LLVM's
# expensive passes take much of it (every initializer is a kernel of its own):
# without them two Transformer blocks' init compiled in 1.49 s instead of 2.27 s on
# the development machine. (Lowering XLA's optimization level as well gave 0.55 s but
# changed the last bit of some initial values, so replicas would no longer equal
# separate runs.)
_FAST_CPU_COMPILE = {"xla_llvm_disable_expensive_passes": True}


def _compile_for_one_run(fn, *args):
    """``jax.jit(fn)(*args)``, compiled for compile speed on the CPU (elsewhere as usual).

    Inside another program's trace (``init_sharded``, a user's ``jax.jit``) it is
    traced as part of that program instead.
    """
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
        return fn(*args)
    lowered = jax.jit(fn).lower(*args)
    if jax.default_backend() == "cpu":
        return lowered.compile(compiler_options=_FAST_CPU_COMPILE)(*args)
    return lowered.compile()(*args)


def _cast(name: str, value: Any, dtype: Any) -> jax.Array:
    """``value`` in the hyperparameter's dtype; a value the dtype cannot hold is an
    error naming it (NumPy would warn and make it infinite)."""
    try:
        given = np.asarray(value)
    except jax.errors.TracerArrayConversionError:  # under jit: nothing to check here
        return jnp.asarray(value, dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = given.astype(dtype)
    if np.issubdtype(dtype, np.floating) and np.any(np.isfinite(given) & ~np.isfinite(cast)):
        raise ValueError(
            f"set_hyperparams: {name}={value!r} does not fit the optimizer state's "
            f"{np.dtype(dtype).name} (largest {float(np.finfo(dtype).max):.3g})"
        )
    return jnp.asarray(cast)


def set_hyperparams(state: TrainState, **values: Any) -> TrainState:
    """Sets hyperparameters held in the optimizer's state by ``optax.inject_hyperparams``.

    With ``optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)``
    the learning rate is an array in ``opt_state``, not a constant in the program,
    so replicas can differ in it and still run as one vmapped program::

      state = init_replicas(model, optimizer, x, jnp.arange(3))
      state = set_hyperparams(state, learning_rate=jnp.array([1e-3, 3e-3, 1e-2]))
      run = make_fused_steps(step, data, batch_size=100, num_steps=40, replicated=True)
      state, metrics = run(state)  # metrics["loss"]: (3, 40)

    Args:
      state: a state (or stacked replicas) whose optimizer was built with
        ``optax.inject_hyperparams``, anywhere inside a chain.
      **values: a value per name: a scalar (given to every replica) or an array
        with the replica axis, ``(replicas,)``.

    Returns:
      The state with every matching injected hyperparameter replaced.
    """
    found: set[str] = set()

    def is_injected(node):
        return isinstance(node, optax.InjectHyperparamsState | optax.InjectStatefulHyperparamsState)

    def replace(node):
        if not is_injected(node):
            return node
        hyperparams = dict(node.hyperparams)
        for name, value in values.items():
            if name in hyperparams:
                old = jnp.asarray(hyperparams[name])
                new = _cast(name, value, old.dtype)
                if new.shape not in ((), old.shape):
                    raise ValueError(
                        f"set_hyperparams: {name} has shape {old.shape} in the optimizer "
                        f"state, got a value of shape {new.shape}"
                    )
                hyperparams[name] = jnp.broadcast_to(new, old.shape)
                found.add(name)
        return node._replace(hyperparams=hyperparams)

    opt_state = jax.tree.map(replace, state.opt_state, is_leaf=is_injected)
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(
            f"set_hyperparams: no injected hyperparameter named {missing} in the optimizer "
            "state; build the optimizer with optax.inject_hyperparams(...) and pass the "
            "names it was given"
        )
    return state._replace(opt_state=opt_state)
