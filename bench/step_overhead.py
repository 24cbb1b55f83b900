"""Where fnnet's per-step overhead goes: the MLP's step at batch 100, rebuilt piece by piece.

``python -m bench.step_overhead`` prints the median microseconds per donated call
(5 interleaved rounds of 1000 calls, one process) of a copy of
``make_train_step``'s step and of variants: without the per-example dropout keys,
without the non-finite check and its ``lax.cond``, with a select on every leaf
instead of the cond, and without keys and check. It is a lead for the training
issue's per-step target, not a figure in docs/benchmarks.md.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fnnet
from fnnet.train import init_state, softmax_cross_entropy
from fnnet.train._step import _all_finite

VARIANTS = {
    "as make_train_step": {"keys": True, "check": "cond"},
    "no keys": {"keys": False, "check": "cond"},
    "no check": {"keys": True, "check": "none"},
    "select, not cond": {"keys": True, "check": "select"},
    "no keys, no check": {"keys": False, "check": "none"},
}


def make_step(model, tx, *, keys: bool, check: str):
    """A train step like ``make_train_step``'s, with its parts switched on or off."""

    def loss_fn(params, x, y, step_keys):
        def forward(x, key):
            return model.apply(params, x, key=key, train=True)

        if keys:
            out = jax.vmap(forward, axis_name="batch")(x, step_keys)
        else:
            out = jax.vmap(lambda x: forward(x, None), axis_name="batch")(x)
        return jnp.mean(jax.vmap(softmax_cross_entropy)(out, y))

    def step(state, batch):
        x, y = batch
        step_keys = None
        if keys:
            step_keys = jax.random.split(jax.random.fold_in(state.key, state.step), x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y, step_keys)

        def update():
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        finite = jnp.isfinite(loss) & _all_finite(grads)
        if check == "cond":
            params, opt_state = jax.lax.cond(
                finite, update, lambda: (state.params, state.opt_state)
            )
        elif check == "select":
            new = update()
            params, opt_state = jax.tree.map(
                lambda n, o: jnp.where(finite, n, o), new, (state.params, state.opt_state)
            )
        else:
            params, opt_state = update()
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), loss

    return step


def main(rounds: int = 5, calls: int = 1000) -> dict[str, float]:
    model = fnnet.models.mlp(10, (100, 100), residual=True)
    tx = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((100, 40)), jnp.float32)
    y = jnp.asarray(np.arange(100) % 10, jnp.int32)
    state = init_state(model, tx, x[0], seed=0)
    steps = {
        name: jax.jit(make_step(model, tx, **kw), donate_argnums=0) for name, kw in VARIANTS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            s = jax.tree.map(jnp.copy, state)
            for _ in range(50):  # compile and warm up
                s, _loss = step(s, (x, y))
            jax.block_until_ready(s)
            start = time.perf_counter()
            for _ in range(calls):
                s, _loss = step(s, (x, y))
            jax.block_until_ready(s)
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    for name, us in medians.items():
        print(f"{name:20s} {us:6.0f} us/step")
    return medians


if __name__ == "__main__":
    main()
