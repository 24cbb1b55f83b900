"""What the training API checks of its inputs before any work: fields, labels, params.

* :func:`split_inputs`: an example may be a dict; its ``"x"`` is the model's
  positional input and every other entry a keyword input (``lengths``, ``mask``).
* :func:`check_labels`: integer class labels must lie in ``[0, classes)``.
* :func:`check_params`: a params tree must have exactly the model's paths and shapes.

Each raises with the argument's name, what came and what would work.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fnnet._src.layer import Layer
from fnnet.train._losses import LabelError


class ParamsError(ValueError):
    """A params tree that is not the model's: a missing or extra entry, a wrong shape."""


def split_inputs(model: Layer, x: Any, *, where: str = "x") -> tuple[Any, dict[str, Any]]:
    """One example (or a batch) as ``(positional, keyword inputs)`` for ``model``.

    An array (or any non-dict pytree) is the positional input and there are no
    keywords. A dict must hold ``"x"``, the positional input; its other entries
    are passed to the model by name, e.g. ``{"x": tokens, "lengths": lengths}``
    becomes ``model.apply(params, tokens, lengths=lengths)``.

    Raises:
      ValueError: a dict without ``"x"``, naming ``where`` and the keys it has.
    """
    del model  # every fnnet layer takes its keyword inputs by name
    if not isinstance(x, Mapping):
        return x, {}
    if "x" not in x:
        raise ValueError(
            f"{where}: a dict of inputs needs the key 'x' (the model's positional input; "
            f"the other keys are keyword inputs such as 'lengths'), got keys {sorted(x)}"
        )
    return x["x"], {k: v for k, v in x.items() if k != "x"}


def init_inputs(model: Layer, inputs: dict[str, Any]) -> dict[str, Any]:
    """The keyword inputs ``model.init`` takes: the parameters of most layers depend
    on ``x`` alone (``lengths`` or ``mask`` change no shape), a few on more (cross
    attention's ``context``). ``apply`` gets every input, and refuses unknown ones."""
    try:
        parameters = inspect.signature(model.init).parameters.values()
    except (TypeError, ValueError):
        return dict(inputs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(inputs)
    names = {p.name for p in parameters}
    return {k: v for k, v in inputs.items() if k in names}


def init_example(model: Layer, key: jax.Array, example: Any, *, where: str = "example"):
    """``model.init_with_state`` for one example that may be a dict of inputs."""
    positional, inputs = split_inputs(model, example, where=where)
    return model.init_with_state(key, positional, **init_inputs(model, inputs))


def output_shape(model: Layer, example: Any, *, where: str) -> Any:
    """The shape structure of ``model``'s output for one ``example``, without running it.

    An example the model cannot take (an unknown keyword input, a wrong shape)
    is a ValueError naming ``where``.
    """
    positional, inputs = split_inputs(model, example, where=where)

    def forward():
        params, state = init_example(model, jax.random.key(0), example, where=where)
        return model.apply_with_state(params, state, positional, **inputs)[0]

    try:
        return jax.eval_shape(forward)
    except TypeError as error:
        if "keyword" not in str(error):
            raise
        raise ValueError(
            f"{where}: the model ({model.kind}) does not take the keyword inputs "
            f"{sorted(inputs)} given beside 'x' ({error})"
        ) from error


def check_labels(model: Layer, example: Any, y: Any, *, where: str = "train_data") -> None:
    """Integer class labels must lie in ``[0, classes)`` of ``model``'s output.

    The check applies when ``y`` is an integer array and one example's output
    is ``(..., classes)`` with one label per leading position (``y[i]`` of shape
    ``output.shape[:-1]``): a classifier, or a per-step classifier over a
    sequence. Any other pairing (float targets, a regression head) is left to
    the loss.

    Raises:
      LabelError: naming the first offending value and its index in ``where``.
    """
    if isinstance(y, Mapping) or len(jax.tree.leaves(y)) != 1:
        return
    labels = jax.tree.leaves(y)[0]
    if not jnp.issubdtype(labels.dtype, jnp.integer) or np.ndim(labels) == 0:
        return
    out = output_shape(model, example, where=where)
    if not hasattr(out, "shape") or len(out.shape) == 0:
        return
    classes = out.shape[-1]
    if tuple(np.shape(labels)[1:]) != tuple(out.shape[:-1]):
        return
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= classes)
    if not bad.any():
        return
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    at = index[0] if len(index) == 1 else index
    raise LabelError(
        where,
        f"label {int(labels[index])} at index {at} is outside [0, {classes}): the "
        f"model has {classes} outputs per example ({int(bad.sum())} label(s) in all are out "
        "of range)",
    )


def check_params(model: Layer, params: Any, example: Any, *, where: str = "params") -> None:
    """``params`` must have exactly the paths and shapes ``model.init`` gives for ``example``
    (arrays, or ``jax.ShapeDtypeStruct`` leaves).

    Raises:
      ParamsError: naming the missing, extra or mis-shaped entries.
    """
    want = jax.eval_shape(lambda ex: init_example(model, jax.random.key(0), ex), example)[0]

    def flat(tree):
        return {
            jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    have, need = flat(params), flat(want)
    missing = sorted(set(need) - set(have))
    extra = sorted(set(have) - set(need))
    shapes = [f"{p}: {have[p]} given, {need[p]} expected" for p in sorted(set(have) & set(need))
              if have[p] != need[p]]  # fmt: skip
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        parts.append(f"not in the model {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    if shapes:
        parts.append("shapes differ: " + "; ".join(shapes[:8]))
    raise ParamsError(
        f"{where}: not the parameters of this model ({model.kind}): "
        + "; ".join(parts)
        + ". Use the params of model.init (or of fit's result) for this model."
    )
