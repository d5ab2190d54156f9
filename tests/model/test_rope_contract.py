"""Position-seam contract, for every RopeSpec transform of `jaxllm.model.rope`:
- the spec is hashable and works as a static jit argument (an equal spec rebuilt from scratch hits
  the compiled program instead of recompiling);
- it survives the HF round trip (`to_hf` → `from_hf`) field for field;
- where the method promises identity below the original window (dynamic NTK; entropy-aware ABF
  relative to ABF), rotations and query scales there equal the untransformed ones exactly.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import rope

K, WINDOW = 32, 64
PLAIN = rope.default(K, 10_000.0)

TRANSFORMS = {  # name -> spec built from PLAIN
    "default": lambda: rope.default(K, 10_000.0),
    "linear": lambda: rope.linear(PLAIN, 4.0),
    "ntk": lambda: rope.ntk(PLAIN, 4.0),
    "dynamic_ntk": lambda: rope.dynamic_ntk(PLAIN, 4.0, WINDOW),
    "yarn": lambda: rope.yarn(PLAIN, 4.0, WINDOW),
    "llama3": lambda: rope.llama3(PLAIN, 4.0, original_max_position=WINDOW),
    "abf": lambda: rope.abf(PLAIN, 500_000.0),
    "entropy_aware_abf": lambda: rope.entropy_aware_abf(PLAIN, 500_000.0, WINDOW, (0, 1)),
}


def test_every_transform_of_the_module_is_covered():
    public = {name for name, fn in inspect.getmembers(rope, inspect.isfunction)
              if fn.__module__ == rope.__name__ and not name.startswith("_")
              and inspect.signature(fn).return_annotation in ("RopeSpec", rope.RopeSpec)}
    assert public - {"from_hf"} == set(TRANSFORMS)


def _inputs(T=WINDOW, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(2, T, 3, K)), jnp.float32), jnp.asarray(
        np.stack([np.arange(T), rng.permutation(T)]), jnp.int32)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_spec_is_a_static_jit_argument(name):
    spec, again = TRANSFORMS[name](), TRANSFORMS[name]()
    assert spec is not again and spec == again and hash(spec) == hash(again)
    x, positions = _inputs(T=2 * WINDOW)

    def rotate_and_scale(x, positions, spec):
        return rope.apply(x, positions, spec), rope.query_scale(positions, spec, 2)

    jitted = jax.jit(rotate_and_scale, static_argnums=2)
    first = jitted(x, positions, spec)
    second = jitted(x, positions, again)
    assert jitted._cache_size() == 1
    eager = rotate_and_scale(x, positions, spec)
    for a, b, c in zip(first, second, eager):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-4)  # XLA fuses pow/sin differently under jit


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_hf_round_trip(name):
    spec = TRANSFORMS[name]()
    back = rope.from_hf({**rope.to_hf(spec), "head_dim": K, "max_position_embeddings": WINDOW})
    for field in ("head_dim", "inv_freq", "logit_scale", "unscaled_layers", "dynamic"):
        assert getattr(back, field) == getattr(spec, field), field
    assert rope.to_hf(back) == rope.to_hf(spec)


IDENTITY_BELOW_WINDOW = {  # transform -> the spec it must equal at positions < WINDOW
    "dynamic_ntk": lambda: PLAIN,
    "entropy_aware_abf": lambda: rope.abf(PLAIN, 500_000.0),
}


@pytest.mark.parametrize("name", sorted(IDENTITY_BELOW_WINDOW))
def test_identity_below_the_original_window(name):
    spec, reference = TRANSFORMS[name](), IDENTITY_BELOW_WINDOW[name]()
    x, positions = _inputs(T=WINDOW)  # every position < WINDOW
    np.testing.assert_array_equal(rope.apply(x, positions, spec), rope.apply(x, positions, reference))
    for layer in range(4):
        np.testing.assert_array_equal(rope.query_scale(positions, spec, layer),
                                      rope.query_scale(positions, reference, layer))
    far = jnp.asarray([[4 * WINDOW]], jnp.int32)  # and the promise ends past the window
    assert (not np.array_equal(rope.apply(x[:1, :1], far, spec), rope.apply(x[:1, :1], far, reference))
            or float(rope.query_scale(far, spec, 2)[0, 0]) != float(rope.query_scale(far, reference, 2)[0, 0]))
