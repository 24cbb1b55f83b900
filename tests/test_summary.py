"""fnnet.summary: every layer listed with its path, shape and size; FLOPs from XLA."""

import jax
import jax.numpy as jnp

import fnnet


def test_summary_lists_every_layer_with_shapes_and_counts():
    model = fnnet.serial(hidden=fnnet.dense(8), act=fnnet.relu(), out=fnnet.dense(3))
    s = fnnet.summary(model, jnp.zeros(5))
    rows = {r.path: r for r in s.rows}
    assert list(rows) == ["", "hidden", "act", "out"]
    assert rows["hidden"].shape == (8,) and rows["hidden"].params == 5 * 8 + 8
    assert rows["out"].params == 8 * 3 + 3
    assert rows[""].params == s.total_params == 48 + 27
    # forward: two matmuls (2*m*n each) + biases + relu; backward costs more than forward
    assert s.forward_flops >= 2 * (5 * 8 + 8 * 3)
    assert s.train_flops > s.forward_flops
    text = str(s)
    assert "hidden" in text and "total params: 75" in text


def test_summary_shows_nested_and_repeated_blocks():
    lm = fnnet.models.transformer_lm(13, features=8, depth=3, num_heads=2, max_len=8)
    s = fnnet.summary(lm, jax.ShapeDtypeStruct((6,), jnp.int32))
    paths = [r.path for r in s.rows]
    assert "blocks" in paths and "blocks/block" in paths
    assert any(p.startswith("blocks/block/attn") for p in paths)
    by_path = {r.path: r for r in s.rows}
    assert by_path["blocks"].params == 3 * by_path["blocks/block"].params
    assert by_path[""].shape == (6, 13)


def test_summary_counts_state_separately():
    model = fnnet.serial(lin=fnnet.dense(4), norm=fnnet.batch_norm())
    s = fnnet.summary(model, jnp.zeros(3), flops=False)
    assert s.state_size == 8 and s.total_params == 3 * 4 + 4 + 8
    assert s.forward_flops is None
