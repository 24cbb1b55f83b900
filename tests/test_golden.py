"""Golden snapshots of every registered layer's and model's parameter structure.

``tests/golden/params.json`` records, for each case in the registry, every
parameter (and state) path with its shape and dtype, and the total count. An
accidental rename or resize fails here and shows up in review as a diff of that
file. After an intended change, regenerate it with

    make golden
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest

from registry import CASES

GOLDEN = pathlib.Path(__file__).parent / "golden" / "params.json"
UPDATE = os.environ.get("FNNET_UPDATE_GOLDEN") == "1"


def _structure(case) -> dict:
    layer = case.make()
    x = case.example(np.random.default_rng(0))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    params, state = jax.eval_shape(layer.init_with_state, jax.random.key(0), abstract)

    def flat(tree):  # {"attn/q/w": "float32[8,2,4]", ...}
        return {
            jax.tree_util.keystr(path, simple=True, separator="/"): (
                f"{leaf.dtype}[{','.join(map(str, leaf.shape))}]"
            )
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    out = {"count": count, "params": flat(params)}
    if jax.tree.leaves(state):
        out["state"] = flat(state)
    return out


@pytest.fixture(scope="module")
def golden():
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        snapshot = {c.name: _structure(c) for c in CASES}
        GOLDEN.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    assert GOLDEN.exists(), f"{GOLDEN} is missing; create it with FNNET_UPDATE_GOLDEN=1"
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parameter_structure_matches_golden(case, golden):
    assert case.name in golden, f"no golden entry for {case.name}; regenerate (see module doc)"
    assert _structure(case) == golden[case.name]


def test_no_stale_golden_entries(golden):
    stale = sorted(set(golden) - {c.name for c in CASES})
    assert not stale, f"golden entries without a registry case: {stale}"
