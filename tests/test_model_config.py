"""Shipped models remember their arguments, and build() rebuilds them exactly."""

import jax
import numpy as np
import pytest

import fnnet
from fnnet.models import config_of

from registry import CASES

MODEL_CASES = [c for c in CASES if c.name.startswith("models.")]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.name)
def test_build_from_config_gives_the_same_model(case):
    model = case.make()
    config = fnnet.models.config_of(model)
    assert config is not None
    rebuilt = fnnet.models.build(config)
    assert config_of(rebuilt) == config_of(model)
    x = case.example(np.random.default_rng(0))
    a = jax.eval_shape(model.init_with_state, jax.random.key(0), x)
    b = jax.eval_shape(rebuilt.init_with_state, jax.random.key(0), x)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), a) == jax.tree.map(
        lambda s: (s.shape, s.dtype), b
    )


def test_models_with_unserializable_arguments_have_no_config():
    assert config_of(fnnet.models.mlp(3, activation=jax.nn.tanh)) is None
    assert config_of(fnnet.models.mlp(3, activation="tanh")) is not None


def test_build_rejects_bad_configs():
    with pytest.raises(fnnet.LayerError, match=r"unknown model 'resnet'; expected one of \["):
        fnnet.models.build({"model": "resnet", "kwargs": {}})
    with pytest.raises(fnnet.LayerError, match="arguments do not fit mlp"):
        fnnet.models.build({"model": "mlp", "kwargs": {"out_features": 3, "depth": 2}})
    with pytest.raises(fnnet.LayerError, match="expected"):
        fnnet.models.build({"name": "mlp"})
