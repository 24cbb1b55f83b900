"""``fnnet.summary``: what a model is made of and what it costs.

The summary traces the model abstractly (``jax.eval_shape``: no data is touched
and nothing runs), records every child's path, output shape and parameter count
as the combinators call it, and asks XLA's cost analysis for the FLOPs of one
forward and one forward+backward pass on a single example.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from fnnet._src import layer as layer_lib
from fnnet._src.layer import Layer


@dataclasses.dataclass(frozen=True)
class Row:
    """One layer in the summary.

    Attributes:
      path: where the layer sits in the model (``"blocks/block/attn"``); ``""`` is the root.
      kind: the kind of layer (``"dense"``, ``"conv"``, ...).
      shape: the output shape for one example (a tuple, or a pytree of tuples).
      params: the number of parameters of this layer, children included.
    """

    path: str
    kind: str
    shape: Any
    params: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """The result of :func:`summary`; ``str(summary)`` is a table.

    Attributes:
      rows: every layer, in call order, the root first.
      total_params: the number of trainable parameters.
      state_size: the number of non-trainable state entries (BatchNorm statistics).
      forward_flops: XLA's FLOP count for one example's forward pass (None if unavailable).
      train_flops: the same for forward and backward (gradient with respect to params).
    """

    rows: tuple[Row, ...]
    total_params: int
    state_size: int
    forward_flops: float | None
    train_flops: float | None

    def __str__(self) -> str:
        header = ("path", "kind", "output shape", "params")
        body = [
            (r.path or "(model)", r.kind, _shape_str(r.shape), f"{r.params:,}") for r in self.rows
        ]
        widths = [max(len(row[i]) for row in (header, *body)) for i in range(4)]

        def line(cells):
            return "  ".join(
                c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        rule = "-" * len(line(header))
        lines = [line(header), rule, *map(line, body), rule]
        lines.append(f"total params: {self.total_params:,}")
        if self.state_size:
            lines.append(f"state entries: {self.state_size:,}")
        lines.append(f"forward FLOPs (one example): {_flops_str(self.forward_flops)}")
        lines.append(f"forward+backward FLOPs (one example): {_flops_str(self.train_flops)}")
        return "\n".join(lines)


def _count(tree: Any) -> int:
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def _shape_str(shape: Any) -> str:
    return str(shape)  # a tuple, or for several outputs a pytree of tuples


def _flops_str(flops: float | None) -> str:
    return "n/a" if flops is None else f"{flops:,.0f}"


def _flops(fn, *args) -> float | None:
    try:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    if isinstance(cost, list):  # older JAX returned one dict per device
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def summary(model: Layer, x: Any, *, flops: bool = True) -> Summary:
    """Describes ``model`` on one example ``x``: layers, output shapes, sizes, FLOPs.

    Args:
      model: any fnnet layer or model.
      x: one example (an array or a ``jax.ShapeDtypeStruct``); only its shape is read.
      flops: also compile the forward and forward+backward passes to count FLOPs.

    Returns:
      A :class:`Summary`; print it for a table.
    """
    params, state = jax.eval_shape(model.init_with_state, jax.random.key(0), x)
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), x)

    def forward(params, state, x):
        return model.apply_with_state(params, state, x)[0]

    token, log = layer_lib.recording()
    try:
        y = jax.eval_shape(forward, params, state, x)
    finally:
        layer_lib.stop_recording(token)

    def shape_of(out):
        return jax.tree.map(lambda a: tuple(a.shape), out)

    rows = [Row("", model.kind, shape_of(y), _count(params))]
    rows += [Row(path, kind, shape_of(out), _count(p)) for path, kind, p, out in log]

    fwd = train = None
    if flops:
        fwd = _flops(forward, params, state, x)

        def loss(params, state, x):
            out = forward(params, state, x)
            return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(out))

        if jax.tree.leaves(params):
            train = _flops(jax.grad(loss), params, state, x)
    return Summary(tuple(rows), _count(params), _count(state), fwd, train)
