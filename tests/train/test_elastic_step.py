"""The elastic train step (train/step.py): full model + sampled sub-models in one optimizer
step, averaged gradients, router-bias rule (full-routing passes only), draws from (seed,
step) that are never the full model, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline
from ernie5_jax.model import create_model, elastic
from ernie5_jax.model import router as router_lib
from ernie5_jax.model.router import RouterBias
from ernie5_jax.train import state as state_lib
from ernie5_jax.train import step as step_lib

from tiny_train_config import make_tiny_config

RATE = 1e-2
NUM_STEPS = 4


@pytest.fixture(scope="module")
def setup():
  """3 layers, elastic on (1 sub-model per step), SGD with rate 1 so that grads = -update."""
  config = make_tiny_config()
  config.model.num_layers = 3  # 1 dense + 2 MoE: depth 2 skips MoE layer 0.
  config.router.bias_update_rate = RATE
  # Sub-models differ from the full one more often than the defaults make them.
  config.elastic.update(enabled=True, sub_models=1, full_depth_prob=0.3,
                        full_experts_prob=0.3, full_top_k_prob=0.3)
  config_lib.validate(config)
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  graphdef, state = state_lib.init_train_state(lambda: create_model(config), tx)
  data = input_pipeline.create_train_iterator(config)
  one_pass = jax.jit(lambda params, rest, batch, sub: jax.value_and_grad(
      step_lib.loss_and_metrics, has_aux=True)(params, rest, batch, graphdef=graphdef,
                                               config=config, elastic=sub))
  return dict(config=config, graphdef=graphdef, state=state, one_pass=one_pass,
              train_step=step_lib.make_train_step(config, graphdef, tx, schedule),
              batches=[next(data) for _ in range(NUM_STEPS)])


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _subs(masks):
  """ElasticMasks stacked [passes] -> SubModel per pass."""
  return [elastic.SubModel(int(d), int(e), int(k)) for d, e, k in zip(
      np.asarray(masks.layer_keep).sum(-1), np.asarray(masks.expert_mask).sum(-1),
      np.asarray(masks.top_k))]


def test_draws_depend_on_seed_and_step_only(setup):
  config = setup["config"]
  draw = jax.jit(lambda step: step_lib.step_masks(config, step))
  subs = [_subs(draw(jnp.asarray(s, jnp.int32))) for s in range(NUM_STEPS)]
  full = elastic.full_submodel(config)
  assert all(s[0] == full for s in subs)  # pass 0: the full model, every step
  assert len({s[1] for s in subs}) >= 2  # the sampled ones vary from step to step
  assert _subs(draw(jnp.asarray(2, jnp.int32))) == subs[2]  # a resumed run draws the same
  for sub in {sub for s in subs for sub in s}:
    elastic.check_submodel(config, sub)  # every draw is a valid member of the family


def test_no_step_trains_the_full_model_twice(setup):
  config = setup["config"]
  masks = jax.jit(jax.vmap(lambda s: step_lib.step_masks(config, s)))(jnp.arange(500))
  full = elastic.full_submodel(config)
  subs = [_subs(jax.tree.map(lambda v, i=i: v[i], masks)) for i in range(500)]
  assert all(s[0] == full for s in subs)
  assert not any(s[1] == full for s in subs)  # the unconditioned draw: ~3% (0.3^3) here


def _first_step(config, reduced_routing: bool) -> int:
  """The first step whose sampled sub-model does (not) reduce the width or the top-k."""
  masks = jax.jit(jax.vmap(lambda s: step_lib.step_masks(config, s)))(jnp.arange(100))
  reduced = ~np.asarray(jax.vmap(jax.vmap(elastic.full_routing))(masks))[:, 1]  # [steps]
  (steps,) = np.nonzero(reduced == reduced_routing)
  return int(steps[0])


@pytest.mark.parametrize("reduced_routing", [True, False], ids=["reduced", "depth_only"])
def test_grads_average_the_passes_and_bias_moves_on_full_routing_only(setup, reduced_routing):
  s, config = setup, setup["config"]
  batch = s["batches"][0]
  step = _first_step(config, reduced_routing)
  before = _copy(s["state"]).replace(step=jnp.asarray(step, jnp.int32))
  after, metrics = s["train_step"](_copy(before), batch)

  # Reference: the whole batch through each pass's sub-model, outside the step's scan.
  masks = step_lib.step_masks(config, before.step)
  outs = [s["one_pass"](before.params, before.rest, batch,
                        jax.tree.map(lambda v, i=i: v[i], masks)) for i in range(2)]
  want = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][1], outs[1][1])
  got = jax.tree.map(lambda p, q: p - q, before.params, after.params)  # SGD(1): -grads
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))

  # Metrics: the full model's (pass 0) plus the sampled sub-model's.
  m0, m1 = (out[0][1][0] for out in outs)  # ((loss, (metrics, aux)), grads)
  np.testing.assert_allclose(float(metrics["loss"]), float(m0["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["elastic/sub_loss"]), float(m1["loss"]), rtol=1e-5)
  sub = _subs(masks)[1]
  assert (float(metrics["elastic/depth"]), float(metrics["elastic/experts"]),
          float(metrics["elastic/top_k"])) == (sub.depth, sub.experts, sub.top_k)

  # Router bias (ERNIE's elastic rule): pass 0's load, plus the sub-model's in the layers
  # it ran only when it routes at full width and full top-k; a reduced pass moves nothing.
  load = np.stack([np.asarray(out[0][1][1]["expert_load"]) for out in outs])  # [2, layers, E]
  keep = np.asarray(masks.layer_keep)[:, 1:]  # [passes, moe_layers]
  deviation = np.asarray(router_lib.load_deviation(jnp.asarray(load[0]))).copy()
  if not reduced_routing:
    deviation += np.asarray(router_lib.load_deviation(jnp.asarray(load[1]))) * keep[1][:, None]
  (bias0,) = jax.tree.leaves(before.rest.filter(RouterBias))
  (bias1,) = jax.tree.leaves(after.rest.filter(RouterBias))
  sure = np.abs(deviation) > 1e-3  # away from the sign's 0
  assert sure.sum() > 4
  np.testing.assert_allclose((np.asarray(bias1) - np.asarray(bias0))[sure],
                             RATE * np.sign(deviation)[sure], atol=1e-7)
  assert elastic.full_routing(jax.tree.map(lambda v: v[1], masks)) != reduced_routing


def test_steps_with_different_submodels_compile_once(setup):
  s = setup
  draw = jax.jit(lambda step: step_lib.step_masks(s["config"], step))
  seen = {_subs(draw(jnp.asarray(i, jnp.int32)))[1] for i in range(NUM_STEPS)}
  assert len(seen) >= 2  # the steps below train different sub-models
  state, _ = s["train_step"](_copy(s["state"]), s["batches"][0])  # warm-up (compiles once)
  compiles = []

  def listener(event, _, **unused):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for batch in s["batches"][1:]:
      state, metrics = s["train_step"](state, batch)
      assert np.isfinite(float(metrics["loss"]))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles and int(state.step) == NUM_STEPS
  assert s["train_step"]._cache_size() == 1  # pylint: disable=protected-access
