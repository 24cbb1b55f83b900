"""Attention under ``jax.vmap`` runs its own batching rule (``fnnet._src.attention_core``):
one ``jax.nn.dot_product_attention`` call for the whole batch. On the CPU that batched
route must equal the per-example one (the layer run on each example in turn, so
each kernel call sees one example), in outputs and in gradients
for the params and the inputs, whatever the masks, and the program must hold one
batched kernel call per layer, fed sequence lengths where the mask is a prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from fnnet._src import attention_core

BATCH, SEQ, FEATURES = 3, 5, 8
LENGTHS = np.array([5, 2, 3], np.int32)  # one example without padding


@pytest.fixture(autouse=True)
def batched_backward(monkeypatch):
    """Gradients here run the custom-batched backward pass that fnnet gives the cuDNN
    kernel, with XLA's kernel (all a CPU has); one test restores the default."""
    monkeypatch.setattr(attention_core, "_BATCHED_BACKWARD", (None, "xla", "cudnn"))


# Test data is made and compared in NumPy: every eager jax.numpy operation here would
# be one more small program to compile.


def _normal(rng, *shape, dtype=np.float32, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def _params(layer, x, rng, dtype=None, **kw):
    """Random params of the layer's shapes (nonzero biases), without compiling init."""
    shapes = jax.eval_shape(lambda k, x: layer.init(k, x, **kw), jax.random.key(0), x)
    return jax.tree.map(lambda s: _normal(rng, *s.shape, dtype=dtype or s.dtype, scale=0.3), shapes)


def _differentiable(inputs: dict) -> dict:
    return {
        n: a for n, a in inputs.items() if n != "cache" and jnp.issubdtype(a.dtype, jnp.floating)
    }


def _loss(y):
    """A weighted sum of ``(*batch, seq, features)`` outputs, summed over the batch."""
    # Fixed, unequal weights, so that every output element reaches the gradients.
    seq, features = y.shape[-2:]
    weights = jnp.cos(jnp.arange(seq * features, dtype=jnp.float32)).reshape(seq, features)
    return jnp.sum(y.astype(jnp.float32) * jnp.broadcast_to(weights, y.shape))


def _batched(layer, params, batched: dict, shared: dict, depth: int):
    """The layer under ``depth`` vmaps: its outputs and the gradients of a loss of them.

    ``batched`` inputs carry ``depth`` leading example axes, ``shared`` ones none (a
    vmap that batches only some operands). Gradients are taken for the params and
    every floating-point input.
    """

    def loss(params, batched_floats, shared_floats):
        def one(example):
            inputs = {**shared, **shared_floats, **example}
            return layer.apply(params, inputs.pop("x"), **inputs)

        f = one
        for _ in range(depth):
            f = jax.vmap(f)
        out = f({**batched, **batched_floats})
        return _loss(out[0] if isinstance(out, tuple) else out), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = step(params, _differentiable(batched), _differentiable(shared))
    return out, grads


def _per_example(layer, params, batched: dict, shared: dict, depth: int):
    """The same, one example at a time, with no vmap at all: each kernel call sees
    one example (a batch of one), as every call did before the custom batching."""

    def loss(params, example_floats, shared_floats, example):
        inputs = {**shared, **shared_floats, **example, **example_floats}
        out = layer.apply(params, inputs.pop("x"), **inputs)
        return _loss(out[0] if isinstance(out, tuple) else out), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    lead = np.shape(batched["x"])[:depth]
    batched = jax.tree.map(np.asarray, batched)
    outs, grads = [], []
    for i in np.ndindex(*lead):
        example = jax.tree.map(lambda a, i=i: a[i], batched)
        (_, out), g = step(params, _differentiable(example), _differentiable(shared), example)
        outs.append(jax.tree.map(np.asarray, out))
        grads.append(jax.tree.map(np.asarray, g))
    # Each example's own input gradients, stacked; params' and shared inputs' summed.
    stack = lambda *a: np.reshape(np.stack(a), (*lead, *a[0].shape))  # noqa: E731
    total = lambda *a: np.sum(np.stack(a), axis=0)  # noqa: E731
    g_params, g_batched, g_shared = zip(*grads)
    return jax.tree.map(stack, *outs), (
        jax.tree.map(total, *g_params),
        jax.tree.map(stack, *g_batched),
        jax.tree.map(total, *g_shared),
    )


def _assert_routes_agree(layer, params, batched, shared=None, depth=1, tol=1e-5):
    shared = shared or {}
    out, grads = _batched(layer, params, batched, shared, depth)
    ref_out, ref_grads = _per_example(layer, params, batched, shared, depth)
    close = dict(rtol=tol, atol=tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **close), out, ref_out)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **close), grads, ref_grads)
    return out


def _inputs(rng, dtype=jnp.float32):
    return _normal(rng, BATCH, SEQ, FEATURES, dtype=dtype)


def _padding(kv_seq=SEQ):
    return np.arange(kv_seq)[None, :] < LENGTHS[:, None]  # (batch, kv_seq)


CASES = {
    # name: (layer kwargs, given rng: the batched inputs beyond x)
    "no_mask": ({}, lambda rng: {}),
    "padding_mask": ({}, lambda rng: {"mask": _padding()}),
    "padding_length": ({}, lambda rng: {"length": LENGTHS}),
    "causal_gqa": ({"num_heads": 4, "num_kv_heads": 2, "causal": True}, lambda rng: {}),
    "causal_padding_mask": ({"causal": True}, lambda rng: {"mask": _padding()}),
    "causal_gqa_mask_and_length": (
        {"num_heads": 4, "num_kv_heads": 2, "causal": True},
        lambda rng: {"mask": rng.random((BATCH, SEQ, SEQ)) < 0.7, "length": LENGTHS},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_batched_equals_per_example(rng, name):
    kwargs, extra = CASES[name]
    layer = fnnet.multi_head_attention(kwargs.pop("num_heads", 2), **kwargs)
    x = _inputs(rng)
    params = _params(layer, x[0], rng)
    _assert_routes_agree(layer, params, {"x": x, **extra(rng)})


def test_cross_attention_with_context(rng):
    """Only the queries and the per-query mask batched: one context for the batch."""
    layer = fnnet.multi_head_attention(2)
    x, context = _inputs(rng), _normal(rng, 4, 6)
    params = _params(layer, x[0], rng, context=context)
    mask = rng.random((BATCH, SEQ, 4)) < 0.7
    _assert_routes_agree(layer, params, {"x": x, "mask": mask}, {"context": context})


def test_fully_masked_rows_are_zero_attention(rng):
    layer = fnnet.multi_head_attention(2)
    x = _inputs(rng)
    params = _params(layer, x[0], rng)
    mask = rng.random((BATCH, SEQ, SEQ)) < 0.6
    mask[:, :, 0] = True
    mask[0, 1] = False  # example 0, query 1 sees nothing
    length = np.array([5, 0, 2], np.int32)  # example 1 sees nothing at all
    y = _assert_routes_agree(layer, params, {"x": x, "mask": mask, "length": length})
    bias = params["out"]["b"]
    np.testing.assert_allclose(y[0, 1], bias, rtol=1e-6)
    np.testing.assert_allclose(y[1], np.broadcast_to(bias, (SEQ, FEATURES)), rtol=1e-6)
    live = np.delete(np.asarray(y[0]), 1, axis=0)
    assert np.all(np.abs(live - bias[None]) > 0)


def test_nested_vmap(rng):
    """Replicas x batch: both vmap axes fold into the kernel's one batch axis."""
    layer = fnnet.multi_head_attention(4, num_kv_heads=2, causal=True)
    x = _normal(rng, 2, BATCH, SEQ, FEATURES)
    params = _params(layer, x[0, 0], rng)
    # Lengths batched by both vmaps, and a per-query mask neither batches.
    lengths = np.stack([LENGTHS, LENGTHS[::-1]])
    mask = rng.random((SEQ, SEQ)) < 0.7
    _assert_routes_agree(layer, params, {"x": x, "length": lengths}, {"mask": mask}, depth=2)


def test_kv_cache_prefill_and_decode(rng):
    layer = fnnet.multi_head_attention(4, num_kv_heads=2, causal=True, rotary=True)
    max_len, head_dim = 8, FEATURES // 4
    params = _params(layer, _inputs(rng)[0], rng)
    empty = jax.eval_shape(lambda: fnnet.init_attention_cache(max_len, 2, head_dim))
    caches = jax.tree.map(lambda a: np.zeros((BATCH, *a.shape), a.dtype), empty)
    prompt = _inputs(rng)[:, :4]  # (batch, 4, features)
    _, caches = _assert_routes_agree(layer, params, {"x": prompt, "cache": caches})
    # Examples at different positions: decode one token each from indexes 4, 2 and 6.
    caches = {**caches, "index": np.array([4, 2, 6], np.int32)}
    token = _normal(rng, BATCH, 1, FEATURES)
    _assert_routes_agree(layer, params, {"x": token, "cache": caches})


def test_bfloat16(rng):
    layer = fnnet.multi_head_attention(2, causal=True)
    x = _inputs(rng, dtype=jnp.bfloat16)
    params = _params(layer, x[0], rng, dtype=jnp.bfloat16)
    # Lowering the backward pass of JAX's kernel for bfloat16 (a dot_general with the
    # BF16_BF16_F32 algorithm) promotes float32 with bfloat16, which the suite's strict
    # promotion refuses, with or without the custom batching; so standard here.
    with jax.numpy_dtype_promotion("standard"):
        batched = {"x": x, "mask": rng.random((BATCH, SEQ, SEQ)) < 0.7, "length": LENGTHS}
        y = _assert_routes_agree(layer, params, batched, tol=2e-2)
    assert y.dtype == jnp.bfloat16


def test_classifier_length_equals_mask(rng):
    """The classifier's ``length`` is its padding ``mask`` as a count, pooling included."""
    model = fnnet.models.transformer_classifier(3, features=FEATURES, depth=1, num_heads=2)
    x = _inputs(rng)
    params = _params(model, x[0], rng)

    @jax.jit
    def both(params, x):
        by_mask = jax.vmap(lambda x, m: model.apply(params, x, mask=m))(x, _padding())
        by_length = jax.vmap(lambda x, n: model.apply(params, x, length=n))(x, LENGTHS)
        return by_mask, by_length, jax.vmap(lambda x: model.apply(params, x))(x)

    by_mask, by_length, unpadded = both(params, x)
    np.testing.assert_allclose(by_length, by_mask, rtol=1e-5, atol=1e-6)
    # Padding changes the answer, so the comparison above is not between two no-ops.
    assert np.max(np.abs(np.asarray(by_mask) - np.asarray(unpadded))) > 1e-3


# --- The program: one batched kernel call per layer --------------------------------


def _subprograms(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subprograms(v)


def _kernel_calls(jaxpr) -> list[tuple[str, list]]:
    """Every custom-batched call in a program (sub-programs included): "forward" (one
    result) or "backward" (three: the q, k, v cotangents), and its operands' (shape,
    dtype)."""
    calls = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_vmap_call":
            operands = [(tuple(v.aval.shape), v.aval.dtype) for v in eqn.invars]
            calls.append(("forward" if len(eqn.outvars) == 1 else "backward", operands))
        for value in eqn.params.values():
            for sub in _subprograms(value):
                calls += _kernel_calls(sub)
    return calls


def _program(layer, params, batched: dict, shared=None, grad=False, depth=1):
    shared = shared or {}

    def apply(params, example):
        inputs = {**example, **shared}
        out = layer.apply(params, inputs.pop("x"), **inputs)
        return out[0] if isinstance(out, tuple) else out

    f = lambda p, b: apply(p, b)  # noqa: E731
    for _ in range(depth):
        f = jax.vmap(f, (None, 0))
    if grad:
        f = jax.grad(lambda p, b, f=f: jnp.sum(f(p, b)))
    return jax.make_jaxpr(f)(params, batched).jaxpr


def _forward_calls(calls):
    return [operands for role, operands in calls if role == "forward"]


@pytest.mark.parametrize(
    "name, kwargs, extra, kernel_mask",
    [
        ("padding_length", {}, {"length": LENGTHS}, None),
        ("causal", {"causal": True}, {}, None),
        ("per_query_mask", {}, {"mask": np.ones((BATCH, SEQ, SEQ), bool)}, (BATCH, SEQ, SEQ)),
    ],
)
def test_one_batched_kernel_call(rng, name, kwargs, extra, kernel_mask):
    layer = fnnet.multi_head_attention(4, num_kv_heads=2, **kwargs)
    x = _inputs(rng)
    params = _params(layer, x[0], rng)
    calls = _forward_calls(_kernel_calls(_program(layer, params, {"x": x, **extra})))
    assert len(calls) == 1, calls
    q, k, v, *rest = calls[0]
    assert q == ((BATCH, SEQ, 4, 2), jnp.float32)
    assert k[0] == v[0] == (BATCH, SEQ, 2, 2)
    masks = [shape for shape, dtype in rest if dtype == jnp.bool_]
    assert masks == ([] if kernel_mask is None else [kernel_mask])
    lengths = [shape for shape, dtype in rest if dtype == jnp.int32]
    assert lengths == ([(BATCH,)] if "length" in extra else [])


def test_kernel_call_shapes_under_nesting_sharing_and_grad(rng):
    layer = fnnet.multi_head_attention(2)
    x = _normal(rng, 2, BATCH, SEQ, FEATURES)
    params = _params(layer, x[0, 0], rng)
    mask = np.ones(SEQ, bool)
    # Two vmaps, a mask neither batches: one call on (2, 3, ...), the mask unreplicated.
    calls = _kernel_calls(_program(layer, params, {"x": x}, {"mask": mask}, depth=2))
    (q, _, _, m), *more = _forward_calls(calls)
    assert not more
    assert q[0] == (2, BATCH, SEQ, 2, 4) and m[0] == (1, 1, SEQ, SEQ)
    # The gradient program: one forward and one backward call, both batched.
    calls = _kernel_calls(_program(layer, params, {"x": x[0]}, grad=True))
    assert sorted(role for role, _ in calls) == ["backward", "forward"]
    assert all(operands[0][0] == (BATCH, SEQ, 2, 4) for _, operands in calls)


def test_decode_step_takes_a_length_not_a_mask(rng):
    model = fnnet.models.transformer_lm(11, features=FEATURES, depth=1, num_heads=2, max_len=8)
    tokens = np.zeros((BATCH, 1), np.int32)
    params = _params(model, tokens[0], rng)
    caches = jax.eval_shape(lambda p: fnnet.models.init_cache(p, 8), params)
    caches = jax.tree.map(lambda a: np.zeros((BATCH, *a.shape), a.dtype), caches)
    calls = _forward_calls(_kernel_calls(_program(model, params, {"x": tokens, "cache": caches})))
    assert calls, "no custom-batched attention call"
    for operands in calls:
        assert operands[0][0] == (BATCH, 1, 2, 4)
        assert [dtype for _, dtype in operands[3:]] == [jnp.int32]  # a length, no mask


def test_xla_gradients_by_default_keep_the_attention_weights(rng, monkeypatch):
    """fnnet's default for XLA's kernel: the forward pass is custom-batched, and its
    gradient is JAX's own batched vjp, which recomputes nothing."""
    monkeypatch.setattr(attention_core, "_BATCHED_BACKWARD", ("cudnn",))
    layer = fnnet.multi_head_attention(4, num_kv_heads=2, causal=True)
    x = _inputs(rng)
    params = _params(layer, x[0], rng)
    mask = rng.random((BATCH, SEQ, SEQ)) < 0.7
    _assert_routes_agree(layer, params, {"x": x, "mask": mask, "length": LENGTHS})
    assert len(_forward_calls(_kernel_calls(_program(layer, params, {"x": x})))) == 1
    assert _kernel_calls(_program(layer, params, {"x": x}, grad=True)) == []
