"""The conformance registry: one entry per public layer and model.

Every entry is run through the same checks in ``test_conformance.py``. Each layer
family keeps its cases in its own ``tests/cases_*.py`` module as a list ``CASES``;
``test_registry_covers_public_layers`` fails when a public layer factory is
covered by no case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

import fnnet


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer configuration and an example input.

    Attributes:
      name: unique id shown by pytest.
      make: builds the layer (called inside the test, so construction is tested too).
      example: builds one example input from a seeded ``np.random.Generator``.
      covers: the public ``fnnet`` names (e.g. ``"dense"``, ``"models.mlp"``) this case exercises.
      train: apply in training mode (a key is passed when ``needs_key``).
      needs_key: the layer draws random numbers in training mode.
      differentiable: gradients with respect to params are checked for finiteness.
      apply_kwargs: extra keyword arguments for ``apply`` (masks, lengths).
      vmap_axis_name: name of the vmapped batch axis (BatchNorm's cross-example statistics).
      tol: tolerance for jit-vs-eager and vmap-vs-loop comparisons.
      reference: optionally ``reference(params, x) -> y``, an independent computation
        (NumPy, or written out by hand) that ``apply`` must equal, on one example.
    """

    name: str
    make: Callable[[], fnnet.Layer]
    example: Callable[[np.random.Generator], Any]
    covers: tuple[str, ...]
    train: bool = False
    needs_key: bool = False
    differentiable: bool = True
    apply_kwargs: dict = dataclasses.field(default_factory=dict)
    vmap_axis_name: str | None = None
    tol: float = 1e-5
    reference: Callable[[Any, Any], Any] | None = None


def normal(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """An example builder: float32 standard-normal data of ``shape``."""
    return lambda rng: rng.standard_normal(shape).astype(np.float32)


def integers(high: int, *shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """An example builder: int32 ids in ``[0, high)`` of ``shape``."""
    return lambda rng: rng.integers(0, high, shape).astype(np.int32)


def all_cases() -> list[Case]:
    import importlib
    import pathlib

    cases: list[Case] = []
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        module = importlib.import_module(path.stem)
        cases.extend(module.CASES)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), f"duplicate case names: {names}"
    return cases


CASES: list[Case] = all_cases()
