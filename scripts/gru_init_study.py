"""Controlled comparisons of the MNIST-1D GRU: one change at a time, same seeds.

The rows of docs/experiments.md's "The GRU on MNIST-1D" that are not suite runs.

usage: python scripts/gru_init_study.py VARIANT [STEPS] [SEEDS] [DRAW] [FIELD=VALUE ...]

VARIANT: base, registry, torch (PyTorch's init for the cells and the read-out),
torch_gru (the cells only), only_w_in, only_w_rec, only_bias; DRAW picks the
random keys of the PyTorch draw (0, 1, ...).
"""

import pathlib
import sys
import time

# Run from anywhere: the repository root holds experiments/, which is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

import fnnet
from experiments._config import TrainConfig
from experiments._tasks import mnist1d
from experiments._train import optimizer_for
from fnnet import models, train

H = 6


def uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def torch_cell(key, cell, which):
    """PyTorch's GRU init: U(-1/sqrt(h), 1/sqrt(h)) for W_ih, W_hh, b_ih, b_hh."""
    k = 1.0 / np.sqrt(H)
    ks = jax.random.split(key, 5)
    cell = dict(cell)
    inp = dict(cell["input"])
    rec = dict(cell["recurrent"])
    if "w_in" in which:
        inp["w"] = uniform(ks[0], inp["w"].shape, k)
    if "w_rec" in which:
        rec["w"] = uniform(ks[1], rec["w"].shape, k)
    if "bias" in which:
        # b_ih + b_hh for r and z fold into input.b; n keeps b_in there and b_hn apart.
        b_ih = uniform(ks[2], (3 * H,), k)
        b_hh = uniform(ks[3], (3 * H,), k)
        inp["b"] = b_ih + jnp.concatenate([b_hh[: 2 * H], jnp.zeros(H)])
        rec["b"] = b_hh[2 * H :]
    cell["input"], cell["recurrent"] = inp, rec
    return cell


def variant(name, draw=0):
    base = models.rnn(10, H, cell="gru", bidirectional=True, output="flatten")
    which = set()
    readout = False
    if name == "base":
        return base
    if name == "registry":  # what the architectures experiment builds
        from experiments._models import get

        return get("gru").build(mnist1d())
    if name in ("torch", "torch_gru"):
        which = {"w_in", "w_rec", "bias"}
    readout = name in ("torch", "torch_readout")
    for part in ("w_in", "w_rec", "bias"):
        if name == f"only_{part}":
            which = {part}
    if name == "torch_but_readout_rec":
        which = {"w_in", "bias"}

    def init(key, x):
        params = base.init(key, x)
        k_cell, k_out = jax.random.split(jax.random.fold_in(key, 7 + draw))
        rnn = dict(params["rnn_0"])
        for k, d in zip(jax.random.split(k_cell), ("forward", "backward")):
            rnn[d] = {"cell": torch_cell(k, rnn[d]["cell"], which)}
        params = {**params, "rnn_0": rnn}
        if readout:
            w = params["out"]["w"]
            bound = 1.0 / np.sqrt(w.shape[0])
            ka, kb = jax.random.split(k_out)
            params["out"] = {"w": uniform(ka, w.shape, bound), "b": uniform(kb, (10,), bound)}
        return params

    return fnnet.Layer(init, base.apply, base.kind)


def main():
    name = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
    seeds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    draw = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    over = dict(a.split("=") for a in sys.argv[5:])
    types = {k: type(getattr(TrainConfig(), k)) for k in over}
    fields = {"models": ("gru",), "seeds": seeds, "steps": steps, "shuffle": False}
    fields.update({k: types[k](v) for k, v in over.items()})
    s = TrainConfig(**fields)
    task = mnist1d()
    start = time.perf_counter()
    result = train.fit(
        variant(name, draw),
        optimizer_for(s),
        train.softmax_cross_entropy,
        task.train,
        steps=s.steps,
        batch_size=s.batch_size,
        seed=list(range(seeds)),
        shuffle=s.shuffle,
        metric_fns={"accuracy": train.accuracy},
        eval_data=dict(task.tests),
        eval_every=250,
        eval_batch_size=250,
        progress=False,
    )
    final, best = {}, {}
    for row in result.history:
        if "test_accuracy" in row:
            r = row["replica"]
            final[r] = row["test_accuracy"]
            best[r] = max(best.get(r, 0), row["test_accuracy"])
    acc = [final[r] for r in range(seeds)]
    print(
        f"RESULT {name} draw={draw} steps={steps} {over} seeds={seeds} "
        f"final={[round(100 * a, 1) for a in acc]} mean={100 * np.mean(acc):.2f} "
        f"best={[round(100 * best[r], 1) for r in range(seeds)]} "
        f"wall={time.perf_counter() - start:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
