"""A grain iterator is a source for fit, and its state resumes exactly (needs fnnet[grain])."""

import grain
import jax
import numpy as np
import optax

import fnnet
from fnnet import train


def _loader(x, y, batch_size):
    dataset = (
        grain.MapDataset.range(len(y))
        .shuffle(seed=0)
        .map(lambda i: (x[i], y[i]))
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )
    return iter(dataset.to_iter_dataset())


def test_a_grain_iterator_trains_and_resumes_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)

    def fit(steps, **kwargs):
        return train.fit(
            fnnet.models.mlp(2, (16,)), optax.adam(1e-2), train.softmax_cross_entropy,
            _loader(x, y, 16), steps=steps, batch_size=16, mesh=None, progress=False, **kwargs,
        )  # fmt: skip

    unbroken = fit(14)
    fit(9, checkpoint=tmp_path)
    assert train.load_metadata(tmp_path)["loop"]["data"]["states"] == [{"next_index": 9}]
    resumed = fit(14, checkpoint=tmp_path)
    assert resumed.resumed_from == 9
    for a, b in zip(jax.tree.leaves(unbroken.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(a, b)
