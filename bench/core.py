"""No abstraction tax: fnnet models against the same math written by hand in jax.numpy.

For each model, both contenders compute the jitted forward+backward pass
(``jax.value_and_grad`` of the mean cross-entropy) on the same parameters and
the same batch; the hand-written version indexes the fnnet parameter tree
directly, so the two do exactly the same arithmetic. Rounds alternate between
the contenders and the figure is the median over rounds, because this machine
is shared and noisy.

Where a model's hand-written version differs from fnnet's in one deliberate
design choice, a third contender (``handwritten.VARIANTS``) writes that choice
by hand: the GRU for one example batched with ``jax.vmap`` (fnnet's way); the
transformer with its blocks in a ``lax.scan`` loop (how ``fnnet.repeat`` runs
stacks of more than 4 blocks; it unrolls this one's 2). That separates the cost
of fnnet's abstractions from the cost of the choice.

Run: ``make bench`` (or ``python -m bench.core --rounds 15``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tests import handwritten

BATCH = 128


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def _fnnet_loss(model):
    def loss(params, x, y):
        return _cross_entropy(jax.vmap(lambda x: model.apply(params, x))(x), y)

    return loss


def _hand_loss(forward):
    def loss(params, x, y):
        return _cross_entropy(forward(params, x), y)

    return loss


def _time(step, params, x, y, calls: int) -> float:
    jax.block_until_ready(step(params, x, y))
    start = time.perf_counter()
    for _ in range(calls):
        out = step(params, x, y)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def run(rounds: int, calls: int) -> list[dict]:
    rng = np.random.default_rng(0)
    results = []
    for name, (model, forward, example) in handwritten.CASES.items():
        x = jnp.asarray(example(rng, BATCH))
        y = jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)
        params = model.init(jax.random.key(0), x[0])
        # Same numbers from both: a wrong hand-written twin would void the comparison.
        a = jax.jit(_fnnet_loss(model))(params, x, y)
        b = jax.jit(_hand_loss(forward))(params, x, y)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        steps = {
            "fnnet": jax.jit(jax.value_and_grad(_fnnet_loss(model))),
            "jax.numpy": jax.jit(jax.value_and_grad(_hand_loss(forward))),
        }
        variant = handwritten.VARIANTS.get(name)
        if variant is not None:
            label, other = variant
            np.testing.assert_allclose(
                a, jax.jit(_hand_loss(other))(params, x, y), rtol=1e-4, atol=1e-5
            )
            steps["variant"] = jax.jit(jax.value_and_grad(_hand_loss(other)))
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(rounds):
            for contender, step in steps.items():
                times[contender].append(_time(step, params, x, y, calls))
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {
            "model": name,
            "batch": BATCH,
            "fnnet_ms": 1e3 * med["fnnet"],
            "jnp_ms": 1e3 * med["jax.numpy"],
            "ratio": med["jax.numpy"] / med["fnnet"],
        }
        if variant is not None:
            result["variant"] = variant[0]
            result["variant_ms"] = 1e3 * med["variant"]
            result["variant_ratio"] = med["variant"] / med["fnnet"]
        results.append(result)
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"# jax {jax.__version__}, {jax.devices()[0].platform}, {cpu}")
    results = run(args.rounds, args.calls)
    print()
    print(
        "| model | fnnet ms/step | jax.numpy ms/step | ratio (jnp / fnnet) "
        "| jax.numpy variant | variant ms/step | ratio (variant / fnnet) |"
    )
    print("|---|---:|---:|---:|---|---:|---:|")
    for r in results:
        extra = "| - | - | - |"
        if "variant" in r:
            extra = f"| {r['variant']} | {r['variant_ms']:.3f} | {r['variant_ratio']:.2f} |"
        print(
            f"| {r['model']} | {r['fnnet_ms']:.3f} | {r['jnp_ms']:.3f} | {r['ratio']:.2f} {extra}"
        )


if __name__ == "__main__":
    main()
