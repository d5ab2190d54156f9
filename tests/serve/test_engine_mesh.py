"""The engine on a `tensor` mesh of fake CPU devices produces the single-device engine's greedy
tokens, with kv heads split (tensor:2) and repeated so that each shard holds one (tensor:4,
tensor:8 over 2 kv heads)."""
import jax
import numpy as np
import pytest

from jaxllm.model import llama, presets
from jaxllm.parallel import make_mesh
from jaxllm.serve import Engine, SamplingParams

CFG = presets.get("tiny", n_heads=8, n_kv_heads=2)  # 8 query heads of dim 8, 2 kv heads
PARAMS = llama.init_params(CFG, jax.random.key(3))
ENGINE = dict(block_size=4, num_blocks=64, max_seqs=8, token_budget=32, buckets=(32,), context_buckets=())
PROMPTS = [[int(t) for t in np.random.default_rng(s).integers(0, CFG.vocab_size, n)] for s, n in
           ((0, 5), (1, 23), (2, 12), (3, 40))]
SAMPLING = SamplingParams(max_tokens=10)


@pytest.fixture(scope="module")
def single_device_tokens():
    return [c.tokens for c in Engine(CFG, PARAMS, **ENGINE).generate(PROMPTS, SAMPLING)]


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_sharded_engine_greedy_equals_single_device(single_device_tokens, tensor):
    mesh = make_mesh(f"tensor:{tensor}", jax.devices()[:tensor])
    engine = Engine(CFG, PARAMS, mesh=mesh, **ENGINE)
    q = engine.params["layers_0"]["attn"]["q"]
    assert q.sharding.shard_shape(q.shape) == (64, 8 // tensor, 8)  # heads split over the shards
    pool = engine._pools[0].k
    assert pool.shape[3] == tensor and pool.sharding.shard_shape(pool.shape)[3] == 1  # one kv head per shard
    k = engine.params["layers_0"]["attn"]["k"]
    assert k.shape == (64, tensor, 8) and k.sharding.shard_shape(k.shape) == (64, 1, 8)
    # Shard s holds kv head s // (tensor / 2): a copy of the one its query heads read.
    k_given = np.asarray(PARAMS["layers_0"]["attn"]["k"])
    for shard in k.addressable_shards:
        s = shard.index[1].start
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], k_given[:, s // (tensor // 2)])
    assert [c.tokens for c in engine.generate(PROMPTS, SAMPLING)] == single_device_tokens
    engine.set_params(PARAMS)  # new weights are placed on the mesh again
    assert engine.params["layers_0"]["attn"]["q"].sharding == q.sharding


def test_engine_mesh_errors_name_the_mismatch():
    with pytest.raises(ValueError, match=r"'tensor' of size 8 does not divide the model's n_heads=4"):
        Engine(presets.get("tiny"), llama.init_params(presets.get("tiny"), jax.random.key(0)),
               mesh=make_mesh("tensor:8"), **ENGINE)
    with pytest.raises(ValueError, match=r"'tensor' axis only.*\{'fsdp': 2\}"):
        Engine(CFG, PARAMS, mesh=make_mesh("fsdp:2,tensor:4"), **ENGINE)
