"""Single-device tests of ernie5_jax/sharding.py: mesh sizes, rules, specs, errors (no compile).

Layouts here sit on AbstractMeshes (no devices needed); numerics on 8 simulated devices
are in tests/multidevice/.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from ernie5_jax import config as config_lib
from ernie5_jax import sharding
from ernie5_jax.model import create_model
from ernie5_jax.ops import backend, moe_expert_parallel
from ernie5_jax.train import optimizer
from ernie5_jax.train import state as state_lib


def _config(**mesh):
  config = config_lib.default_config()
  config.mesh.update(mesh)
  return config


def test_mesh_shape_fills_and_names_the_axis_that_does_not_fit():
  assert sharding.mesh_shape(_config(fsdp=2, expert=2).mesh, 8) == dict(
      data=2, fsdp=2, expert=2, tensor=1)
  assert sharding.mesh_shape(_config(data=1, tensor=-1).mesh, 4)["tensor"] == 4
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.data=-1 cannot fill 8 "
                     r"devices.*multiply to 3"):
    sharding.mesh_shape(_config(expert=3).mesh, 8)
  with pytest.raises(config_lib.ConfigError, match=r"has 4 devices, but 8 are available"):
    sharding.mesh_shape(_config(data=2, fsdp=2).mesh, 8)


@pytest.mark.parametrize("field, value, message", [
    ("data", 0, r"config.mesh.data=0 is not accepted: expected an int >= 1, or -1"),
    ("fsdp", -1, r"config.mesh=.* expected at most one axis of size -1"),
    ("expert", 3, r"config.mesh.expert=3 is not accepted: expected a divisor of "
                  r"model.num_experts=8"),
    ("expert_capacity_factor", -1.0, r"config.mesh.expert_capacity_factor=-1.0"),
    ("rules.embed", "fsdp,model", r"config.mesh.rules.embed='fsdp,model' is not accepted"),
    ("rules.batch", "data,data", r"config.mesh.rules.batch='data,data'"),
])
def test_validate_rejects_bad_mesh_fields(field, value, message):
  config = config_lib.default_config()
  node, _, name = field.rpartition(".")
  (config.mesh[node] if node else config.mesh)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_validate_rejects_bad_distributed_fields():
  config = config_lib.default_config()
  config.distributed.initialize = "sometimes"
  with pytest.raises(config_lib.ConfigError, match=r"distributed.initialize='sometimes'"):
    config_lib.validate(config)
  config = config_lib.default_config()
  config.distributed.update(num_processes=2, process_id=2)
  with pytest.raises(config_lib.ConfigError, match=r"distributed.process_id=2"):
    config_lib.validate(config)


def test_expert_parallelism_needs_the_expert_axis_in_the_batch_rule():
  config = _config(expert=2)
  config.mesh.rules.batch = "data,fsdp"
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.rules.batch='data,fsdp' is "
                     r"not accepted: .*split over \['expert'\] too"):
    sharding.abstract_layout(config, 8)


def test_logical_to_spec_skips_used_and_unit_axes_and_names_bad_dimensions():
  layout = sharding.abstract_layout(_config(fsdp=2, expert=2, tensor=2), 8)
  spec = lambda names, shape: sharding.logical_to_spec(names, shape, layout, what="w")
  # embed -> fsdp,expert; the expert dimension took 'expert' first.
  assert spec(("expert", "embed", "expert_mlp"), (8, 32, 16)) == P("expert", "fsdp", "tensor")
  assert spec(("vocab", "embed"), (128, 32)) == P("tensor", ("fsdp", "expert"))
  assert spec(("batch", "seq", "act_embed"), (8, 16, 32)) == P(("fsdp", "expert"), None, None)
  with pytest.raises(config_lib.ConfigError, match=r"w: dimension 1 \('kv_heads', size 1\) is "
                     r"not divisible by the mesh axes \('tensor',\) .*tensor=2.*"
                     r"config.mesh.rules.kv_heads"):
    spec(("embed", "kv_heads", "head_dim"), (32, 1, 16))
  with pytest.raises(config_lib.ConfigError, match=r"logical axis 'nope' has no rule"):
    spec(("nope",), (4,))
  assert sharding.logical_to_spec(("batch", "seq"), (1, 16), layout, what="a",
                                  strict=False) == P(None, None)


@pytest.fixture(scope="module")
def abstract_state():
  config = _config(data=1, fsdp=2, expert=2, tensor=2)
  config.model.update(num_dense_layers=1, num_layers=2)
  tx, _ = optimizer.create_optimizer(config)
  _, abstract = state_lib.abstract_train_state(lambda: create_model(config), tx)
  return config, abstract


def test_tree_shardings_cover_params_optimizer_and_rest(abstract_state):
  config, abstract = abstract_state
  layout = sharding.abstract_layout(config, 8)
  shardings = sharding.tree_shardings(abstract, layout)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  w_gate = shardings.params["moe_layers"]["layers"]["ffn"]["experts"]["w_gate"].get_value()
  assert w_gate.spec == P(None, "expert", "fsdp", "tensor")  # [layers, expert, embed, mlp]
  mu = shardings.opt_state[1][0].mu["moe_layers"]["layers"]["ffn"]["experts"]["w_gate"].get_value()
  assert mu.spec == w_gate.spec  # AdamW moments mirror their parameter
  bias = shardings.rest["moe_layers"]["layers"]["ffn"]["router"]["bias"].get_value()
  assert bias.spec == P(None, "expert")
  assert shardings.step.spec == P()
  # Each device holds w_gate [1, 8, 128, 64] split 2 x 2 x 2 ways.
  assert w_gate.shard_shape((1, 8, 128, 64)) == (1, 4, 64, 32)
  restored = sharding.with_shardings(abstract, shardings)
  assert jax.tree.leaves(restored)[0].sharding == jax.tree.leaves(shardings)[0]


def test_batch_sharding_needs_a_multiple_of_the_batch_shards():
  layout = sharding.make_layout(_config())  # 1 device: data = 1
  assert sharding.batch_sharding(layout, 3).spec == P(None)
  abstract = sharding.abstract_layout(_config(fsdp=2, expert=2), 8)
  with pytest.raises(config_lib.ConfigError, match=r"global_batch_size=4 is not accepted: "
                     r"expected a multiple of 8, the batch shards \(data=2, fsdp=2, expert=2"):
    sharding.batch_sharding(abstract, 4)


def test_constrain_is_the_identity_without_a_layout_and_the_layout_sets_the_platform():
  x = jnp.ones((2, 4, 8))
  assert sharding.constrain(x, sharding.ACT_BSD) is x
  assert backend.target_platform() == "cpu"
  assert backend.ragged_exchange() is None  # XLA:CPU: the padded exchange
  layout = sharding.make_layout(_config())
  assert layout.platform == "cpu"
  target = dataclasses.replace(layout, platform="tpu")  # an ahead-of-time compile for TPU
  with sharding.use_layout(target):
    assert backend.target_platform() == "tpu"
    assert backend.resolve_moe_backend("auto") == "pallas"
    assert backend.resolve_attention_backend("auto") == "pallas"
    assert not backend.pallas_interpret()
    assert backend.ragged_exchange() is jax.lax.ragged_all_to_all
    assert backend.target_platform("cpu") == "cpu"  # an explicit argument wins
  assert sharding.active_layout() is None


def test_exchange_rows():
  assert moe_expert_parallel.exchange_rows(64, 4, 0.0) == 64  # dropless
  assert moe_expert_parallel.exchange_rows(64, 4, 1.25) == 20
  assert moe_expert_parallel.exchange_rows(64, 4, 100.0) == 64
