"""The four architectures: reference computations, behaviour, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnnet
from tests import handwritten

M = fnnet.models


def _batch(model, params, xs, **kwargs):
    return jax.vmap(lambda x: model.apply(params, x, **kwargs))(xs)


@pytest.mark.parametrize("name", list(handwritten.CASES))
def test_models_equal_their_handwritten_jax(name, rng):
    model, forward, example = handwritten.CASES[name]
    xs = jnp.asarray(example(rng, 4))
    params = model.init(jax.random.key(0), xs[0])
    with jax.numpy_rank_promotion("allow"):  # the baselines broadcast biases as people do
        expected = forward(params, xs)
        if name in handwritten.VARIANTS:
            _, variant = handwritten.VARIANTS[name]
            np.testing.assert_allclose(variant(params, xs), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_batch(model, params, xs), expected, rtol=1e-5, atol=1e-5)


def test_mnist1d_reference_models_have_the_papers_parameter_counts():
    """The MNIST-1D paper reports 15,210 (MLP) and 5,210 (CNN) parameters."""
    x = jnp.zeros(40)

    def count(model):
        return sum(a.size for a in jax.tree.leaves(model.init(jax.random.key(0), x)))

    assert count(M.mlp(10, (100, 100), residual=True)) == 15_210
    assert (
        count(M.cnn(10, (25, 25, 25), kernel_size=(5, 3, 3), strides=2, padding=1, pool=None))
        == 5_210
    )


def test_mlp_flattens_images_and_rejects_bad_widths():
    model = M.mlp(4, (6,))
    image = jnp.ones((3, 5, 2))
    params = model.init(jax.random.key(0), image)
    assert params["hidden_0"]["w"].shape == (30, 6)
    with pytest.raises(fnnet.LayerError, match=r"mlp: hidden\[1\] must be a positive integer"):
        M.mlp(4, (6, 0))


def test_mlp_dropout_needs_a_key_and_is_identity_in_eval(rng):
    model = M.mlp(2, (32,), dropout_rate=0.5)
    x = jnp.asarray(rng.standard_normal(5), jnp.float32)
    params = model.init(jax.random.key(0), x)
    with pytest.raises(fnnet.LayerError, match="dropout.*key"):
        model.apply(params, x, train=True)
    a = model.apply(params, x, key=jax.random.key(1), train=True)
    b = model.apply(params, x, key=jax.random.key(2), train=True)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(
        model.apply(params, x), model.apply(params, x, key=jax.random.key(1))
    )


def test_cnn_batch_norm_updates_state_in_training_only(rng):
    model = M.cnn(3, (4,), norm="batch_norm")
    xs = jnp.asarray(rng.standard_normal((6, 8, 8, 1)) * 3 + 1, jnp.float32)
    params, state = model.init(jax.random.key(0), xs[0])
    assert model.stateful

    def train_step(x):
        return model.apply(params, state, x, train=True)

    _, new_state = jax.vmap(train_step, axis_name="batch", out_axes=(0, None))(xs)
    assert not np.allclose(new_state["norm_0"]["mean"], state["norm_0"]["mean"])
    _, same = model.apply(params, state, xs[0])
    jax.tree.map(np.testing.assert_array_equal, same, state)


def test_cnn_errors_name_the_field():
    with pytest.raises(fnnet.LayerError, match="kernel_size needs one value per conv layer"):
        M.cnn(3, (4, 4), kernel_size=(3, 3, 3))
    with pytest.raises(fnnet.LayerError, match="norm must be None or one of"):
        M.cnn(3, norm="batchnorm")
    model = M.cnn(3, (4,))
    params = model.init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    with pytest.raises(fnnet.LayerError, match="conv_0"):
        model.apply(params, jnp.zeros((8, 8, 2)))  # two channels where one was seen at init


def test_rnn_bidirectional_last_state_is_both_directions_final_states(rng):
    model = M.rnn(3, 4, cell="lstm", bidirectional=True)
    x = jnp.asarray(rng.standard_normal((6, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    fwd = fnnet.recurrent(fnnet.lstm_cell(4), return_sequences=False)
    bwd = fnnet.recurrent(fnnet.lstm_cell(4), return_sequences=False, reverse=True)
    h = jnp.concatenate(
        [fwd.apply(params["rnn_0"]["forward"], x), bwd.apply(params["rnn_0"]["backward"], x)]
    )
    expected = h @ params["out"]["w"] + params["out"]["b"]
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output", ["last", "mean", "flatten"])
def test_rnn_padding_does_not_change_the_answer(output, rng):
    """A padded sequence with lengths (or a mask) classifies like the unpadded one.

    ("flatten" depends on every position by design, so it is checked for the mask
    being honoured by the recurrent layers: padded outputs are zero.)"""
    model = M.rnn(3, 5, cell="gru", bidirectional=True, output=output)
    x = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    padded = jnp.concatenate([x, jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)])
    if output == "flatten":
        params = model.init(jax.random.key(0), padded)
        zeros = jnp.concatenate([x, jnp.zeros((3, 2))])
        a = model.apply(params, padded, lengths=jnp.int32(4))
        b = model.apply(params, zeros, mask=jnp.arange(7) < 4)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        return
    params = model.init(jax.random.key(0), x)
    expected = model.apply(params, x)
    np.testing.assert_allclose(
        model.apply(params, padded, lengths=jnp.int32(4)), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        model.apply(params, padded, mask=jnp.arange(7) < 4), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("output", ["last", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_rnn_mask_with_holes_reads_the_marked_steps(output, bidirectional, rng):
    """A mask need not be a prefix: the model reads the marked steps wherever they
    are, as if the others were removed (it used to read the first sum(mask) steps)."""
    model = M.rnn(3, 5, cell="gru", bidirectional=bidirectional, output=output)
    x = jnp.asarray(rng.standard_normal((7, 2)), jnp.float32)
    mask = jnp.array([False, True, True, False, True, False, True])
    params = model.init(jax.random.key(0), x)
    expected = model.apply(params, x[np.asarray(mask)])
    np.testing.assert_allclose(model.apply(params, x, mask=mask), expected, rtol=1e-5, atol=1e-6)


def test_rnn_model_errors():
    with pytest.raises(fnnet.LayerError, match="cell must be one of"):
        M.rnn(2, cell="transformer")
    with pytest.raises(fnnet.LayerError, match="output must be one of"):
        M.rnn(2, output="max")
    model = M.rnn(2, 3)
    with pytest.raises(fnnet.LayerError, match=r"expected a sequence"):
        model.init(jax.random.key(0), jnp.zeros((2, 3, 4)))


def _lm():
    return M.transformer_lm(17, features=16, depth=2, num_heads=4, num_kv_heads=2, max_len=32)


def test_lm_is_causal(rng):
    lm = _lm()
    tokens = jnp.asarray(rng.integers(0, 17, 8), jnp.int32)
    params = jax.jit(lm.init)(jax.random.key(0), tokens)
    changed = tokens.at[5].set((tokens[5] + 1) % 17)
    a, b = lm.apply(params, tokens), lm.apply(params, changed)
    np.testing.assert_allclose(a[:5], b[:5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[5:], b[5:])


@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_lm_cache_prefill_then_decode_equals_full_forward(position, rng):
    lm = M.transformer_lm(
        17, features=16, depth=2, num_heads=4, num_kv_heads=2, max_len=32, position=position
    )
    tokens = jnp.asarray(rng.integers(0, 17, 9), jnp.int32)
    params = lm.init(jax.random.key(0), tokens)
    full = lm.apply(params, tokens)
    cache = M.init_cache(params, 16)
    step = jax.jit(lambda p, t, c: lm.apply(p, t, cache=c))
    first, cache = step(params, tokens[:5], cache)  # prefill the prompt in one call
    rest = []
    for t in tokens[5:]:
        logits, cache = step(params, t[None], cache)
        rest.append(logits[0])
    np.testing.assert_allclose(
        jnp.concatenate([first, jnp.stack(rest)]), full, rtol=1e-4, atol=1e-4
    )


def test_generate_greedy_matches_argmax_without_cache(rng):
    lm = _lm()
    prompt = jnp.asarray(rng.integers(0, 17, 3), jnp.int32)
    params = jax.jit(lm.init)(jax.random.key(0), prompt)
    out = M.generate(lm, params, prompt, key=jax.random.key(1), max_new_tokens=5, temperature=0)
    tokens = prompt
    for _ in range(5):  # the slow way: rerun the whole sequence for every new token
        tokens = jnp.append(tokens, jnp.argmax(lm.apply(params, tokens)[-1]).astype(jnp.int32))
    np.testing.assert_array_equal(out, tokens)
    top1 = M.generate(lm, params, prompt, key=jax.random.key(2), max_new_tokens=5, top_k=1)
    np.testing.assert_array_equal(top1, tokens)


def test_generate_samples_from_the_distribution(rng):
    lm = _lm()
    prompt = jnp.asarray([1, 2], jnp.int32)
    params = jax.jit(lm.init)(jax.random.key(0), prompt)
    samples = {
        tuple(np.asarray(M.generate(lm, params, prompt, key=jax.random.key(i), max_new_tokens=4)))
        for i in range(6)
    }
    assert len(samples) > 1  # different keys, different text
    with pytest.raises(fnnet.LayerError, match="temperature"):
        M.generate(lm, params, prompt, key=jax.random.key(0), max_new_tokens=2, temperature=-1)


def test_transformer_classifier_ignores_masked_padding(rng):
    model = M.transformer_classifier(3, features=8, depth=2, num_heads=2, vocab=11)
    tokens = jnp.asarray(rng.integers(0, 11, 5), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    padded = jnp.concatenate([tokens, jnp.asarray([7, 7, 7], jnp.int32)])
    mask = jnp.arange(8) < 5
    np.testing.assert_allclose(
        model.apply(params, padded, mask=mask), model.apply(params, tokens), rtol=1e-5, atol=1e-5
    )


def test_transformer_errors_name_the_problem():
    with pytest.raises(fnnet.LayerError, match=r"num_heads \(3\) must divide features \(64\)"):
        M.transformer_lm(10, features=64, num_heads=3)
    with pytest.raises(fnnet.LayerError, match="position must be one of"):
        M.transformer_classifier(2, position="alibi")
    model = M.transformer_classifier(2, features=8, num_heads=2, patch_size=4)
    with pytest.raises(fnnet.LayerError, match="divisible by patch_size 4"):
        model.init(jax.random.key(0), jnp.zeros(10))
    lm = M.transformer_lm(10, features=8, num_heads=2)
    with pytest.raises(fnnet.LayerError, match="int token ids"):
        lm.init(jax.random.key(0), jnp.zeros(5))


def test_deep_stacks_compile_one_block(rng):
    """repeat() scans one block: the program does not grow with depth."""
    tokens = jnp.asarray(rng.integers(0, 11, 6), jnp.int32)

    def program_size(depth):
        lm = M.transformer_lm(11, features=8, depth=depth, num_heads=2, max_len=8)
        params = jax.eval_shape(lm.init, jax.random.key(0), tokens)  # shapes suffice
        return len(jax.jit(lm.apply).lower(params, tokens).as_text())

    assert program_size(8) < 1.1 * program_size(2)


def test_attention_implementation_reaches_every_blocks_attention(rng):
    """The models pass ``attention_implementation`` down (``"cudnn"`` selects the fused
    GPU kernel); ``"xla"`` computes what the default does, and a bad name fails at once."""
    tokens = jnp.asarray(rng.integers(0, 11, size=(6,)), jnp.int32)
    default = M.transformer_lm(11, features=8, depth=2, num_heads=2, max_len=6)
    xla = M.transformer_lm(
        11, features=8, depth=2, num_heads=2, max_len=6, attention_implementation="xla"
    )
    params = default.init(jax.random.key(0), tokens)
    np.testing.assert_array_equal(default.apply(params, tokens), xla.apply(params, tokens))
    assert fnnet.models.config_of(xla)["kwargs"]["attention_implementation"] == "xla"
    with pytest.raises(fnnet.LayerError, match="implementation must be one of"):
        M.transformer_classifier(3, features=8, num_heads=2, attention_implementation="flash")


def test_learned_positions_never_clamp_past_max_len():
    """Decoding past a learned table is an error, not a reuse of its last row."""
    lm = M.transformer_lm(17, features=16, depth=1, max_len=8, position="learned")
    tokens = jnp.arange(4, dtype=jnp.int32)
    params = lm.init(jax.random.key(0), tokens)
    with pytest.raises(fnnet.LayerError, match="learned position table only 8"):
        lm.apply(params, tokens, cache=M.init_cache(params, 12))
    with pytest.raises(fnnet.LayerError, match="max_len=8"):
        M.generate(lm, params, tokens, key=jax.random.key(1), max_new_tokens=5)
    with pytest.raises(fnnet.LayerError):  # the full forward, as before
        lm.apply(params, jnp.zeros((9,), jnp.int32))
    assert M.generate(lm, params, tokens, key=jax.random.key(1), max_new_tokens=4).shape == (8,)


def test_lm_starts_near_the_uniform_next_token_loss():
    """With the shipped defaults (tied embeddings) the first loss is about ln(vocab),
    as an untrained model that knows nothing should give (it was ~54 for 94 symbols)."""
    vocab = 94
    lm = M.transformer_lm(vocab)
    tokens = jax.random.randint(jax.random.key(1), (4, 65), 0, vocab)
    losses = []
    for seed in range(2):
        params = jax.jit(lm.init)(jax.random.key(seed), tokens[0, :-1])
        logits = jax.vmap(lambda t: lm.apply(params, t))(tokens[:, :-1])  # noqa: B023
        logp = jax.nn.log_softmax(logits)
        losses.append(-jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean())
    np.testing.assert_allclose(losses, np.log(vocab), rtol=0.03)
