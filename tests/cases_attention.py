"""Conformance cases for attention and the transformer block (seq 5, features 8, heads 2)."""

import numpy as np

import fnnet

from registry import Case, normal

SEQ, FEATURES, HEADS = 5, 8, 2
PADDING = np.array([True, True, True, True, False])  # the last position is padding

CASES = [
    Case(
        "attention",
        lambda: fnnet.multi_head_attention(HEADS),
        normal(SEQ, FEATURES),
        ("multi_head_attention",),
    ),
    Case(
        "attention_causal",
        lambda: fnnet.multi_head_attention(HEADS, causal=True),
        normal(SEQ, FEATURES),
        ("multi_head_attention",),
    ),
    Case(
        "attention_gqa",
        lambda: fnnet.multi_head_attention(4, num_kv_heads=2, causal=True),
        normal(SEQ, FEATURES),
        ("multi_head_attention",),
    ),
    Case(
        "attention_rotary",
        lambda: fnnet.multi_head_attention(HEADS, rotary=True),
        normal(SEQ, FEATURES),
        ("multi_head_attention",),
    ),
    Case(
        "attention_padding_mask",
        lambda: fnnet.multi_head_attention(HEADS),
        normal(SEQ, FEATURES),
        ("multi_head_attention",),
        apply_kwargs={"mask": PADDING},
    ),
    Case(
        "transformer_block",
        lambda: fnnet.transformer_block(HEADS, mlp_ratio=2),
        normal(SEQ, FEATURES),
        ("transformer_block",),
    ),
    Case(
        "transformer_block_causal",
        lambda: fnnet.transformer_block(HEADS, mlp_ratio=2, causal=True, dropout_rate=0.1),
        normal(SEQ, FEATURES),
        ("transformer_block",),
        train=True,
        needs_key=True,
    ),
]
