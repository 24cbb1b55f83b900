"""The pre-norm transformer block, written as its equation.

    x = x + dropout(attn(ln1(x)))
    x = x + dropout(mlp(ln2(x)))

    mlp = dense(mlp_ratio * features) -> activation -> dense(features)

Shapes for one example (batch with ``jax.vmap``): ``x`` is ``(seq, features)``
throughout; the MLP's hidden layer is ``(seq, hidden)`` with
``hidden = mlp_ratio * features``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from fnnet._src import checks, errors
from fnnet._src.activations import activation as activation_layer
from fnnet._src.attention import multi_head_attention
from fnnet._src.combinators import serial
from fnnet._src.dense import dense
from fnnet._src.dropout import dropout
from fnnet._src.layer import Layer, composite
from fnnet._src.normalization import layer_norm, rms_norm

_KIND = "transformer_block"
_NORMS = {"layer_norm": layer_norm, "rms_norm": rms_norm}


def transformer_block(
    num_heads: int,
    *,
    mlp_ratio: int | float = 4,
    num_kv_heads: int | None = None,
    causal: bool = False,
    dropout_rate: float = 0.0,
    activation: str | Callable = "gelu",
    rotary: bool = False,
    norm: str = "layer_norm",
    attention_implementation: str | None = None,
) -> Layer:
    """A pre-norm transformer block: self-attention and an MLP, each in a residual.

    ``apply(params, x, *, key=None, train=False, mask=None, length=None, cache=None)``;
    ``mask``, ``length`` and ``cache`` go to the attention (see
    :func:`fnnet.multi_head_attention`), and
    with a ``cache`` the block returns ``(y, new_cache)``. Dropout (in training,
    with a ``key``) acts on each residual branch's output before it is added.

    Args:
      num_heads: attention heads; must divide ``features``.
      mlp_ratio: the MLP's hidden width as a multiple of ``features``.
      num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
      causal: position ``i`` attends only to positions ``<= i`` (a decoder block).
      dropout_rate: probability of dropping an element of each residual branch.
      activation: the MLP's nonlinearity, a name (``"gelu"``, ``"relu"``, ...) or a function.
      rotary: rotary position embeddings in the attention.
      norm: ``"layer_norm"`` or ``"rms_norm"``.
      attention_implementation: ``None``/``"xla"``, or ``"cudnn"`` for the fused
        cuDNN attention kernel on NVIDIA GPUs (see :func:`fnnet.multi_head_attention`).

    Input: ``(seq, features)``. Output: ``(seq, features)``.

    Params: ``{"ln1": {...}, "attn": {"q", "k", "v", "out"}, "ln2": {...},
    "mlp": {"up": {"w": (features, hidden), "b"}, "down": {"w": (hidden, features), "b"}}}``.
    """
    errors.positive_int(num_heads, _KIND, "num_heads")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
        errors.fail(_KIND, f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    dropout_rate = errors.rate(dropout_rate, _KIND, "dropout_rate")
    if norm not in _NORMS:
        errors.fail(_KIND, f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
    act = activation_layer(activation)  # fails here, at construction, on an unknown name
    attn = multi_head_attention(
        num_heads,
        num_kv_heads=num_kv_heads,
        causal=causal,
        rotary=rotary,
        implementation=attention_implementation,
    )
    ln1, ln2 = _NORMS[norm](), _NORMS[norm]()
    drop = dropout(dropout_rate)

    @functools.cache
    def mlp_for(features: int) -> Layer:
        # The hidden width depends on the input's width, known only from the example.
        hidden = int(mlp_ratio * features)
        if hidden < 1:
            errors.fail(
                _KIND, f"mlp_ratio {mlp_ratio} times {features} features leaves no hidden unit"
            )
        return serial(up=dense(hidden), act=act, down=dense(features), kind="mlp")

    def forward(call, x, *, mask=None, length=None, cache=None):  # x: (seq, features)
        checks.sequence(_KIND, x)
        h = call("ln1", ln1, x)
        if cache is None:
            branch = call("attn", attn, h, mask=mask, length=length)
        else:
            branch, cache = call("attn", attn, h, mask=mask, length=length, cache=cache)
        x = x + call("drop_attn", drop, branch).astype(x.dtype)
        branch = call("mlp", mlp_for(x.shape[-1]), call("ln2", ln2, x))  # (seq, features)
        x = x + call("drop_mlp", drop, branch).astype(x.dtype)
        return x if cache is None else (x, cache)

    return composite(forward, _KIND)
