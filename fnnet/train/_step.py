"""One training step as a pure function, and many steps fused into one program.

``make_train_step`` builds ``step(state, batch) -> (state, metrics)``: the model
runs on the batch with ``jax.vmap`` (axis name ``"batch"``, so BatchNorm works),
the per-example loss is averaged, gradients come from ``jax.value_and_grad`` and
the optax update is applied, unless the loss or a gradient is not finite, in
which case the step is skipped and recorded in the state (no host sync).

``make_fused_steps`` runs ``num_steps`` of those in one compiled program with
``jax.lax.scan``, drawing each batch on the device; ``run_steps_python`` is the
same computation one jitted step at a time, for debugging, and gives bitwise the
same state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnnet._src.cpu_layout import rows_first_dots
from fnnet._src.layer import Layer
from fnnet.train import _stream
from fnnet.train._data import (
    batch_indices,
    epoch_orders,
    indices_from_orders,
    num_examples_of,
    slice_batch,
    steps_per_epoch,
    take_batch,
)
from fnnet.train._inputs import split_inputs
from fnnet.train._state import TrainState

# Per-example functions: (one example's model output, its label) -> scalar.
ExampleFn = Callable[[Any, Any], jax.Array]
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]

# Codes stored in TrainState.nonfinite_what.
FINITE = 0
NONFINITE_LOSS = 1
NONFINITE_GRADS = 2
NONFINITE_UPDATE = 3
_WHAT = {NONFINITE_LOSS: "loss", NONFINITE_GRADS: "gradient", NONFINITE_UPDATE: "update"}

# Parameter names that weight decay always / never shrinks (see decay_mask).
_DECAY_NAMES = frozenset({"w", "table", "kernel"})
_NO_DECAY_NAMES = frozenset({"b", "bias", "scale"})


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss, gradient or updated value.

    Attributes:
      step: the first step whose loss, gradients or update were not finite.
      what: ``"loss"``, ``"gradient"`` or ``"update"`` (finite loss and
        gradients, but the new params, optimizer or model state were not).
      replica: the first replica that failed, or None for an unreplicated state.
      last_finite_state: set by ``fit``: the last training state it checked and
        found finite (the start of the chunk of steps that failed), else None.
    """

    def __init__(self, step: int, what: str, replica: int | None = None):
        self.step = step
        self.what = what
        self.replica = replica
        self.last_finite_state = None
        where = "" if replica is None else f" in replica {replica}"
        super().__init__(
            f"training stopped: the {what} was not finite at step {step}{where}; try a "
            "lower learning rate, gradient clipping, or float32."
        )

    def __reduce__(self):
        return (type(self), (self.step, self.what, self.replica))


def check_finite(state: TrainState) -> None:
    """Raises :class:`NonFiniteError` if any step so far had a non-finite loss, gradient or update.

    A host function: it reads two int32 scalars (or ``(replicas,)`` vectors) from
    the device, so the training loop calls it every few steps or once per fused
    run, never inside a step.
    """
    steps = np.asarray(state.nonfinite_step)
    if not np.any(steps >= 0):
        return
    whats = np.asarray(state.nonfinite_what)
    if steps.ndim == 0:
        raise NonFiniteError(int(steps), _WHAT[int(whats)])
    replica = int(np.flatnonzero(steps.reshape(-1) >= 0)[0])
    raise NonFiniteError(
        int(steps.reshape(-1)[replica]), _WHAT[int(whats.reshape(-1)[replica])], replica
    )


def decay_mask(params: Any) -> Any:
    """Which parameters weight decay should shrink: weights yes, biases and norm scales no.

    For ``optax.adamw(..., mask=decay_mask)`` (or ``optax.add_decayed_weights``).
    A leaf named ``"w"``, ``"table"`` or ``"kernel"`` is decayed; ``"b"``, ``"bias"``
    and ``"scale"`` are not, whatever their rank (a ``repeat`` stack gives biases a
    leading layer axis); any other name is decayed when it has two or more axes.

    Args:
      params: a parameter tree (nested dicts of arrays).

    Returns:
      A tree of the same structure with a bool per leaf.
    """

    def rule(path, leaf):
        last = path[-1] if path else None
        name = str(getattr(last, "key", getattr(last, "name", "")))
        if name in _NO_DECAY_NAMES:
            return False
        if name in _DECAY_NAMES:
            return True
        return jnp.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(rule, params)


_FINITE_CHECKS = ("auto", "concat", "per_leaf")


def _finite_check(finite_check: str) -> str:
    """``finite_check`` resolved: ``"auto"`` is ``"concat"`` on the CPU, else ``"per_leaf"``."""
    if finite_check not in _FINITE_CHECKS:
        raise ValueError(
            f"make_train_step: finite_check must be one of {list(_FINITE_CHECKS)}, "
            f"got {finite_check!r}"
        )
    if finite_check == "auto":
        return "concat" if jax.default_backend() == "cpu" else "per_leaf"
    return finite_check


def _all_finite(tree: Any, how: str = "concat") -> jax.Array:
    """A bool scalar: every element of every floating leaf of ``tree`` is finite.

    ``how="concat"``: one reduction per dtype over the concatenated leaves, the
    CPU's fast path (each reduction is a separate kernel launch there, and a
    small model's step has only tens of them in all). ``"per_leaf"``: one
    reduction per leaf, combined: no copy of the whole tree, and a leaf split
    over devices (FSDP) is reduced where it lies instead of being gathered for
    the concatenation; the choice on accelerators.
    """
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    ok = jnp.array(True)
    if how == "per_leaf":
        for leaf in leaves:
            ok = ok & jnp.all(jnp.isfinite(leaf))
        return ok
    groups: dict[Any, list[jax.Array]] = {}
    for leaf in leaves:
        groups.setdefault(leaf.dtype, []).append(jnp.ravel(leaf))
    for flat in groups.values():
        ok = ok & jnp.all(jnp.isfinite(jnp.concatenate(flat)))
    return ok


def _keep_dtypes(new: Any, old: Any) -> Any:
    """``new`` cast leaf by leaf to ``old``'s dtypes, so a scan carry keeps its type
    (a low-precision policy could otherwise turn BatchNorm statistics to bfloat16)."""
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def _optax_promotion():
    """NumPy's promotion rules for the optimizer's own arithmetic.

    optax mixes dtypes freely (``decay ** count`` with an int32 count in Adam's
    bias correction), which fails under ``jax_numpy_dtype_promotion="strict"``.
    A user (or a test suite) who turns strict promotion on for their model should
    still be able to use Adam, so the optimizer runs under the standard rules;
    the model and the loss keep whatever rules are set.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    stack.enter_context(jax.numpy_rank_promotion("allow"))
    return stack


def make_train_step(
    model: Layer,
    optimizer: optax.GradientTransformation,
    loss_fn: ExampleFn,
    *,
    policy: Any = None,
    metric_fns: Mapping[str, ExampleFn] | None = None,
    batch_axis: str = "batch",
    skip_nonfinite: bool = False,
    finite_check: str = "auto",
    spmd_axis_name: Any = None,
    rows_first: bool | None = None,
) -> StepFn:
    """Builds the pure function ``step(state, batch) -> (state, metrics)``.

    Args:
      model: the model (stateful or not); it sees one example and is batched here
        with ``jax.vmap(..., axis_name=batch_axis)``, in training mode.
      optimizer: any optax gradient transformation (schedules, chains, masks,
        ``optax.MultiSteps``); its ``update`` receives the params, so weight-decay
        masks work.
      loss_fn: ``loss_fn(output, label) -> scalar`` for ONE example; the step's
        loss is its mean over the batch.
      policy: None, or a mixed-precision policy with ``cast_params``,
        ``cast_input`` and ``cast_output``. The casts happen inside the
        differentiated function, so gradients (and the optimizer) stay in the
        params' own dtype (float32).
      metric_fns: ``{name: fn(output, label) -> scalar}``, each averaged over the
        batch and reported next to ``"loss"``; computed from the same forward pass.
      batch_axis: the name of the vmapped batch axis (BatchNorm's ``axis_name``).
      skip_nonfinite: also skip the update of a step whose loss, gradient or
        updated state is not finite, so the state keeps the last finite parameters. Off by
        default because it is not free: the skip must wait for the whole
        backward pass and a reduction over every gradient before the first
        parameter may change, so the optimizer can no longer update one layer
        while the backward pass works on the next. On the CPU that costs a
        small model's step 20 to 40% of its time (``python -m
        bench.step_overhead``). Detection is the same either way.
      finite_check: how the gradients and the update are checked for
        non-finite values: ``"concat"`` (one reduction over the concatenated
        leaves per dtype; fastest on the CPU, where a small model's step pays
        per kernel launch), ``"per_leaf"`` (a reduction per leaf: no copy of
        the tree, and a leaf split over devices is not gathered, so use it
        under FSDP), or ``"auto"``: concat on the CPU, per leaf elsewhere. The
        verdict is the same either way.
      spmd_axis_name: the mesh axis (or axes) the batch is split over, given to
        the batch ``jax.vmap``: a sharding constraint inside the model, written
        for one example, then keeps the batch dimension split over that axis
        instead of gathering it (``fit`` passes its mesh's batch axis). None: no
        mesh, or the batch is not split.
      rows_first: take every product over a batch of sequences, ``(batch, seq,
        features) @ w``, as one over ``batch * seq`` rows before differentiating,
        so that its weight gradient contracts over one axis, which XLA:CPU runs
        several times faster than the same gradient over two
        (``fnnet._src.cpu_layout``; the Transformer's step 1.05 to 1.19x faster).
        The same products, the sums perhaps in another order. None: only when
        JAX's default backend is the CPU.

    Returns:
      ``step(state, batch)``, where ``batch = (x, y)`` has a leading batch axis on
      every leaf. It returns the new :class:`TrainState` and
      ``{"loss": scalar, **{name: scalar}}``. The step counter always advances.
      The first step whose loss, any gradient or any value the update produced
      (params, optimizer state, model state) is not finite is recorded in
      ``nonfinite_step`` / ``nonfinite_what``, inside the program, with no host
      sync; ``check_finite`` (which ``fit`` calls after every chunk of steps)
      turns that record into a :class:`NonFiniteError`, and checkpoints refuse
      non-finite values. With ``skip_nonfinite`` the params, optimizer state and
      model state of such a step are kept as they were.

    To run it one step per call, jit it with the state donated,
    ``jax.jit(step, donate_argnums=0)``, and thread the returned state: the new
    state then reuses the old one's buffers instead of allocating new ones (the
    hand-written MLP step of docs/benchmarks.md runs 7% faster donated on the
    CPU).
    Inside ``make_fused_steps`` the state is a loop carry and reuses its buffers
    from step to step; its ``donate=True`` lets the first step reuse the caller's.
    """
    metric_fns = dict(metric_fns or {})
    check = _finite_check(finite_check)
    if rows_first is not None and not isinstance(rows_first, bool):
        raise TypeError(
            f"make_train_step: rows_first must be True, False or None, got {rows_first!r}"
        )
    if rows_first is None:
        rows_first = jax.default_backend() == "cpu"
    if "loss" in metric_fns:
        raise ValueError('metric_fns must not use the name "loss"; the step reports it itself')

    def loss_and_output(params, model_state, x, y, keys):
        if policy is not None:
            params = policy.cast_params(params)
            x = policy.cast_input(x)

        def forward(x, key):
            positional, inputs = split_inputs(model, x)
            return model.apply_with_state(
                params, model_state, positional, key=key, train=True, **inputs
            )

        # The model's new state (BatchNorm statistics, reached by pmean over the
        # batch axis) is the same for every example: out_axes None says so.
        output, new_model_state = jax.vmap(
            forward, axis_name=batch_axis, out_axes=(0, None), spmd_axis_name=spmd_axis_name
        )(x, keys)
        if policy is not None:
            output = policy.cast_output(output)
        loss = jnp.mean(jax.vmap(loss_fn)(output, y))
        return loss, (output, new_model_state)

    differentiated = rows_first_dots(loss_and_output) if rows_first else loss_and_output

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        x, y = batch
        batch_size = jax.tree.leaves(x)[0].shape[0]
        keys = jax.random.split(jax.random.fold_in(state.key, state.step), batch_size)
        (loss, (output, new_model_state)), grads = jax.value_and_grad(differentiated, has_aux=True)(
            state.params, state.model_state, x, y, keys
        )

        # Detection costs next to nothing: the reduction runs alongside the
        # optimizer's update. Skipping is what costs (see skip_nonfinite): a
        # cond, so the update is computed only when it is kept, rather than a
        # select on every leaf, which on the CPU is slower still. Under vmap
        # (replicas split over devices) the cond becomes that select, with the
        # same result.
        finite_loss = jnp.isfinite(loss)
        finite_grads = _all_finite(grads, check)

        def apply_update():
            with _optax_promotion():
                updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
                params = optax.apply_updates(state.params, updates)
            # Each branch must give the types the state had (a low-precision
            # policy could otherwise turn BatchNorm statistics to bfloat16).
            return _keep_dtypes(
                (params, opt_state, new_model_state),
                (state.params, state.opt_state, state.model_state),
            )

        def keep():
            return state.params, state.opt_state, state.model_state

        if skip_nonfinite:
            updated = jax.lax.cond(finite_loss & finite_grads, apply_update, keep)
        else:
            updated = apply_update()
        # Finite loss and gradients can still give an update that overflows (a
        # huge learning rate at one step): what the update produced is checked
        # too, so a state reported finite is finite in every value.
        finite_update = _all_finite(updated, check)
        finite = finite_loss & finite_grads & finite_update
        if skip_nonfinite:
            updated = jax.lax.cond(finite_update, lambda: updated, keep)
        params, opt_state, model_state = updated

        first_bad = (state.nonfinite_step < 0) & ~finite
        what = jnp.where(
            ~finite_loss,
            jnp.int32(NONFINITE_LOSS),
            jnp.where(~finite_grads, jnp.int32(NONFINITE_GRADS), jnp.int32(NONFINITE_UPDATE)),
        )
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            model_state=model_state,
            step=state.step + 1,
            key=state.key,
            data_key=state.data_key,
            nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
            nonfinite_what=jnp.where(first_bad, what, state.nonfinite_what),
        )
        metrics = {"loss": loss}
        for name, fn in metric_fns.items():
            metrics[name] = jnp.mean(jax.vmap(fn)(output, y))
        return new_state, metrics

    return step


# --- Many steps in one program ---------------------------------------------------


def make_fused_steps(
    step_fn: StepFn,
    dataset: Any,
    *,
    batch_size: int,
    num_steps: int,
    shuffle: bool = True,
    replicated: bool = False,
    vectorize_replicas: bool = False,
    canonical_convs: bool | None = None,
    donate: bool = False,
) -> Callable[[TrainState], tuple[TrainState, dict[str, jax.Array]]]:
    """``num_steps`` training steps compiled as one program (a ``jax.lax.scan``).

    Each step draws its batch inside the program from the device-resident
    ``dataset`` with ``batch_indices(state.data_key, state.step, ...)``, so the
    host is not involved between steps. The dataset is moved to the device once,
    here, and passed to the compiled program as an argument. Each epoch's
    shuffled order is computed once per run, not once per step (see
    ``fnnet.train._data``).

    ``run`` is compiled already; do not wrap it in ``jax.jit``: the outer jit
    would bake the dataset into the program as a constant. To train replicas
    (seeds from ``init_replicas``, learning rates from ``set_hyperparams``) as
    one program, pass ``replicated=True`` and give ``run`` the stacked states;
    ``jax.vmap(run)`` computes the same but re-traces on every call.

    Args:
      step_fn: ``step(state, batch)`` from :func:`make_train_step` (or any function
        of that signature).
      dataset: ``(x, y)`` pytree of arrays ``(num_examples, ...)``; or a source
        of host batches (an iterator of ``(x, y)`` NumPy batches, such as
        :class:`NpyBatches`; see ``fnnet.train._stream``): each call then
        stacks its next ``num_steps`` batches, moves them to the device at
        once and scans over them, and reads the following ``num_steps`` while
        the device computes (``run.feed.consumed_state`` is the source's state
        after the batches trained on); ``shuffle`` is then the source's affair,
        and every replica trains on the same batches.
      batch_size: examples per step; the ragged end of each epoch is dropped.
      num_steps: steps per call of ``run`` (static: one program per length).
      shuffle: reshuffle every epoch (False: stored order, as in the MNIST-1D paper).
      replicated: ``run`` takes states with a leading replica axis and trains
        every replica on the shared dataset, one after another inside the
        program (``jax.lax.map``), so replica ``r`` is bit for bit the run of
        its seed alone (on the CPU, vmapped matmuls round differently in the
        last bit, and vmapped convolutions are slower).
      vectorize_replicas: train the replicas side by side with ``jax.vmap``
        instead: needed when the replica axis is split over devices
        (``make_sharded_steps(..., replica_axis=...)`` sets it), equal to the
        separate runs only to float tolerance.
      canonical_convs: rewrite convolutions into the layout XLA:CPU runs fast
        (None: only when the default backend is the CPU). Without it, the
        gradient convolutions inside the scan's loop run as naive loop nests,
        several times slower than the same step jitted alone (``fnnet._src.cpu_layout``).
      donate: give the state's buffers to the program (``donate_argnums``), so
        the new state is written where the old one was instead of beside it:
        the state then takes its memory once, not twice. ``run(state)`` deletes
        ``state`` (reading it afterwards is an error): keep only what it
        returns. The results are bitwise those without donation.

    Returns:
      ``run(state) -> (state, metrics)``, metrics stacked ``{name: (num_steps,)}``
      (``{name: (replicas, num_steps)}`` when replicated). ``run.lower(state)`` is
      the program lowered for ``state`` (``jax.stages.Lowered``: its
      ``cost_analysis()``, or ``.compile()`` and that one's ``memory_analysis()``
      and ``as_text()``), without running it.
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if _stream.is_source(dataset):
        return _stream.streamed_steps(
            step_fn, dataset, batch_size=batch_size, num_steps=num_steps, replicated=replicated,
            vectorize_replicas=vectorize_replicas, canonical_convs=canonical_convs, donate=donate,
        )  # fmt: skip
    num_examples = num_examples_of(dataset)
    steps_per_epoch(num_examples, batch_size)  # validates batch_size early
    # Once, so no call copies it from the host. Arrays already placed stay as they
    # are: device_put refuses one split over several processes (shard_data's).
    dataset = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jax.device_put(a), dataset)
    step = _stream.for_loops(step_fn, canonical_convs)
    sizes = {"num_examples": num_examples, "batch_size": batch_size}

    def fused(state, dataset):
        if shuffle:
            # Each epoch's permutation (a sort) once per run, not once per step:
            # for MNIST-1D it costs more than the CNN's whole step.
            first = state.step
            orders = epoch_orders(state.data_key, first, num_steps=num_steps, **sizes)

            def batch(s):
                return take_batch(dataset, indices_from_orders(orders, first, s.step, **sizes))
        else:

            def batch(s):
                return slice_batch(dataset, s.step, **sizes)

        def body(s, _):
            return step(s, batch(s))

        return jax.lax.scan(body, state, length=num_steps)

    # The dataset is shared by every replica: mapped over the state alone.
    compiled = _stream.compile_fused(
        fused, replicated=replicated, vectorize_replicas=vectorize_replicas, donate=donate
    )

    def run(state: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
        return compiled(state, dataset)

    # The program itself, for what XLA says of it (cost_analysis, memory_analysis,
    # the compiled HLO): run.lower(state).compile().
    run.lower = lambda state: compiled.lower(state, dataset)
    return run


@functools.lru_cache(maxsize=64)
def _jitted_data_step(
    step_fn: StepFn, num_examples: int, batch_size: int, shuffle: bool, canonical_convs: bool | None
):
    # Cached so repeated debug runs of the same step reuse one compiled program.
    step = _stream.for_loops(step_fn, canonical_convs)

    sizes = {"num_examples": num_examples, "batch_size": batch_size}

    @jax.jit
    def one(state, dataset):
        if shuffle:
            batch = take_batch(dataset, batch_indices(state.data_key, state.step, **sizes))
        else:
            batch = slice_batch(dataset, state.step, **sizes)
        return step(state, batch)

    return one


def run_steps_python(
    step_fn: StepFn,
    dataset: Any,
    state: TrainState,
    *,
    batch_size: int,
    num_steps: int,
    shuffle: bool = True,
    canonical_convs: bool | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The debugging twin of :func:`make_fused_steps`: a Python loop of jitted steps.

    Same batches, same arithmetic, bitwise the same final state on the CPU, but
    the host regains control after every step (print, breakpoint, inspect).

    Returns:
      ``(state, metrics)`` with metrics stacked ``{name: (num_steps,)}``.
    """
    num_examples = num_examples_of(dataset)
    steps_per_epoch(num_examples, batch_size)
    one = _jitted_data_step(step_fn, num_examples, batch_size, shuffle, canonical_convs)
    history = []
    for _ in range(num_steps):
        state, metrics = one(state, dataset)
        history.append(metrics)
    return state, jax.tree.map(lambda *ms: jnp.stack(ms), *history)
