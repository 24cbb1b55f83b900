"""The models' oracles: each fnnet model's math written out by hand in jax.numpy.

Each ``forward(params, x)`` takes the fnnet parameter tree and a whole batch, as a
person writing the model directly in JAX would (no vmap, batch axis explicit).
``tests/test_models.py`` checks every model in :data:`CASES` against its forward;
the benchmarks (``bench/``) time the same functions as their hand-written
baselines, so what is measured is what is tested. Import it as
``from tests import handwritten`` (from the repository root, as ``pytest`` and
``python -m bench.core`` run).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import fnnet


def mlp_forward(params, x):
    # (batch, 40) -> two hidden layers, the second residual -> (batch, 10)
    h = jax.nn.relu(x @ params["hidden_0"]["w"] + params["hidden_0"]["b"])
    h = h + jax.nn.relu(h @ params["hidden_1"]["w"] + params["hidden_1"]["b"])
    return h @ params["out"]["w"] + params["out"]["b"]


def cnn_forward(params, x):
    h = x  # (batch, length, channels)
    for i, k in enumerate((5, 3, 3)):
        del k
        p = params[f"conv_{i}"]
        h = jax.lax.conv_general_dilated(
            h,
            p["w"],
            window_strides=(2,),
            padding=((1, 1),),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        h = jax.nn.relu(h + p["b"])
    h = h.reshape(h.shape[0], -1)  # (batch, positions * channels)
    return h @ params["out"]["w"] + params["out"]["b"]


def _gru_direction(cell, x, reverse):
    """One GRU direction over a batch: x (batch, seq, features) -> (batch, seq, hidden).

    The input (1 feature) is narrower than the 18 gate values it feeds, so each
    step projects its own input: projecting the whole sequence first would
    scan, and backpropagate through, an 18-wide sequence instead of a 1-wide one
    (about 25% slower per training step on the CPU).
    """
    xs = jnp.swapaxes(x, 0, 1)  # (seq, batch, features)
    if reverse:
        xs = xs[::-1]
    u, b_hn = cell["recurrent"]["w"], cell["recurrent"]["b"]

    def step(h, xt):
        xt = xt @ cell["input"]["w"] + cell["input"]["b"]  # (batch, 3 * hidden)
        xr, xz, xn = jnp.split(xt, 3, axis=-1)
        hr, hz, hn = jnp.split(h @ u, 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        h = (1 - z) * jnp.tanh(xn + r * (hn + b_hn)) + z * h
        return h, h

    h0 = jnp.zeros((x.shape[0], u.shape[0]), x.dtype)
    _, hs = jax.lax.scan(step, h0, xs)  # (seq, batch, hidden)
    if reverse:
        hs = hs[::-1]
    return jnp.swapaxes(hs, 0, 1)


def _gru_direction_one(cell, x, reverse):
    """One GRU direction over one example, written per example: (seq, 1) -> (seq, hidden)."""
    xs = x[::-1] if reverse else x
    u, b_hn = cell["recurrent"]["w"], cell["recurrent"]["b"]

    def step(h, xt):
        xt = xt @ cell["input"]["w"] + cell["input"]["b"]  # (3 * hidden,), as fnnet projects
        xr, xz, xn = jnp.split(xt, 3)
        hr, hz, hn = jnp.split(h @ u, 3)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        h = (1 - z) * jnp.tanh(xn + r * (hn + b_hn)) + z * h
        return h, h

    _, hs = jax.lax.scan(step, jnp.zeros(u.shape[0], x.dtype), xs)
    return hs[::-1] if reverse else hs


def gru_forward_per_example(params, x):
    """The same GRU written for one example and batched with jax.vmap, fnnet's convention."""

    def one(x):
        x = x[:, None]  # (seq, 1)
        layer = params["rnn_0"]
        h = jnp.concatenate(
            [
                _gru_direction_one(layer["forward"]["cell"], x, False),
                _gru_direction_one(layer["backward"]["cell"], x, True),
            ],
            axis=-1,
        )
        return h.reshape(-1) @ params["out"]["w"] + params["out"]["b"]

    return jax.vmap(one)(x)


def gru_forward(params, x):
    x = x[..., None]  # (batch, seq, 1)
    layer = params["rnn_0"]
    h = jnp.concatenate(
        [
            _gru_direction(layer["forward"]["cell"], x, False),
            _gru_direction(layer["backward"]["cell"], x, True),
        ],
        axis=-1,
    )
    h = h.reshape(h.shape[0], -1)  # (batch, seq * 2 * hidden)
    return h @ params["out"]["w"] + params["out"]["b"]


def _layer_norm(p, x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _block(h, p):
    """One pre-LayerNorm transformer block over a batch: (batch, tokens, width)."""
    a = p["attn"]
    z = _layer_norm(p["ln1"], h)
    q, k, v = (jnp.einsum("bsf,fhd->bshd", z, a[n]["w"]) + a[n]["b"] for n in "qkv")
    o = jax.nn.dot_product_attention(q, k, v)  # (batch, tokens, heads, head_dim)
    h = h + jnp.einsum("bshd,hdf->bsf", o, a["out"]["w"]) + a["out"]["b"]
    z = _layer_norm(p["ln2"], h)
    m = p["mlp"]
    z = jax.nn.gelu(z @ m["up"]["w"] + m["up"]["b"])
    return h + z @ m["down"]["w"] + m["down"]["b"]


def _patches(params, x):
    """(batch, seq) -> (batch, tokens, patch): the patch size is the embedding's input
    width (4 for the patched transformer, 1 for one token per sample)."""
    patch = params["embed"]["w"].shape[0]
    return x.reshape(x.shape[0], x.shape[1] // patch, patch)


def transformer_forward_scanned(params, x):
    """The same transformer with its blocks in a lax.scan loop, as fnnet.repeat ran
    them before it unrolled short stacks (it still loops over more than 4 blocks)."""
    h = _patches(params, x) @ params["embed"]["w"] + params["embed"]["b"]
    h = h + params["position"]["table"][: h.shape[1]]
    h, _ = jax.lax.scan(lambda h, p: (_block(h, p), None), h, params["blocks"])
    h = _layer_norm(params["ln_f"], h).mean(axis=1)
    return h @ params["out"]["w"] + params["out"]["b"]


def transformer_forward(params, x, depth=2):
    h = _patches(params, x)  # (batch, tokens, patch)
    h = h @ params["embed"]["w"] + params["embed"]["b"]  # (batch, tokens, width)
    h = h + params["position"]["table"][: h.shape[1]]
    for i in range(depth):  # unrolled: a Python loop over the blocks
        h = _block(h, jax.tree.map(lambda a, i=i: a[i], params["blocks"]))
    h = _layer_norm(params["ln_f"], h).mean(axis=1)  # (batch, width)
    return h @ params["out"]["w"] + params["out"]["b"]


def _signals(rng, batch):
    return rng.standard_normal((batch, 40)).astype("float32")


def _signals_with_channel(rng, batch):
    return rng.standard_normal((batch, 40, 1)).astype("float32")


CASES = {
    "mlp (MNIST-1D, 15k params)": (
        fnnet.models.mlp(10, (100, 100), residual=True),
        mlp_forward,
        _signals,
    ),
    "cnn (MNIST-1D, 5k params)": (
        fnnet.models.cnn(10, (25, 25, 25), kernel_size=(5, 3, 3), strides=2, padding=1, pool=None),
        cnn_forward,
        _signals_with_channel,
    ),
    "gru (MNIST-1D, bidirectional, 5k params)": (
        fnnet.models.rnn(10, 6, cell="gru", bidirectional=True, output="flatten"),
        gru_forward,
        _signals,
    ),
    "transformer (patches of 4, width 64, depth 2)": (
        fnnet.models.transformer_classifier(10, features=64, depth=2, num_heads=4, patch_size=4),
        transformer_forward,
        _signals,
    ),
    # The same model with every sample its own token: 4 times the tokens, 16 times the
    # attention scores, and a position table only as long as the signal.
    "transformer_tokens (one token per sample, width 64, depth 2)": (
        fnnet.models.transformer_classifier(
            10, features=64, depth=2, num_heads=4, patch_size=1, max_len=40
        ),
        transformer_forward,
        _signals,
    ),
}

# Second hand-written versions that isolate one design choice; see bench/core.py.
VARIANTS = {
    "gru (MNIST-1D, bidirectional, 5k params)": ("per example + vmap", gru_forward_per_example),
    "transformer (patches of 4, width 64, depth 2)": (
        "blocks in a lax.scan loop",
        transformer_forward_scanned,
    ),
}
