"""What detecting and skipping non-finite steps costs: the MLP's step at batch 100.

``python -m bench.step_overhead`` prints the median microseconds per donated call
(5 interleaved rounds of 1000 calls, one process) of:

- ``make_train_step``: the engine's step as it ships: it records the first
  non-finite step inside the program and applies every update;
- ``skip_nonfinite=True``: the same step skipping a non-finite update with one
  ``lax.cond``;
- ``select per leaf``: the skip written as a ``jnp.where`` on every parameter and
  optimizer leaf instead of the cond;
- ``no check``: the step with no finiteness check at all;
- ``hand-written``: the same arithmetic written batch-major in jax.numpy.

The gap between the first two is why skipping is opt-in: the skip must wait for
every gradient and a reduction over all of them before the first parameter may
change, so the optimizer can no longer update one layer while the backward pass
still works on the next. Detection alone runs beside the update and costs
next to nothing.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench._train_baselines import handwritten_step
from fnnet.train import init_state, make_train_step, softmax_cross_entropy
from fnnet.train._step import _all_finite
from tests import handwritten


def _variant(model, tx, check: str):
    """A plain step (no engine bookkeeping) with the check written one way."""

    def loss_fn(params, x, y):
        out = jax.vmap(lambda x: model.apply(params, x, train=True), axis_name="batch")(x)
        return jnp.mean(jax.vmap(softmax_cross_entropy)(out, y))

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, *batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = (optax.apply_updates(state.params, updates), opt_state)
        if check == "select":
            finite = jnp.isfinite(loss) & _all_finite(grads)
            old = (state.params, state.opt_state)
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = new
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    return step


def main(rounds: int = 5, calls: int = 1000) -> dict[str, float]:
    model = handwritten.CASES[next(k for k in handwritten.CASES if k.startswith("mlp"))][0]
    tx = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((100, 40)), jnp.float32)
    y = jnp.asarray(np.arange(100) % 10, jnp.int32)
    state = init_state(model, tx, x[0], seed=0)
    steps = {
        "make_train_step": make_train_step(model, tx, softmax_cross_entropy),
        "skip_nonfinite=True": make_train_step(
            model, tx, softmax_cross_entropy, skip_nonfinite=True
        ),
        "select per leaf": _variant(model, tx, "select"),
        "no check": _variant(model, tx, "none"),
        "hand-written": handwritten_step("mlp", tx),  # its state: (params, opt_state)
    }
    steps = {name: jax.jit(step, donate_argnums=0) for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start_state = (state.params, state.opt_state) if name == "hand-written" else state
            s = jax.tree.map(jnp.copy, start_state)
            for _ in range(50):  # compile and warm up
                s, _metrics = step(s, (x, y))
            jax.block_until_ready(s)
            start = time.perf_counter()
            for _ in range(calls):
                s, _metrics = step(s, (x, y))
            jax.block_until_ready(s)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    print(f"MNIST-1D MLP step, batch 100, Adam; median of {rounds} rounds of {calls} calls")
    print()
    print("| step | us per call |")
    print("|---|---:|")
    for name, us in medians.items():
        print(f"| {name} | {us:.0f} |")
    return medians


if __name__ == "__main__":
    main()
