"""Cases on 8 simulated CPU devices; test_multidevice.py runs this file in one subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported, so
these cases cannot share the 1-device test process (file name outside pytest's test_*
pattern: collected only when named). Each mesh compiles the tiny model's step once
(xla_backend_optimization_level 0: compile time dominates here).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline, sharding
from ernie5_jax.model import create_model
from ernie5_jax.ops import moe_dispatch, moe_expert_parallel
from ernie5_jax.train import checkpoint, loop, optimizer
from ernie5_jax.train import state as state_lib
from ernie5_jax.train import step as step_lib

assert jax.device_count() == 8, (
    f"needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (XLA_FLAGS="
    f"{os.environ.get('XLA_FLAGS')!r}); run through tests/multidevice/test_multidevice.py")

FAST_COMPILE = {"compiler_options": {"xla_backend_optimization_level": 0}}
# Every supported kind of mesh over the 8 devices (data = -1 fills the rest).
MESHES = {"data": {}, "fsdp": dict(fsdp=8), "expert": dict(expert=8),
          "tensor": dict(tensor=2), "mixed": dict(fsdp=2, expert=2, tensor=2)}
STEPS = 2


def tiny_config(**mesh):
  """d_model 32, one MoE layer: 8 experts + 1 shared (a dense SwiGLU), batch 8, seq 16."""
  config = config_lib.default_config()
  config.model.update(vocab_size=128, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                      rope_sections=(2, 1, 1), num_layers=1, num_dense_layers=0,
                      num_experts=8, num_shared_experts=1, expert_hidden=16, dense_hidden=64,
                      top_k=2, audio_levels=1)
  config.objective.update(mtp_depth=0, audio_level_weights=())
  config.data.update(seq_len=16, global_batch_size=8)
  # No warmup, so step 1 moves the parameters; Adam's eps well above float32 noise, so the
  # first update (~ lr * g / (|g| + eps)) does not amplify reduction-order differences.
  config.optimizer.update(warmup_steps=0, eps=1e-3)
  config.router.bias_update_rate = 1e-2
  config.train.update(num_steps=STEPS, log_every=1, checkpoint_every=STEPS,
                      async_checkpoints=False)
  config.mesh.update(mesh)
  config_lib.validate(config)
  return config


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _train(config, layout, initial=None):
  """STEPS steps from `initial` placed per the layout (default: a fresh init).

  Returns (initial state on the host, metrics per step, final state).
  """
  tx, schedule = optimizer.create_optimizer(config)
  graphdef, abstract = state_lib.abstract_train_state(lambda: create_model(config), tx)
  data = input_pipeline.create_train_iterator(config)
  batches = [next(data) for _ in range(STEPS)]
  if layout is None:  # The single-device reference.
    _, state = state_lib.init_train_state(lambda: create_model(config), tx)
    step, put = step_lib.make_train_step(config, graphdef, tx, schedule, **FAST_COMPILE), dict
  else:
    state_sharding = sharding.tree_shardings(abstract, layout)
    # The sharded init itself is checked by the trainer case (mixed mesh).
    state = jax.device_put(initial, state_sharding)
    data_sharding = sharding.batch_sharding(layout, config.data.global_batch_size)
    step = sharding.under_layout(step_lib.make_train_step(
        config, graphdef, tx, schedule, **FAST_COMPILE,
        **sharding.step_shardings(layout, state_sharding, data_sharding)), layout)
    put = lambda b: sharding.to_global(b, data_sharding)
  initial, metrics = _host(state), []
  for batch in batches:
    state, m = step(state, put(batch))
    metrics.append(_host(m))
  return initial, metrics, state


@pytest.fixture(scope="module")
def reference():
  initial, metrics, state = _train(tiny_config(), None)
  return initial, metrics, _host(state)


def _assert_trains_like(reference, config, layout, name, *, rtol, atol):
  """STEPS steps of config on layout from the reference's start match it; returns the state.

  Metrics within rtol; parameters and the rest (router bias from the global loads, loss
  EMA) within atol.
  """
  ref_initial, ref_metrics, ref_state = reference
  _, metrics, state = _train(config, layout, ref_initial)
  for got, want in zip(metrics, ref_metrics):
    for key in ("loss", "grad_norm", "router/load_imbalance"):
      np.testing.assert_allclose(got[key], want[key], rtol=rtol, err_msg=f"{name}: {key}")
  assert _max_diff(state.params, ref_state.params) < atol, name
  assert _max_diff(state.rest, ref_state.rest) < atol, name
  return state


def _check_sharded_like_rules(state, layout, name):
  """The expert weights of `state` sit where the rules put them."""
  w_gate = state.params["moe_layers"]["layers"]["ffn"]["experts"]["w_gate"].get_value()
  want = sharding.tree_shardings(state.params, layout)["moe_layers"]["layers"]["ffn"][
      "experts"]["w_gate"].get_value()
  assert w_gate.sharding.is_equivalent_to(want, w_gate.ndim), name
  if name in ("expert", "mixed"):
    assert "expert" in str(want.spec)


@pytest.mark.parametrize("name", [m for m in MESHES if m != "mixed"])
def test_train_step_on_mesh_matches_single_device(reference, name):
  config = tiny_config(**MESHES[name])
  layout = sharding.make_layout(config)
  state = _assert_trains_like(reference, config, layout, name, rtol=2e-5, atol=1e-5)
  _check_sharded_like_rules(state, layout, name)


@pytest.fixture(scope="module")
def trained_on_mixed(tmp_path_factory):
  """The real trainer on the mixed mesh: (workdir, final state on the host, config)."""
  workdir = str(tmp_path_factory.mktemp("mixed"))
  config = tiny_config(**MESHES["mixed"])
  state = loop.train_and_evaluate(config, workdir)
  _check_sharded_like_rules(state, sharding.make_layout(config), "mixed")
  return workdir, _host(state), config


def test_trainer_on_mixed_mesh_matches_single_device(reference, trained_on_mixed):
  # Sharded init (jit with out_shardings) + the loop's sharded step and batches.
  _, state, _ = trained_on_mixed
  _, _, ref_state = reference
  assert int(state.step) == STEPS
  assert _max_diff(state.params, ref_state.params) < 1e-5
  assert _max_diff(state.rest, ref_state.rest) < 1e-5
  assert _max_diff(state.opt_state, ref_state.opt_state) < 1e-5


def test_checkpoint_restores_onto_another_mesh(trained_on_mixed):
  # Written on fsdp x expert x tensor = 2 x 2 x 2 by the trainer; restored onto fsdp = 8
  # with the target shardings of the new mesh (what the trainer does when it resumes).
  workdir, saved, _ = trained_on_mixed
  config = tiny_config(fsdp=8)
  tx, _ = optimizer.create_optimizer(config)
  _, abstract = state_lib.abstract_train_state(lambda: create_model(config), tx)
  abstract = sharding.with_shardings(
      abstract, sharding.tree_shardings(abstract, sharding.make_layout(config)))
  manager = checkpoint.create_manager(workdir, keep=3, async_save=False)
  restored = checkpoint.restore(manager, abstract, input_pipeline.create_train_iterator(config))
  assert int(restored.step) == STEPS
  assert _max_diff(restored.params, saved.params) == 0
  assert _max_diff(restored.opt_state, saved.opt_state) == 0
  assert _max_diff(restored.rest, saved.rest) == 0
  table = restored.params["embed"]["table"].get_value()  # [vocab, embed]: embed over fsdp
  assert table.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert [s.data.shape for s in table.addressable_shards] == [(128, 4)] * 8


def _ep_inputs(tokens=64, d=16, f=8, experts=8, top_k=2):
  keys = jax.random.split(jax.random.key(0), 6)
  first = jax.random.randint(keys[1], (tokens,), 0, experts)
  second = (first + jax.random.randint(keys[2], (tokens,), 1, experts)) % experts
  ids = jnp.stack([first, second], axis=1).astype(jnp.int32)  # [T, 2], distinct experts
  weights = jax.nn.softmax(jax.random.normal(keys[3], (tokens, top_k)))
  x = jax.random.normal(keys[0], (tokens, d))
  w = [0.3 * jax.random.normal(k, s) for k, s in zip(
      jax.random.split(keys[4], 3), [(experts, d, f), (experts, d, f), (experts, f, d)])]
  return x, ids, weights, w


def test_expert_parallel_dispatch_matches_gather_dispatch():
  # data x expert x tensor = 2 x 2 x 2: tokens exchanged over 'expert', F split over
  # 'tensor' (partial sums), weight gradients summed over 'data'. Dropless: the gather
  # dispatch, gradients included. Capacity 1.0 (8 token blocks of 8 x 2 assignments, 8 rows
  # per expert shard): the overflow is dropped, i.e. the gather dispatch with those
  # assignments' combine weights zeroed.
  x, ids, weights, (wg, wu, wd) = _ep_inputs()
  dropless = sharding.make_layout(tiny_config(expert=2, tensor=2))
  config = tiny_config(expert=2, tensor=2)
  config.mesh.expert_capacity_factor = 1.0
  capped = sharding.make_layout(config)
  drop = moe_expert_parallel.dropped_assignments(
      ids, 8, token_shards=capped.size(capped.axes("batch")), num_shards=2,
      capacity_factor=1.0)
  assert 0 < int(drop.sum()) < drop.size

  def loss(x, weights, wg, wu, wd):
    y = moe_dispatch.expert_ffn(x, ids, weights, wg, wu, wd, backend="gather")
    return jnp.sum(jnp.sin(y)), y

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)

  @functools.partial(jax.jit, **FAST_COMPILE)
  def gather(x, weights, *w):
    return grad(x, weights, *w), loss(x, jnp.where(drop, 0, weights), *w)[1]

  @functools.partial(jax.jit, **FAST_COMPILE)
  def expert_parallel(x, weights, *w):  # Layouts entered while tracing: one compile.
    with sharding.use_layout(dropless):
      exact = grad(x, weights, *w)
    with sharding.use_layout(capped):
      return exact, loss(x, weights, *w)[1]

  ((_, want), want_grads), want_capped = gather(x, weights, wg, wu, wd)
  ((_, got), got_grads), got_capped = expert_parallel(x, weights, wg, wu, wd)
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert _max_diff(got_grads, want_grads) < 1e-5
  np.testing.assert_allclose(got_capped, want_capped, atol=2e-6)
  assert np.abs(np.asarray(got_capped - want)).max() > 1e-3  # the drops did change y


def test_mesh_errors_name_the_axis_and_sizes():
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.data=-1 cannot fill 8 "
                     r"devices: the other axes .*multiply to 3"):
    sharding.make_layout(tiny_config(tensor=3))
  config = tiny_config(tensor=2)
  config.model.update(num_kv_heads=1)
  tx, _ = optimizer.create_optimizer(config)
  _, abstract = state_lib.abstract_train_state(lambda: create_model(config), tx)
  with pytest.raises(config_lib.ConfigError, match=r"parameter params/moe_layers/layers/attn/"
                     r"wk: dimension 2 \('kv_heads', size 1\) is not divisible by the mesh "
                     r"axes \('tensor',\) .*tensor=2"):
    sharding.tree_shardings(abstract, sharding.make_layout(config))
  with pytest.raises(config_lib.ConfigError, match=r"global_batch_size=12 is not accepted: "
                     r"expected a multiple of 8, the batch shards \(data=8"):
    sharding.batch_sharding(sharding.make_layout(tiny_config()), 12)


# --- the Pallas kernels under sharded meshes (interpret mode on CPU) ---------------------
# Mosaic/Triton kernels cannot be partitioned by XLA: they run inside shard_map, attention
# per batch rows and heads, the grouped matmul per expert shard (mixed: experts split over
# 'expert', tokens exchanged) or per token shard (data x tensor: every expert on every
# device, F split over 'tensor' and summed).
PALLAS_MESHES = {"mixed": MESHES["mixed"], "data_tensor": dict(tensor=2)}


@pytest.mark.parametrize("name", list(PALLAS_MESHES))
def test_pallas_backends_on_mesh_match_single_device(reference, name):
  config = tiny_config(**PALLAS_MESHES[name])
  config.model.update(attention="pallas", moe_dispatch="pallas")
  # The reference is one device on the XLA paths.
  _assert_trains_like(reference, config, sharding.make_layout(config), name, rtol=5e-5,
                      atol=2e-5)


def test_ragged_exchange_matches_gather_dispatch():
  # The dropless exchange of TPU/GPU (jax.lax.ragged_all_to_all), here with the emulated
  # collective of the same semantics: outputs and gradients equal the one-device dispatch,
  # over data x expert x tensor = 2 x 2 x 2 and over expert = 8 (one expert per shard, so
  # some slices are empty).
  x, ids, weights, (wg, wu, wd) = _ep_inputs()

  def loss(ffn, x, weights, wg, wu, wd):
    y = ffn(x, ids, weights, wg, wu, wd)
    return jnp.sum(jnp.sin(y)), y

  gather = lambda *a: moe_dispatch.expert_ffn(*a, backend="gather")
  grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)
  (_, want), want_grads = jax.jit(functools.partial(grad, gather), **FAST_COMPILE)(
      x, weights, wg, wu, wd)
  for mesh in (dict(expert=2, tensor=2), dict(expert=8)):
    layout = sharding.make_layout(tiny_config(**mesh))
    local = functools.partial(moe_dispatch._single_device_ffn, backend="gather",  # pylint: disable=protected-access
                              capacity_factor=1.0)
    ragged = functools.partial(
        moe_expert_parallel.expert_parallel_ffn, mesh=layout.mesh,
        token_axes=layout.axes("batch"), expert_axes=layout.axes("expert"),
        hidden_axes=[a for a in layout.axes("expert_mlp") if a not in layout.axes("batch")],
        capacity_factor=0.0, local_ffn=local,
        ragged_exchange=moe_expert_parallel.emulated_ragged_all_to_all)
    (_, got), got_grads = jax.jit(functools.partial(grad, ragged), **FAST_COMPILE)(
        x, weights, wg, wu, wd)
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=str(mesh))
    assert _max_diff(got_grads, want_grads) < 1e-5, mesh


def test_sharded_train_step_lowers_for_cuda_with_triton_kernels():
  # What --mode=compile --topology=h100:8 does on a CPU host: the sharded step with the
  # Pallas backends lowered for CUDA (Triton bodies), experts exchanged by the ragged
  # all-to-all.
  from ernie5_jax.aot import compile as aot  # pylint: disable=g-import-not-at-top
  config = tiny_config(**MESHES["mixed"])
  config.model.update(attention="auto", moe_dispatch="auto")
  report = aot.compile_for_topology(config, "h100:8", programs=("train_step",))
  train, = report["programs"]
  assert report["platform"] == "cuda" and train["memory"] is None
  assert train["kernels"]["triton"] >= 6 and train["kernels"]["mosaic"] == 0, train["kernels"]
  assert "ragged-all-to-all" in train["collectives"], train["collectives"]


def test_ernie45_import_places_each_array_in_its_mesh_sharding():
  """The import builds every parameter straight into its sharding on config.mesh (each
  device shard read from the checkpoint), with the same values as an unsplit import."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ernie5_jax.elastic_export import abstract_model  # pylint: disable=g-import-not-at-top
  from ernie5_jax.interop import ernie45  # pylint: disable=g-import-not-at-top
  hf_dir = str(pathlib.Path(__file__).parents[1] / "interop" / "testdata" / "ernie45_moe_tiny")
  headers = ernie45.tensor_headers(ernie45.weight_files(hf_dir))
  config = ernie45.model_config(ernie45.read_hf_config(hf_dir))
  replicated = ernie45.load_state(config, ernie45.tensor_table(config), headers)
  config.mesh.update(data=1, **MESHES["mixed"])
  layout = sharding.make_layout(config)
  split = ernie45.load_state(config, ernie45.tensor_table(config), headers, layout)
  want = dict(nnx.to_flat_state(sharding.tree_shardings(nnx.state(abstract_model(config)),
                                                        layout)))
  for (path, a), (_, b) in zip(nnx.to_flat_state(split), nnx.to_flat_state(replicated)):
    assert a.get_value().sharding == want[path].get_value(), path
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
  experts = dict(nnx.to_flat_state(split))[("moe_layers", "layers", "ffn", "experts", "w_gate")]
  assert len(experts.get_value().sharding.device_set) == 8
  assert not experts.get_value().sharding.is_fully_replicated
