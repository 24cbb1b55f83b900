"""The checkpoint's survey of its arrays: digests and non-finite counts on any sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fnnet import train
from fnnet.train import _digest

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _split(x: np.ndarray) -> jax.Array:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_nan_and_infinity_is_counted_in_whichever_shard_it_lies(dtype):
    # A max over a split array drops NaN on the CPU; the survey must not.
    for position in range(0, 64, 8):  # one element of each of the 8 shards
        for bad, want in ((np.nan, (1, 0)), (np.inf, (0, 1)), (-np.inf, (0, 1))):
            x = np.ones(64, dtype)
            x[position] = bad
            assert _digest.survey([_split(x)])[0][1:] == want, (position, bad)
            assert _digest.survey([x])[0][1:] == want, (position, bad)


def test_a_finite_leaf_whose_sum_overflows_is_finite():
    for x in (np.full(4096, 6e4, np.float16), np.full(64, 3e38, np.float32)):
        assert _digest.survey([_split(x), jnp.asarray(x)]) == 2 * [(_digest.survey([x])[0])]
        assert _digest.survey([x])[0][1:] == (0, 0)


@pytest.mark.parametrize("dtype", [*DTYPES, jnp.int8, jnp.uint32, jnp.bool_], ids=str)
def test_the_digest_is_the_same_on_the_host_on_one_device_and_split(dtype, rng):
    x = rng.standard_normal((16, 24)).astype(dtype)
    on_host = _digest.survey([x])
    assert _digest.survey([jnp.asarray(x)]) == on_host
    assert _digest.survey([_split(x)]) == on_host
    x[3, 5] = (x[3, 5] + 1).astype(dtype) if dtype != jnp.bool_ else not x[3, 5]
    assert _digest.survey([_split(x)])[0][0] != on_host[0][0]


def test_the_temporaries_of_a_leaf_are_one_word_per_element_it_holds():
    # On the CPU XLA writes out each reduction's input: one program over a state
    # held a word and two int32 flags per element of every leaf at once.
    x = _split(np.ones((1024, 512), np.float32))
    stats = _digest._on_device.lower(x).compile().memory_analysis()
    assert stats.temp_size_in_bytes <= 1.1 * x.addressable_shards[0].data.nbytes, stats


def test_complex_leaves_have_a_digest_and_round_trip(tmp_path, rng):
    x = (rng.standard_normal((8, 3)) + 1j * rng.standard_normal((8, 3))).astype(np.complex64)
    on_host = _digest.survey([x])
    assert _digest.survey([jnp.asarray(x)]) == on_host == _digest.survey([_split(x)])
    y = x.copy()
    y[2, 1] = complex(y[2, 1].real, -y[2, 1].imag)  # the imaginary part alone changed
    assert _digest.survey([y])[0][0] != on_host[0][0]
    store = train.CheckpointStore(tmp_path)
    store.save(1, {"z": jnp.asarray(x), "w": np.complex128(1 + 2j)}, metadata={})
    back, _ = store.restore(1)
    np.testing.assert_array_equal(back["z"], x)
    assert back["w"] == np.complex128(1 + 2j) and back["w"].dtype == np.complex128
