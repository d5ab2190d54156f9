"""Logical axis rules on 8 fake CPU devices: params born sharded, divisibility, replication check."""
import functools
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax.core import meta  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxllm.parallel.mesh import make_mesh  # noqa: E402
from jaxllm.parallel.rules import (  # noqa: E402
    DEFAULT_RULES,
    batch_sharding,
    check_sharded,
    init_sharded,
    mesh_rules,
    param_shardings,
    validate_divisibility,
    with_sharding_constraint,
)

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)

V, D, H, G, K, F, L = 64, 32, 4, 2, 8, 64, 2
B, T = 8, 16
MESHES = ["fsdp:8", "fsdp:4,tensor:2", "data:2,fsdp:2,tensor:2"]

# What the rules must produce, written out from the sharding scheme (not from DEFAULT_RULES):
# every parameter's logical names, and the mesh axis each logical name is split over.
LOGICAL_NAMES = {
    "embedding": ("vocab", "embed"),
    "layers/attn_norm": ("layers", None),
    "layers/q": ("layers", "embed", "heads", None),
    "layers/k": ("layers", "embed", "kv_heads", None),
    "layers/v": ("layers", "embed", "kv_heads", None),
    "layers/o": ("layers", "heads", None, "embed"),
    "layers/mlp_norm": ("layers", None),
    "layers/gate": ("layers", "embed", "mlp"),
    "layers/up": ("layers", "embed", "mlp"),
    "layers/down": ("layers", "mlp", "embed"),
    "final_norm": (None,),
    "lm_head": ("embed", "vocab"),
}
MESH_AXIS = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor"}


def _param(module, name, names, shape, init=nn.initializers.normal(0.02)):
    return module.param(name, nn.with_logical_partitioning(init, names), shape)


class Block(nn.Module):
    """A pre-norm GQA attention + SwiGLU block annotated like the project's Llama."""

    d_model: int

    @nn.compact
    def __call__(self, x_BTD, _):
        ones = nn.initializers.ones
        h_BTD = x_BTD * _param(self, "attn_norm", (None,), (self.d_model,), ones)
        q_BTHK = jnp.einsum("btd,dhk->bthk", h_BTD, _param(self, "q", ("embed", "heads", None), (self.d_model, H, K)))
        k_BTGK = jnp.einsum("btd,dgk->btgk", h_BTD, _param(self, "k", ("embed", "kv_heads", None), (self.d_model, G, K)))
        v_BTGK = jnp.einsum("btd,dgk->btgk", h_BTD, _param(self, "v", ("embed", "kv_heads", None), (self.d_model, G, K)))
        k_BTHK = jnp.repeat(k_BTGK, H // G, axis=2)
        v_BTHK = jnp.repeat(v_BTGK, H // G, axis=2)
        w_BHTT = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BTHK) / np.sqrt(K), axis=-1)
        ctx_BTHK = jnp.einsum("bhts,bshk->bthk", w_BHTT, v_BTHK)
        o_HKD = _param(self, "o", ("heads", None, "embed"), (H, K, self.d_model))
        x_BTD = nn.with_logical_constraint(x_BTD + jnp.einsum("bthk,hkd->btd", ctx_BTHK, o_HKD), ("batch", "length", "embed"))
        h_BTD = x_BTD * _param(self, "mlp_norm", (None,), (self.d_model,), ones)
        gate_BTF = h_BTD @ _param(self, "gate", ("embed", "mlp"), (self.d_model, F))
        up_BTF = h_BTD @ _param(self, "up", ("embed", "mlp"), (self.d_model, F))
        x_BTD = x_BTD + (nn.silu(gate_BTF) * up_BTF) @ _param(self, "down", ("mlp", "embed"), (F, self.d_model))
        return x_BTD, None


class TinyLM(nn.Module):
    vocab: int = V
    d_model: int = D

    @nn.compact
    def __call__(self, tokens_BT):
        table_VD = _param(self, "embedding", ("vocab", "embed"), (self.vocab, self.d_model), nn.initializers.normal(1.0))
        x_BTD = nn.with_logical_constraint(table_VD[tokens_BT], ("batch", "length", "embed"))
        stack = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BTD, _ = stack(self.d_model, name="layers")(x_BTD, None)
        x_BTD = x_BTD * _param(self, "final_norm", (None,), (self.d_model,), nn.initializers.ones)
        return x_BTD @ _param(self, "lm_head", ("embed", "vocab"), (self.d_model, self.vocab))


TOKENS_BT = jax.random.randint(jax.random.key(1), (B, T), 0, V)


def _init_fn(model):
    return lambda rng: model.init(rng, TOKENS_BT)


def _flat(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def reference():
    """Unsharded init and forward on one device, no mesh anywhere."""
    variables = jax.jit(lambda rng: meta.unbox(_init_fn(TinyLM())(rng)))(jax.random.key(0))
    return variables, jax.jit(TinyLM().apply)(variables, TOKENS_BT)


@functools.cache
def _born_sharded(spec):
    """(mesh, variables, shardings) of TinyLM initialised on the mesh ``spec``; compiled once per spec."""
    mesh = make_mesh(spec)
    return (mesh, *init_sharded(_init_fn(TinyLM()), mesh, DEFAULT_RULES, jax.random.key(0)))


@pytest.mark.parametrize("spec", MESHES)
def test_params_born_sharded_and_forward_matches(spec, reference):
    ref_variables, ref_logits_BTV = reference
    mesh, variables, shardings = _born_sharded(spec)

    params = _flat(variables["params"])
    assert set(params) == set(LOGICAL_NAMES)
    flat_shardings = _flat(shardings["params"])
    for name, x in params.items():
        expected_shard = tuple(
            size // mesh.shape[MESH_AXIS[logical]] if logical in MESH_AXIS else size
            for size, logical in zip(x.shape, LOGICAL_NAMES[name])
        )
        assert x.sharding.shard_shape(x.shape) == expected_shard, name
        assert x.sharding == flat_shardings[name], name
        assert {s.data.shape for s in x.addressable_shards} == {expected_shard}, name
    # same values as the unsharded init, up to float32 rounding of differently fused code
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), variables, ref_variables)

    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_rules(DEFAULT_RULES, mesh)):
        forward = jax.jit(TinyLM().apply, in_shardings=(shardings, batch_sharding(mesh)))
        logits_BTV = forward(variables, jax.device_put(TOKENS_BT, batch_sharding(mesh)))
    np.testing.assert_allclose(logits_BTV, ref_logits_BTV, rtol=1e-5, atol=1e-5)


def test_param_shardings_from_abstract_tree():
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    abstract = jax.eval_shape(_init_fn(TinyLM()), jax.random.key(0))
    shardings = _flat(param_shardings(abstract, mesh)["params"])
    assert shardings["layers/q"].spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert shardings["embedding"].spec == PartitionSpec("tensor", "fsdp")
    assert shardings["final_norm"].is_fully_replicated


def test_divisibility_error_names_parameter_dimension_axis_and_sizes():
    abstract = jax.eval_shape(_init_fn(TinyLM()), jax.random.key(0))
    with pytest.raises(ValueError) as err:
        validate_divisibility(abstract, make_mesh("tensor:8"))
    message = str(err.value)
    for fragment in ["'params/layers/k'", "dimension 2", "'kv_heads'", "size 2", "'tensor'", "size 8"]:
        assert fragment in message

    narrow = TinyLM(d_model=12)
    with pytest.raises(ValueError, match=r"'params/embedding'.*dimension 1 \(logical 'embed', size 12\).*'fsdp' of size 8"):
        init_sharded(_init_fn(narrow), make_mesh("fsdp:8"), DEFAULT_RULES, jax.random.key(0))


def test_size_one_and_absent_mesh_axes_shard_nothing():
    abstract = jax.eval_shape(_init_fn(TinyLM(vocab=63)), jax.random.key(0))  # vocab 63 -> tensor, size 1
    rules = tuple((name, "data") if name == "layers" else (name, axes) for name, axes in DEFAULT_RULES)
    shardings = param_shardings(abstract, make_mesh("fsdp:8"), rules)["params"]
    assert shardings["embedding"].shard_shape((63, D)) == (63, D // 8)
    assert shardings["layers"]["q"].spec == PartitionSpec("data", "fsdp", "tensor", None)
    assert shardings["layers"]["q"].shard_shape((L, D, H, K)) == (L, D // 8, H, K)

    fsdp_only = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = param_shardings(abstract, fsdp_only)["params"]
    assert shardings["layers"]["q"].spec == PartitionSpec(None, "fsdp", None, None)
    assert shardings["lm_head"].spec == PartitionSpec("fsdp", None)


def test_batch_sharding_and_activation_constraint():
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    assert batch_sharding(mesh).shard_shape((B, T)) == (B // 4, T)
    assert batch_sharding(make_mesh("fsdp:8")).shard_shape((B, T)) == (1, T)

    x_BTD = jnp.ones((B, T, D))
    y_BTD = jax.jit(lambda x: with_sharding_constraint(2 * x, ("batch", "length", "embed"), mesh))(x_BTD)
    # batch takes data and fsdp first, so embed (also fsdp) stays whole
    assert y_BTD.sharding.shard_shape(y_BTD.shape) == (B // 4, T, D)
    np.testing.assert_array_equal(y_BTD, 2 * np.ones((B, T, D)))


def test_unknown_logical_name_and_bad_rules_are_errors():
    class Typo(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ _param(self, "w", ("embd", "mlp"), (4, 8))

    abstract = jax.eval_shape(lambda rng: Typo().init(rng, jnp.ones((2, 4))), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'params/w'.*\['embd'\]"):
        param_shardings(abstract, make_mesh("fsdp:8"))
    with pytest.raises(ValueError, match="sequence of"):
        init_sharded(_init_fn(TinyLM()), make_mesh("fsdp:8"), jax.random.key(0))
    with pytest.raises(ValueError, match="'embed', 3"):
        mesh_rules((("embed", 3),), make_mesh("fsdp:8"))


def test_check_sharded(reference):
    ref_variables, _ = reference
    mesh, variables, shardings = _born_sharded("fsdp:8")

    sizes = {name: x.size for name, x in _flat(ref_variables["params"]).items()}
    norms = sum(size for name, size in sizes.items() if name.endswith("norm"))
    expected = norms / sum(sizes.values())
    assert check_sharded(variables) == pytest.approx(expected)
    assert check_sharded(variables, shardings) == pytest.approx(expected)
    with pytest.raises(ValueError, match="above the tolerance of 0.1%"):
        check_sharded(variables, max_unsharded_fraction=0.001)

    replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    with pytest.raises(ValueError) as err:
        check_sharded(replicated)
    assert "100.0% of parameter bytes" in str(err.value)
    assert "params/layers/gate (16384 bytes)" in str(err.value)

    single = jax.device_put(variables, jax.devices()[0])
    assert check_sharded(single) == 0.0
