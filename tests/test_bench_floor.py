"""bench.floor's per-model floors differentiate the models' products (never their speed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import floor, train


@pytest.mark.parametrize("model", floor.MODELS)
def test_the_floor_differentiates_every_weight_matrix(model, rng):
    x = jnp.asarray(train.model_input(model, rng.standard_normal((4, 40)).astype(np.float32)))
    params = train._fnnet_model(model).init(jax.random.key(0), x[0])
    weights = floor._product_weights(model, params)
    # Every matrix and kernel of the model, and nothing else (no bias, norm or table):
    matrices = [a for path, a in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "w"]
    assert sum(a.size for a in jax.tree.leaves(weights)) == sum(a.size for a in matrices)
    assert floor.PRODUCTS[model](weights, x).shape == (4, 10)  # the logits' shape
    new, out = floor._floor_step(model)(weights, (x, None))
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, weights)
    assert np.isfinite(out) and abs(out) > 1e-6  # neither overflowed nor vanished
    # Every weight gets a gradient (a product left out would leave its weight at zero).
    out, pullback = jax.vjp(lambda w: floor.PRODUCTS[model](w, x), weights)
    (grads,) = pullback(out)
    reached = jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g)) and jnp.any(g != 0)), grads)
    assert all(jax.tree.leaves(reached)), reached
