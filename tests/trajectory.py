"""Comparing two runs of one training trajectory whose float32 reduction orders differ."""
import jax
import numpy as np


def assert_same_trajectory(params, reference, start, rel=1e-3):
    """`params` and `reference` are the same training run up to float32 reduction order.

    Sharded and single-device steps sum gradients in different orders (and CPUs with and without
    AVX-512 vectorise differently), so gradients agree to ~1e-6 relative. Adam divides each moment
    by its own scale: an element whose gradient is at the rounding level gets an O(1)·lr step whose
    sign rounding decides, so an element-wise tolerance cannot hold on every CPU. What does hold is
    that such elements are rare: per parameter array, the difference is tiny against the distance
    the run travelled, ||params - reference|| <= rel * ||reference - start||.
    """
    for (path, a), b, s in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0],
                               jax.tree.leaves(jax.device_get(reference)), jax.tree.leaves(jax.device_get(start))):
        a, b, s = (np.asarray(x, np.float64) for x in (a, b, s))
        travelled = np.linalg.norm(b - s)
        assert travelled > 0, f"{jax.tree_util.keystr(path)} did not move"
        assert np.linalg.norm(a - b) <= rel * travelled, (jax.tree_util.keystr(path), np.linalg.norm(a - b), travelled)
