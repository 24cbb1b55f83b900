"""Conformance cases for the four architectures (tiny sizes)."""

import jax.numpy as jnp

import fnnet.models as M

from registry import Case, integers, normal

CASES = [
    Case("models.mlp", lambda: M.mlp(3, (8, 8), residual=True), normal(6), ("models.mlp",)),
    Case(
        "models.mlp_dropout",
        lambda: M.mlp(3, (8,), dropout_rate=0.5),
        normal(2, 3),
        ("models.mlp",),
        train=True,
        needs_key=True,
    ),
    Case(
        "models.cnn_1d",
        lambda: M.cnn(3, (4, 4), kernel_size=(5, 3), strides=2, padding=1, pool=None),
        normal(16),
        ("models.cnn",),
    ),
    Case(
        "models.cnn_2d",
        lambda: M.cnn(3, (4,), hidden=(5,), global_pool=True),
        normal(6, 6, 2),
        ("models.cnn",),
    ),
    Case(
        # Three pooled stages and a global pool: one init key per child, pools included.
        "models.cnn_pooled_stages",
        lambda: M.cnn(3, (4, 4, 4), global_pool=True),
        normal(8, 8, 1),
        ("models.cnn",),
    ),
    Case(
        "models.cnn_batch_norm",
        lambda: M.cnn(3, (4,), norm="batch_norm"),
        normal(8, 8, 1),
        ("models.cnn",),
        train=True,
        vmap_axis_name="batch",
    ),
    Case("models.rnn_lstm", lambda: M.rnn(3, 4, cell="lstm"), normal(5, 2), ("models.rnn",)),
    Case(
        "models.rnn_gru_bidirectional_flatten",
        lambda: M.rnn(3, 4, cell="gru", bidirectional=True, output="flatten"),
        normal(5),
        ("models.rnn",),
    ),
    Case(
        "models.rnn_simple_sequence",
        lambda: M.rnn(2, 4, cell="simple", num_layers=2, output="sequence"),
        normal(5, 2),
        ("models.rnn",),
    ),
    Case(
        "models.rnn_mean_lengths",
        lambda: M.rnn(2, 4, cell="gru", output="mean"),
        normal(6, 2),
        ("models.rnn",),
        apply_kwargs={"lengths": jnp.int32(4)},
    ),
    Case(
        "models.transformer_classifier",
        lambda: M.transformer_classifier(3, features=8, depth=2, num_heads=2, patch_size=2),
        normal(8),
        ("models.transformer_classifier",),
        tol=1e-4,
    ),
    Case(
        "models.transformer_classifier_tokens",
        lambda: M.transformer_classifier(
            3, features=8, depth=1, num_heads=2, vocab=11, position="rotary"
        ),
        integers(11, 6),
        ("models.transformer_classifier",),
        tol=1e-4,
    ),
    Case(
        "models.transformer_lm",
        lambda: M.transformer_lm(13, features=8, depth=2, num_heads=2, num_kv_heads=1, max_len=16),
        integers(13, 6),
        ("models.transformer_lm",),
        tol=1e-4,
    ),
    Case(
        "models.transformer_lm_learned_untied",
        lambda: M.transformer_lm(
            13,
            features=8,
            depth=1,
            num_heads=2,
            max_len=16,
            position="learned",
            tie_embeddings=False,
        ),
        integers(13, 6),
        ("models.transformer_lm",),
        tol=1e-4,
    ),
    Case(
        "models.build_rnn",
        lambda: M.build(
            {"model": "rnn", "kwargs": {"out_features": 2, "hidden": 3, "cell": "gru"}}
        ),
        normal(4, 2),
        ("models.build",),
    ),
]
