"""A Transformer LM's training step on this machine: fnnet against the same model by hand.

``python -m bench.accelerator [--size tiny|gpt2-small] [--steps N] [--attention xla,cudnn]
[--dtype float32,bfloat16] [--peak-flops F]`` builds a decoder-only LM with
``fnnet.models.transformer_lm`` (learned positions, tied embeddings, GELU MLP of
width 4d, pre-norm blocks: GPT-2's recipe) and the same model written here in plain
JAX, batch-major, reading fnnet's parameter tree, so both train the same parameters.
It checks that their first-step losses agree, then times each combination of
attention kernel and compute dtype requested:

- one training step: mean next-token cross-entropy, ``jax.value_and_grad``, Adam
  (``optax.adam(3e-4)``), jitted with the state donated; fnnet's is
  ``make_train_step`` as it ships (it also records non-finite steps);
- bfloat16 is ``fnnet.train.Policy.bfloat16()`` for fnnet (float32 master params,
  bfloat16 compute, float32 logits for the loss) and the same casts by hand;
- the first call (compile) and ``--warmup`` steps are not timed; ``--repeats``
  rounds of ``--steps`` steps each, fnnet and the hand-written step interleaved,
  the order alternating round by round; the table reports the median round.

Columns: ms per step; tokens per second (batch * seq / step time); MFU, the model's
FLOPs (``fnnet.train.transformer_lm_flops``: 6N + 12 * layers * seq * width per
token) over the device's dense bfloat16 peak (``fnnet.train.peak_flops``, or
``--peak-flops``), for float32 rows too; memory, XLA's compiled size of the step
(arguments + outputs + temporaries - donated buffers), per program; and fnnet's
step time over the hand-written one (above 1: fnnet is slower). Where the device
reports ``memory_stats()``, the process's ``peak_bytes_in_use`` over the whole run
follows the table (it never resets, so it cannot be given per row).

Sizes: ``gpt2-small`` (12 layers, width 768, 12 heads, seq 1024, vocab 50304: GPT-2's
50257 padded to a multiple of 64 as nanoGPT does, batch 8) is the default on a GPU or
TPU; ``tiny`` (2 layers, width 64, 4 heads, seq 64, vocab 256, batch 8) on the CPU.
cuDNN attention needs an NVIDIA GPU; bfloat16 runs on the CPU but emulated, slowly.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fnnet import train
from fnnet.models import transformer_lm

SIZES = {
    "tiny": dict(vocab=256, features=64, depth=2, num_heads=4, seq=64, batch=8),
    "gpt2-small": dict(vocab=50304, features=768, depth=12, num_heads=12, seq=1024, batch=8),
}
ATTENTIONS = ("xla", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LEARNING_RATE = 3e-4
# The first-step losses of the two models, which compute the same function in another
# order (batched here, one example at a time under vmap in fnnet).
LOSS_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}


# The model by hand, batch-major: x is (batch, seq, features) throughout.


def _layer_norm(x, p, eps=1e-6):
    """In float32 whatever x's dtype, returned in x's dtype (as fnnet's layer_norm)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _block(x, p, implementation):
    a = p["attn"]
    h = _layer_norm(x, p["ln1"])
    q = jnp.einsum("btc,chd->bthd", h, a["q"]["w"]) + a["q"]["b"]  # (batch, seq, heads, head_dim)
    k = jnp.einsum("btc,chd->bthd", h, a["k"]["w"]) + a["k"]["b"]
    v = jnp.einsum("btc,chd->bthd", h, a["v"]["w"]) + a["v"]["b"]
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    x = x + jnp.einsum("bthd,hdc->btc", o, a["out"]["w"]) + a["out"]["b"]
    m = p["mlp"]
    h = jax.nn.gelu(_layer_norm(x, p["ln2"]) @ m["up"]["w"] + m["up"]["b"])  # (batch, seq, 4C)
    return x + h @ m["down"]["w"] + m["down"]["b"]


def _hand_loss(params, tokens, targets, *, dtype, implementation):
    p = jax.tree.map(lambda a: a.astype(dtype), params)  # the policy's cast_params
    seq = tokens.shape[1]
    x = p["embed"]["table"][tokens] + p["position"]["table"][:seq]  # (batch, seq, C)
    depth = jax.tree.leaves(p["blocks"])[0].shape[0]

    def body(x, block):
        return _block(x, block, implementation), None

    # As fnnet.repeat: a loop over the stacked blocks, unrolled for up to 4 of them.
    x, _ = jax.lax.scan(body, x, p["blocks"], unroll=depth <= 4)
    x = _layer_norm(x, p["ln_f"])
    logits = jnp.einsum("btc,vc->btv", x, p["embed"]["table"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def _hand_step(tx, dtype, implementation):
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(_hand_loss)(
            params, *batch, dtype=dtype, implementation=implementation
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def _fnnet_step(size, tx, dtype, implementation):
    model = _fnnet_model(size, implementation)
    policy = train.Policy.bfloat16() if dtype == jnp.bfloat16 else None
    step = train.make_train_step(model, tx, train.softmax_cross_entropy, policy=policy)

    def run(state, batch):
        state, metrics = step(state, batch)
        return state, metrics["loss"]

    return run


def _fnnet_model(size, implementation):
    s = SIZES[size]
    return transformer_lm(
        s["vocab"],
        features=s["features"],
        depth=s["depth"],
        num_heads=s["num_heads"],
        max_len=s["seq"],
        position="learned",
        tie_embeddings=True,
        attention_implementation=implementation,
    )


class _Contender:
    """A donated, compiled step and the state it trains."""

    def __init__(self, step, state, batch):
        self.compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
        self.state, self.batch = jax.tree.map(jnp.copy, state), batch
        self.first_loss = None

    def run(self, steps):
        loss = None
        for _ in range(steps):
            self.state, loss = self.compiled(self.state, self.batch)
        return loss

    def time(self, steps) -> float:
        jax.block_until_ready(self.state)
        start = time.perf_counter()
        loss = self.run(steps)
        jax.block_until_ready((self.state, loss))
        return (time.perf_counter() - start) / steps

    def memory(self) -> float | None:
        stats = self.compiled.memory_analysis()
        if stats is None:
            return None
        used = stats.argument_size_in_bytes + stats.output_size_in_bytes
        return used + stats.temp_size_in_bytes - stats.alias_size_in_bytes


def _list(text: str, allowed, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"{flag}: expected a comma-separated list of {list(allowed)}, got {text!r}"
        )
    return items


def _parse(argv):
    backend = jax.default_backend()
    accelerator = backend in ("gpu", "tpu")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=list(SIZES), default="gpt2-small" if accelerator else "tiny"
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument(
        "--attention",
        type=lambda t: _list(t, ATTENTIONS, "--attention"),
        default=["xla", "cudnn"] if backend == "gpu" else ["xla"],
    )
    parser.add_argument(
        "--dtype",
        type=lambda t: _list(t, DTYPES, "--dtype"),
        default=["float32", "bfloat16"] if accelerator else ["float32"],
    )
    parser.add_argument("--peak-flops", type=float, default=None, help="one device's FLOP/s")
    args = parser.parse_args(argv)
    if "cudnn" in args.attention and backend != "gpu":
        parser.error(f"--attention cudnn needs an NVIDIA GPU; this backend is {backend}")
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or (args.batch is not None and args.batch < 1):
        parser.error("--warmup must be >= 0 and --batch >= 1")
    if args.peak_flops is not None:
        try:
            train.peak_flops(override=args.peak_flops)
        except ValueError as e:
            parser.error(f"--peak-flops: {e}")
    return args


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def main(argv=None) -> list[dict[str, Any]]:
    args = _parse(argv)
    size = dict(SIZES[args.size])
    batch_size, seq = args.batch or size["batch"], size["seq"]
    device = jax.devices()[0]
    peak = train.peak_flops(device, jnp.bfloat16, override=args.peak_flops)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}")
    print(
        f"size {args.size}: {size['depth']} layers, width {size['features']}, "
        f"{size['num_heads']} heads, vocab {size['vocab']}, batch {batch_size} x seq {seq}"
    )
    peak_text = "n/a" if peak.flops is None else f"{peak.flops / 1e12:g} TFLOP/s"
    print(f"peak (dense bf16, one device): {peak_text} ({peak.source})")

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, size["vocab"], (batch_size, seq + 1)), jnp.int32)
    batch = (ids[:, :-1], ids[:, 1:])
    tx = optax.adam(LEARNING_RATE)
    example = jax.ShapeDtypeStruct((seq,), jnp.int32)
    # One compiled program: run op by op, the tiny model's init took 23 s on the CPU.
    model = _fnnet_model(args.size, None)
    fnnet_state = jax.jit(lambda: train.init_state(model, tx, example, seed=0))()
    hand_state = (fnnet_state.params, tx.init(fnnet_state.params))
    flops = train.transformer_lm_flops(model, batch=batch_size, seq=seq)
    n_params = sum(a.size for a in jax.tree.leaves(fnnet_state.params))
    print(f"parameters: {n_params:,}; model FLOPs per step {flops:.4g} (6N + 12*L*seq*d)")

    rows = []
    for attention in args.attention:
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            impl = None if attention == "xla" else attention
            contenders = {
                "fnnet": _Contender(_fnnet_step(args.size, tx, dtype, impl), fnnet_state, batch),
                "hand-written": _Contender(_hand_step(tx, dtype, impl), hand_state, batch),
            }
            for c in contenders.values():
                c.first_loss = float(c.run(1))
                c.run(args.warmup)
            first = {name: c.first_loss for name, c in contenders.items()}
            print(
                f"{attention}/{dtype_name} first-step loss: fnnet {first['fnnet']:.6f}, "
                f"hand-written {first['hand-written']:.6f}"
            )
            if not np.isclose(first["fnnet"], first["hand-written"], rtol=LOSS_RTOL[dtype_name]):
                raise SystemExit(
                    f"{attention}/{dtype_name}: the first-step losses differ beyond rtol "
                    f"{LOSS_RTOL[dtype_name]}: the two models are not the same computation"
                )
            if attention == "xla":
                _cross_check(
                    flops, contenders, dtype_name, args.size, tx, dtype, fnnet_state, batch
                )
            times = {name: [] for name in contenders}
            ratios = []
            order = list(contenders)
            for r in range(args.repeats):
                for name in order if r % 2 == 0 else order[::-1]:
                    times[name].append(contenders[name].time(args.steps))
                ratios.append(times["fnnet"][-1] / times["hand-written"][-1])
            for name, c in contenders.items():
                seconds = statistics.median(times[name])
                rows.append(
                    {
                        "attention": attention,
                        "dtype": dtype_name,
                        "model": name,
                        "step_ms": seconds * 1e3,
                        "tokens_per_s": batch_size * seq / seconds,
                        "mfu": train.mfu(flops, seconds, peak.flops),
                        "memory_bytes": c.memory(),
                        "first_loss": c.first_loss,
                        "ratio": statistics.median(ratios) if name == "fnnet" else None,
                    }
                )
    _print_table(rows, peak, device)
    return rows


def _cross_check(flops, contenders, dtype_name, size, tx, dtype, state, batch):
    """The analytic count beside the jaxpr's products and XLA's count of both programs."""
    parts = [f"analytic {flops:.4g}"]
    hand = _hand_step(tx, dtype, None)
    fnnet = _fnnet_step(size, tx, dtype, None)
    hand_state = (state.params, tx.init(state.params))
    parts.append(f"jaxpr fnnet {train.matmul_flops(fnnet, state, batch):.4g}")
    parts.append(f"jaxpr hand {train.matmul_flops(hand, hand_state, batch):.4g}")
    for name, c in contenders.items():
        try:
            parts.append(f"XLA {name} {train.compiled_flops(c.compiled):.4g}")
        except ValueError:
            parts.append(f"XLA {name} n/a (a loop)")
    print(f"xla/{dtype_name} FLOPs per step: " + ", ".join(parts))


def _print_table(rows, peak, device):
    mfu_na = f"n/a: {peak.source.split(';')[0]}; pass --peak-flops"
    print()
    print(
        "| attention | dtype | model | step ms | tokens/s | MFU | XLA memory MiB | "
        "fnnet/hand time |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = mfu_na if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(
            f"| {r['attention']} | {r['dtype']} | {r['model']} | {r['step_ms']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {mfu} | {_mib(r['memory_bytes'])} | {ratio} |"
        )
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"\ndevice peak_bytes_in_use over the run: {_mib(stats['peak_bytes_in_use'])} MiB")
    else:
        print(f"\ndevice memory_stats(): not reported by {device.platform}; memory is XLA's")


if __name__ == "__main__":
    main()
