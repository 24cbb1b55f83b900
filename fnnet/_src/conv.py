"""N-dimensional convolution over one channels-last example.

An example is ``(*spatial, channels)``: ``(length, channels)`` in 1D,
``(height, width, channels)`` in 2D. The kernel is ``(*kernel, channels // groups,
features)``, the layout ``jax.lax`` calls WIO / HWIO and ``flax.linen.Conv`` uses,
so weights copy across unchanged.

Padding is resolved to explicit ``(lo, hi)`` pairs in Python before calling
``lax``, so every mode (including ``"CAUSAL"`` and PyTorch-style integers) goes
through one code path and the "kernel larger than the input" check sees the real
padded size. The pooling layers reuse these helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from fnnet._src import errors
from fnnet._src.layer import Layer

Padding = str | int | Sequence[int | tuple[int, int]]


# --- Hyperparameter helpers (shared with pooling) -----------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def spatial_tuple(value, ndim: int | None, kind: str, field: str) -> tuple[int, ...] | int:
    """Validates an int-or-tuple of positive ints; expands an int when ``ndim`` is known.

    Returns the bare int when ``ndim`` is still unknown (it is inferred from the
    example's rank in ``init``).
    """
    if _is_int(value):
        if value <= 0:
            errors.fail(kind, f"{field} must be positive, got {value!r}")
        return value if ndim is None else (value,) * ndim
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if not items or not all(_is_int(v) and v > 0 for v in items):
            errors.fail(kind, f"{field} must be a positive int or a tuple of them, got {value!r}")
        if ndim is not None and len(items) != ndim:
            errors.fail(
                kind, f"{field} must have {ndim} entries (one per spatial axis), got {value!r}"
            )
        return items
    errors.fail(kind, f"{field} must be a positive int or a tuple of them, got {value!r}")


def expand(value: tuple[int, ...] | int, ndim: int, kind: str, field: str) -> tuple[int, ...]:
    """An int-or-tuple validated by :func:`spatial_tuple`, as a tuple of ``ndim`` ints."""
    if _is_int(value):
        return (value,) * ndim
    if len(value) != ndim:
        errors.fail(
            kind,
            f"{field} {value!r} has {len(value)} entries but the input has {ndim} spatial axes",
        )
    return value


def check_padding(padding: Padding, ndim: int | None, kind: str, allowed: tuple[str, ...]):
    """Validates a padding spec at construction time; returns it normalized.

    Strings are upper-cased; an int stays an int; a sequence becomes a tuple of
    ``(lo, hi)`` pairs (a bare int entry pads both sides of that axis equally).
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in allowed:
            errors.fail(
                kind,
                f"padding must be one of {list(allowed)}, an int or (lo, hi) pairs, "
                f"got {padding!r}",
            )
        if mode == "CAUSAL" and ndim not in (None, 1):
            errors.fail(kind, f"padding 'CAUSAL' needs one spatial axis, got {ndim}")
        return mode
    if _is_int(padding):
        if padding < 0:
            errors.fail(kind, f"padding must be non-negative, got {padding!r}")
        return padding
    if isinstance(padding, Sequence):
        pairs = []
        for p in padding:
            pair = (p, p) if _is_int(p) else tuple(p) if isinstance(p, Sequence) else None
            if pair is None or len(pair) != 2 or not all(_is_int(v) and v >= 0 for v in pair):
                errors.fail(
                    kind,
                    f"padding entries must be non-negative ints or (lo, hi) pairs, got {padding!r}",
                )
            pairs.append(pair)
        if ndim is not None and len(pairs) != ndim:
            errors.fail(
                kind, f"padding must have {ndim} entries (one per spatial axis), got {padding!r}"
            )
        return tuple(pairs)
    errors.fail(kind, f"padding must be a string, an int or (lo, hi) pairs, got {padding!r}")


def resolve_padding(
    padding, spatial: Sequence[int], window: Sequence[int], strides: Sequence[int], kind: str
) -> list[tuple[int, int]]:
    """Explicit ``(lo, hi)`` pairs for each spatial axis.

    ``window`` is the effective (dilated) window size. ``"SAME"`` follows
    ``lax``/TensorFlow: output size ``ceil(n / stride)``, odd padding extra on the
    high side. ``"CAUSAL"`` pads only the low side, so output ``t`` sees inputs up
    to ``t``.
    """
    ndim = len(spatial)
    if padding == "VALID":
        return [(0, 0)] * ndim
    if padding == "SAME":
        pads = []
        for n, k, s in zip(spatial, window, strides, strict=True):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return pads
    if padding == "CAUSAL":
        if ndim != 1:
            errors.fail(kind, f"padding 'CAUSAL' needs one spatial axis, got {ndim}")
        return [(window[0] - 1, 0)]
    if _is_int(padding):
        return [(padding, padding)] * ndim
    if len(padding) != ndim:
        errors.fail(
            kind, f"padding has {len(padding)} entries but the input has {ndim} spatial axes"
        )
    return list(padding)


def check_window_fits(
    kind: str, shape: Sequence[int], window: Sequence[int], pads: Sequence[tuple[int, int]]
) -> None:
    """Fails when a (dilated) window is larger than the padded input along some axis."""
    for axis, (n, k, (lo, hi)) in enumerate(zip(shape, window, pads, strict=True)):
        if k > n + lo + hi:
            errors.fail(
                kind,
                f"window of size {k} on spatial axis {axis} is larger than the padded input "
                f"({n} + padding {lo}+{hi}) (input shape {tuple(shape)}); use smaller kernels, "
                "more padding or a larger input",
            )


# --- The convolution layer ------------------------------------------------------


def _dimension_numbers(ndim: int) -> jax.lax.ConvDimensionNumbers:
    # Channels-last for any number of spatial axes: lhs (N, *spatial, C),
    # rhs (*spatial, I, O), out (N, *spatial, C). Specs list (batch/out, feature/in, *spatial).
    spatial = tuple(range(1, ndim + 1))
    return jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim + 1, *spatial),
        rhs_spec=(ndim + 1, ndim, *range(ndim)),
        out_spec=(0, ndim + 1, *spatial),
    )


def _make_conv(
    kind: str,
    ndim: int | None,
    features: int,
    kernel_size,
    strides,
    padding: Padding,
    dilation,
    groups: int,
    use_bias: bool,
    w_init: Callable | None,
    b_init: Callable | None,
    param_dtype,
) -> Layer:
    errors.positive_int(features, kind, "features")
    errors.positive_int(groups, kind, "groups")
    if ndim is None and not _is_int(kernel_size):
        ndim = len(kernel_size) if isinstance(kernel_size, Sequence) else None
    kernel_size = spatial_tuple(kernel_size, ndim, kind, "kernel_size")
    strides = spatial_tuple(strides, ndim, kind, "strides")
    dilation = spatial_tuple(dilation, ndim, kind, "dilation")
    padding = check_padding(padding, ndim, kind, ("SAME", "VALID", "CAUSAL"))
    if features % groups:
        errors.fail(kind, f"features ({features}) must be divisible by groups ({groups})")
    w_init = jax.nn.initializers.lecun_normal() if w_init is None else w_init
    b_init = jax.nn.initializers.zeros if b_init is None else b_init

    def geometry(shape, n):
        """Static checks of an input shape against ``n`` spatial axes; returns padding."""
        if len(shape) != n + 1:
            names = {1: "(length, channels)", 2: "(height, width, channels)"}
            want = names.get(n, f"{n} spatial axes and channels")
            errors.fail(
                kind,
                f"expected one example {want} of rank {n + 1}, got shape "
                f"{tuple(shape)} (batch with jax.vmap)",
            )
        k = expand(kernel_size, n, kind, "kernel_size")
        s = expand(strides, n, kind, "strides")
        d = expand(dilation, n, kind, "dilation")
        window = [d_ * (k_ - 1) + 1 for k_, d_ in zip(k, d, strict=True)]
        pads = resolve_padding(padding, shape[:-1], window, s, kind)
        check_window_fits(kind, shape[:-1], window, pads)
        return k, s, d, pads

    def init(key, x):
        n = ndim if ndim is not None else len(x.shape) - 1
        if n < 1:
            errors.fail(
                kind,
                f"expected an input (*spatial, channels) with at least one "
                f"spatial axis, got shape {tuple(x.shape)}",
            )
        k, _, _, _ = geometry(x.shape, n)
        channels = x.shape[-1]
        if channels % groups:
            errors.fail(
                kind,
                f"input channels ({channels}) must be divisible by groups "
                f"({groups}) (input shape {tuple(x.shape)})",
            )
        w_key, b_key = jax.random.split(key)
        params = {"w": w_init(w_key, (*k, channels // groups, features), param_dtype)}
        if use_bias:
            params["b"] = b_init(b_key, (features,), param_dtype)
        return params

    def apply(params, x, *, key=None, train=False):
        del key, train
        w = params["w"]  # (*kernel, channels // groups, features)
        n = w.ndim - 2
        _, s, d, pads = geometry(x.shape, n)
        if x.shape[-1] != w.shape[-2] * groups:
            errors.fail(
                kind,
                f"expected input with last dimension {w.shape[-2] * groups}, "
                f"got {x.shape[-1]} (input shape {tuple(x.shape)})",
            )
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else w.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dtype)[None],  # (1, *spatial, channels): lax wants a batch axis
            w.astype(dtype),
            window_strides=s,
            padding=pads,
            rhs_dilation=d,
            dimension_numbers=_dimension_numbers(n),
            feature_group_count=groups,
        )[0]  # (*out_spatial, features)
        if use_bias:
            y = y + params["b"].astype(dtype).reshape((1,) * n + (features,))
        return y

    return Layer(init, apply, kind)


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: Callable | None = None,
    b_init: Callable | None = None,
    param_dtype=jnp.float32,
) -> Layer:
    """An N-dimensional convolution of one channels-last example.

    The number of spatial axes is ``len(kernel_size)`` when it is a tuple, else the
    example's rank minus one.

    Args:
      features: output channels.
      kernel_size: window size, an int (same on every axis) or one per spatial axis.
      strides: step between windows, an int or one per spatial axis.
      padding: ``"SAME"`` (output size ``ceil(n / stride)``), ``"VALID"`` (no padding),
        ``"CAUSAL"`` (1D only: ``dilation * (kernel_size - 1)`` zeros on the left, so
        output ``t`` sees inputs up to ``t``), an int (PyTorch-style: that many zeros
        on both sides of every axis) or a sequence with one int or ``(lo, hi)`` pair
        per spatial axis.
      dilation: spacing between kernel taps (atrous convolution).
      groups: split channels into this many independent groups; ``channels`` and
        ``features`` must both be divisible by it (``groups == channels`` is a
        depthwise convolution).
      use_bias: add a learned bias.
      w_init: ``init(key, shape, dtype)`` for the kernel (default LeCun normal).
      b_init: the same for the bias (default zeros).
      param_dtype: dtype of the parameters.

    Input: ``(*spatial, channels)``, e.g. ``(length, channels)`` or
    ``(height, width, channels)``. Output: ``(*out_spatial, features)``.
    Params: ``{"w": (*kernel_size, channels // groups, features), "b": (features,)}``.
    """
    return _make_conv(
        "conv",
        None,
        features,
        kernel_size,
        strides,
        padding,
        dilation,
        groups,
        use_bias,
        w_init,
        b_init,
        param_dtype,
    )


def conv1d(
    features: int,
    kernel_size: int,
    *,
    strides: int = 1,
    padding: Padding = "SAME",
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: Callable | None = None,
    b_init: Callable | None = None,
    param_dtype=jnp.float32,
) -> Layer:
    """A 1D convolution: :func:`conv` with one spatial axis (see it for the arguments).

    Input: ``(length, channels)``. Output: ``(out_length, features)``.
    Params: ``{"w": (kernel_size, channels // groups, features), "b": (features,)}``.
    """
    return _make_conv(
        "conv1d",
        1,
        features,
        kernel_size,
        strides,
        padding,
        dilation,
        groups,
        use_bias,
        w_init,
        b_init,
        param_dtype,
    )


def conv2d(
    features: int,
    kernel_size: int | tuple[int, int],
    *,
    strides: int | tuple[int, int] = 1,
    padding: Padding = "SAME",
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    use_bias: bool = True,
    w_init: Callable | None = None,
    b_init: Callable | None = None,
    param_dtype=jnp.float32,
) -> Layer:
    """A 2D convolution: :func:`conv` with two spatial axes (see it for the arguments).

    Input: ``(height, width, channels)``. Output: ``(out_height, out_width, features)``.
    Params: ``{"w": (kh, kw, channels // groups, features), "b": (features,)}``.
    """
    return _make_conv(
        "conv2d",
        2,
        features,
        kernel_size,
        strides,
        padding,
        dilation,
        groups,
        use_bias,
        w_init,
        b_init,
        param_dtype,
    )
