"""A step's FLOPs counted three ways agree; peaks come from the table or the user; MFU."""

import types

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fnnet import train
from fnnet.models import config_of, mlp, transformer_lm

BATCH, SEQ, VOCAB = 4, 32, 256


def _lm_step(**kwargs):
    """A tiny LM's training step (Adam), its state and a batch of token ids."""
    model = transformer_lm(VOCAB, max_len=SEQ, **kwargs)
    tx = optax.adam(1e-3)
    example = jax.ShapeDtypeStruct((SEQ,), jnp.int32)
    # Shapes only: counting traces or compiles the step but never runs it.
    state = jax.eval_shape(lambda: train.init_state(model, tx, example, seed=0))
    step = train.make_train_step(model, tx, train.softmax_cross_entropy)
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    return model, step, state, (tokens, tokens)


LMS = {
    "learned, tied": dict(features=64, depth=2, num_heads=4, position="learned"),
    "rotary, untied, GQA, mlp 2": dict(
        features=32, depth=3, num_heads=4, num_kv_heads=2, mlp_ratio=2, tie_embeddings=False
    ),
    "6 blocks in a scan": dict(features=32, depth=6, num_heads=2),
}


@pytest.mark.parametrize("kwargs", LMS.values(), ids=LMS.keys())
def test_the_analytic_count_is_the_jaxprs_matrix_products(kwargs):
    # Every matrix product runs three times (forward, input gradient, weight gradient),
    # so 6 * N + 12 * L * seq * d per token is exact for the products JAX runs; the
    # scanned stack's body is counted once per block.
    model, step, state, batch = _lm_step(**kwargs)
    analytic = train.transformer_lm_flops(model, batch=BATCH, seq=SEQ)
    assert train.matmul_flops(step, state, batch) == analytic


def test_xla_counts_the_products_and_a_few_percent_of_elementwise_work():
    # XLA also counts what is not a matrix product. In this model (width 64, 2 blocks)
    # that was 6.5% of the products in the forward and backward passes (layer norms,
    # GELU, the softmax's arithmetic, bias additions, the cross-entropy, and their
    # gradients) and 1.5% in Adam's update (12 FLOPs per parameter); 9.2% in all.
    # The share falls with width: elementwise work grows as d per token, products as
    # d * d (6.1% in all at width 128).
    model, step, state, batch = _lm_step(**LMS["learned, tied"])
    analytic = train.transformer_lm_flops(model, batch=BATCH, seq=SEQ)
    assert 1.03 * analytic < train.xla_flops(step, state, batch) < 1.15 * analytic


def test_xla_refuses_to_count_a_loop_it_would_count_once():
    # fnnet.repeat leaves such a loop over more than 4 blocks ("6 blocks in a scan").
    def looped(x):
        return jax.lax.scan(lambda h, _: (h @ jnp.ones((32, 32)), None), x, length=10)[0]

    x = jnp.ones((64, 32))
    with pytest.raises(ValueError, match="loop, whose body XLA counts once"):
        train.xla_flops(looped, x)
    once = train.xla_flops(looped, x, allow_loops=True)
    assert once < 0.2 * train.matmul_flops(looped, x) == 0.2 * 10 * 2 * 64 * 32 * 32


def test_the_analytic_count_of_gpt2_small():
    # 124M parameters with positions and norms; 123.5M in matrix products, token table included.
    config = dict(vocab=50257, features=768, depth=12, num_heads=12, max_len=1024)
    weights = 12 * 12 * 768 * 768 + 768 * 50257
    per_token = 6 * weights + 12 * 12 * 1024 * 768
    assert train.transformer_lm_flops(config, batch=8, seq=1024) == per_token * 8 * 1024
    built = {"model": "transformer_lm", "kwargs": config}
    assert train.transformer_lm_flops(built, batch=8, seq=1024) == per_token * 8 * 1024


def test_the_analytic_count_is_for_language_models_only():
    with pytest.raises(ValueError, match="got a mlp; use matmul_flops"):
        train.transformer_lm_flops(config_of(mlp(10)), batch=1, seq=1)
    with pytest.raises(ValueError, match="seq must be a positive int"):
        train.transformer_lm_flops({"vocab": 8}, batch=1, seq=0)


def test_matmul_flops_by_hand():
    a, b = jnp.ones((5, 3)), jnp.ones((3, 7))
    assert train.matmul_flops(jnp.matmul, a, b) == 2 * 5 * 3 * 7
    batched = jax.ShapeDtypeStruct((4, 5, 3), jnp.float32)
    assert train.matmul_flops(lambda x: jnp.einsum("bij,jk->bik", x, b), batched) == 4 * 210

    def looped(x):
        return jax.lax.scan(lambda h, _: (h @ jnp.ones((3, 3)), None), x, length=10)[0]

    assert train.matmul_flops(looped, a) == 10 * 2 * 5 * 3 * 3

    def branches(x, flag):
        return jax.lax.cond(flag, lambda x: (x @ b).sum(), lambda x: x.sum(), x)

    assert train.matmul_flops(branches, a, True) == 2 * 5 * 3 * 7  # the costlier branch
    image, kernel = jnp.ones((1, 3, 8, 8)), jnp.ones((6, 3, 3, 3))  # NCHW, OIHW
    conv = train.matmul_flops(lambda x, w: jax.lax.conv(x, w, (1, 1), "SAME"), image, kernel)
    assert conv == 2 * (6 * 8 * 8) * (3 * 3 * 3)
    with pytest.raises(ValueError, match="while loop's trip count"):
        train.matmul_flops(lambda x: jax.lax.while_loop(lambda h: h.sum() < 9, jnp.sin, x), a)


def test_xla_flops_of_a_product_split_over_devices_is_the_whole_products():
    # The suite runs 8 CPU devices; XLA reports one device's share of a partitioned program.
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    assert train.xla_flops(jnp.matmul, a, b) == 2 * 64 * 32 * 16
    mesh = jax.make_mesh((8,), ("d",))
    split = jax.device_put(a, NamedSharding(mesh, PartitionSpec("d")))
    assert train.xla_flops(jnp.matmul, split, b) == 2 * 64 * 32 * 16


def _device(kind):
    return types.SimpleNamespace(device_kind=kind)


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.5),
        ("NVIDIA H200", 989.5),
        ("NVIDIA A100-SXM4-40GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
    ],
)
def test_known_devices_have_their_bfloat16_peak(kind, tflops, monkeypatch):
    monkeypatch.delenv("FNNET_PEAK_FLOPS", False)
    peak = train.peak_flops(_device(kind))
    assert peak == train.Peak(tflops * 1e12, f"table: {kind}")


@pytest.mark.parametrize("kind", ["cpu", "NVIDIA H100 PCIe", "TPU v4 lite", "NVIDIA B200"])
def test_an_unknown_device_has_no_peak_and_says_so(kind, monkeypatch):
    monkeypatch.delenv("FNNET_PEAK_FLOPS", False)
    peak = train.peak_flops(_device(kind))
    assert peak.flops is None
    assert f"unknown peak for {kind}" in peak.source and "FNNET_PEAK_FLOPS" in peak.source


def test_the_cpu_and_float32_have_no_peak(monkeypatch):
    monkeypatch.delenv("FNNET_PEAK_FLOPS", False)
    assert train.peak_flops().flops is None  # the suite's device is a CPU
    peak = train.peak_flops(_device("NVIDIA H100 80GB HBM3"), jnp.float32)
    assert peak.flops is None and "no float32 peak is recorded" in peak.source


def test_the_user_overrides_the_peak(monkeypatch):
    monkeypatch.setenv("FNNET_PEAK_FLOPS", "2.5e12")
    assert train.peak_flops() == train.Peak(2.5e12, "FNNET_PEAK_FLOPS")
    assert train.peak_flops(_device("TPU v4"), override=1e15) == train.Peak(1e15, "argument")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "fast", True])
def test_a_bad_peak_is_refused_by_name(bad, monkeypatch):
    monkeypatch.delenv("FNNET_PEAK_FLOPS", False)
    with pytest.raises(ValueError, match="peak_flops override must be a positive"):
        train.peak_flops(override=bad)
    if not isinstance(bad, bool):
        monkeypatch.setenv("FNNET_PEAK_FLOPS", str(bad))
        with pytest.raises(ValueError, match="FNNET_PEAK_FLOPS must be a positive"):
            train.peak_flops()


def test_mfu_is_achieved_over_peak_times_devices():
    # 6 TFLOP in 2 s on 3 devices of 1 TFLOP/s each: all of the peak.
    assert train.mfu(6e12, 2.0, 1e12, devices=3) == pytest.approx(1.0)
    assert train.mfu(6e12, 2.0, 4e12) == pytest.approx(0.75)
    assert train.mfu(6e12, 2.0, None) is None


@pytest.mark.parametrize(
    "args, name",
    [
        ((0.0, 1.0, 1e12), "flops_per_step"),
        ((1.0, float("nan"), 1e12), "seconds_per_step"),
        ((1.0, 1.0, -5.0), "peak"),
        ((1.0, 1.0, 0.0), "peak"),
    ],
)
def test_mfu_refuses_bad_values_by_name(args, name):
    with pytest.raises(ValueError, match=f"^{name} must be a positive"):
        train.mfu(*args)
    with pytest.raises(ValueError, match="devices must be a positive int"):
        train.mfu(1.0, 1.0, 1.0, devices=0)


def test_compiled_flops_reads_a_program_compiled_elsewhere():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    assert train.compiled_flops(compiled) == train.xla_flops(jnp.matmul, a, b) == 2 * 64 * 32 * 16
