"""Elastic sub-models (model/elastic.py): specs, config checks, masks, sampling, and the
masked decoder (skipped layer = identity, masked experts never routed, one compile)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax import elastic_export
from ernie5_jax.model import Decoder
from ernie5_jax.model import elastic
from ernie5_jax.model import router as router_lib
from ernie5_jax.model.rope import text_positions

BATCH, SEQ, VOCAB = 2, 8, 64


def tiny_config(**model):
  """3 layers (1 dense + 2 MoE), 4 experts, top-2: depths (2,), experts (2, 3), top-k (1,)."""
  config = config_lib.default_config()
  config.model.update(dict(
      vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
      rope_sections=(2, 1, 1), num_dense_layers=1, dense_hidden=48, num_experts=4,
      num_shared_experts=1, expert_hidden=16, top_k=2))
  config.model.update(model)
  config_lib.validate(config)
  return config


def build(config, seed=0):
  """The Decoder with numpy-drawn parameters and a nonzero router bias (no init compiles)."""
  abstract = nnx.eval_shape(lambda: Decoder(config.model, mtp_depth=config.objective.mtp_depth,
                                            rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, SEQ)), jnp.int32)
  return (tokens, text_positions(BATCH, SEQ), jnp.ones((BATCH, SEQ), jnp.int32),
          jnp.zeros((BATCH, SEQ), jnp.int32))


@pytest.fixture(scope="module")
def model(config):
  return build(config)


@pytest.fixture(scope="module")
def forward(model):
  """One jitted masked forward for every sub-model (masks are traced arguments)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, batch, masks: nnx.merge(graphdef, state)(*batch, elastic=masks))
  return fn, state


# --- specs and config ----------------------------------------------------------------


def test_family_and_choices(config):
  S = elastic.SubModel  # pylint: disable=invalid-name
  assert elastic.full_submodel(config) == S(3, 4, 2)
  assert elastic.depth_choices(config) == (2,)
  assert elastic.expert_choices(config) == (2, 3)
  assert elastic.top_k_choices(config) == (1, 2)
  assert elastic.family(config) == [S(3, 4, 2), S(2, 4, 2), S(3, 3, 2), S(3, 2, 2), S(3, 4, 1),
                                    S(2, 2, 1)]
  assert hash(S(2, 2, 1)) == hash(S(2, 2, 1)) and str(S(2, 2, 1)) == "depth=2,experts=2,top_k=1"
  assert S.parse("2, 3,1") == S(2, 3, 1)
  with pytest.raises(config_lib.ConfigError, match=r"submodel='2,3' is not accepted"):
    S.parse("2,3")


def test_kept_layers_are_canonical():
  config = tiny_config(num_layers=12, num_dense_layers=2)
  S = elastic.SubModel  # pylint: disable=invalid-name
  assert elastic.kept_layers(config, S(12, 4, 2)) == tuple(range(12))
  assert elastic.kept_layers(config, S(2, 4, 2)) == (0, 11)
  assert elastic.kept_layers(config, S(11, 4, 2)) == tuple(i for i in range(12) if i != 6)
  nine = elastic.kept_layers(config, S(9, 4, 2))
  assert nine == (0, 1, 3, 4, 5, 7, 8, 10, 11)  # drops 2, 6, 9: spread over the interior
  for depth in range(2, 13):
    kept = elastic.kept_layers(config, S(depth, 4, 2))
    assert len(kept) == depth and kept[0] == 0 and kept[-1] == 11
  assert elastic.depth_choices(config) == (6, 9)
  assert elastic.kept_layers(tiny_config(), S(2, 4, 2)) == (0, 2)


def test_check_submodel_names_the_allowed_ranges(config):
  S = elastic.SubModel  # pylint: disable=invalid-name
  for sub in elastic.family(config):
    elastic.check_submodel(config, sub)
  ranges = r"allowed: depth 2..3 .*top_k 1..2 .*experts top_k..4"
  for sub, bad in ((S(3, 4, 3), "top_k=3"), (S(1, 4, 2), "depth=1"), (S(3, 5, 2), "experts=5"),
                   (S(3, 1, 2), "experts=1"), (S(4, 4, 0), "depth=4, top_k=0")):
    with pytest.raises(config_lib.ConfigError, match=rf"SubModel\({sub}\): {bad} is not "
                       rf"accepted; {ranges}"):
      elastic.check_submodel(config, sub)
  with pytest.raises(config_lib.ConfigError, match="top_k=1 is not accepted for masks"):
    elastic.masks_for(tiny_config(top_k=3), S(3, 4, 1))  # trained top-k: (2, 3)


@pytest.mark.parametrize("field,value,message", [
    ("depths", (1,), r"config.elastic.depths=\(1,\) is not accepted: expected distinct ints "
                     r"in 2..2 \(the first and last layers are always kept\)"),
    ("expert_counts", (1, 4), r"expected distinct ints in 2..3 \(each >= model.top_k\)"),
    ("top_ks", (2,), r"config.elastic.top_ks=\(2,\) .*in 1..1 \(below model.top_k\)"),
    ("full_depth_prob", 1.5, r"config.elastic.full_depth_prob=1.5 .*probability in \[0, 1\]"),
    ("sub_models", 0, r"config.elastic.sub_models=0 is not accepted: expected an int >= 1"),
    ("scheme", "random", r"config.elastic.scheme='random' is not accepted: expected one of "
                         r"\('prefix', 'paper'\)"),
])
def test_config_errors_name_the_field(field, value, message):
  config = tiny_config()
  config.elastic[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_config_rejects_a_family_without_sub_models():
  config = tiny_config()
  config.elastic.update(enabled=True, full_depth_prob=1.0, full_experts_prob=1.0,
                        full_top_k_prob=1.0)
  with pytest.raises(config_lib.ConfigError, match=r"elastic.full_\*_prob=\(1.0, 1.0, 1.0\) "
                     r".*at least one below 1"):
    config_lib.validate(config)
  config = tiny_config(num_experts=8)
  config.elastic.update(scheme="paper", expert_counts=(3, 4))
  config.mesh.expert = 2
  with pytest.raises(config_lib.ConfigError, match=r"elastic.expert_counts=\(3, 4\) .*multiples "
                     r"of mesh.expert=2"):
    config_lib.validate(config)
  config = tiny_config(num_layers=2, top_k=1)
  config.elastic.full_experts_prob = 1.0  # the only axis with choices never reduces
  with pytest.raises(config_lib.ConfigError, match="cannot draw a sub-model other than the full"):
    elastic.reduce_probs(config)


def test_enabled_config_derives_and_accepts_explicit_choices():
  config = tiny_config()
  config.elastic.update(enabled=True, sub_models=3, depths=(2,), expert_counts=(3, 2),
                        top_ks=(1,))
  config_lib.validate(config)
  assert elastic.expert_choices(config) == (2, 3)


def test_param_counts(config, model):
  full = elastic_export.param_counts(config, elastic.full_submodel(config))
  total = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  per_expert = 3 * 32 * 16
  assert full == {"total": total, "active_per_token": total - 2 * (4 - 2) * per_expert}
  small = elastic_export.param_counts(config, elastic.SubModel(2, 2, 1))
  # Drops one of the 2 MoE layers, 2 of 4 experts (+ their router columns) in the other,
  # and a token uses 1 of the 2 experts left.
  moe_layer = sum(int(x.size) for x in jax.tree.leaves(
      nnx.state(model.moe_layers, nnx.Param))) // 2
  assert small["total"] == total - moe_layer - 2 * per_expert - 2 * 32
  assert small["active_per_token"] == small["total"] - (2 - 1) * per_expert


# --- sampling ---------------------------------------------------------------------------


def test_sample_masks_never_draw_the_full_model_and_keep_the_documented_marginals(config):
  keys = jax.random.split(jax.random.key(0), 4000)
  masks = jax.jit(jax.vmap(lambda k: elastic.sample_masks(config, k)))(keys)
  assert masks.top_ks == (1, 2)
  depth = np.asarray(masks.layer_keep).sum(-1)
  experts = np.asarray(masks.expert_mask).sum(-1)
  top_k = np.asarray(masks.top_k)
  assert not np.any((depth == 3) & (experts == 4) & (top_k == 2))  # never the full model
  # Each axis reduced with q = 1 - full_*_prob, conditioned on "not full": q / 0.52.
  not_full = 1 - 0.75 * 0.8 * 0.8
  np.testing.assert_allclose(elastic.reduce_probs(config)[1:].sum(), 1.0)
  tol = 0.025  # ~3 standard errors at n = 4000
  assert abs(np.mean(depth == 2) - 0.25 / not_full) < tol
  assert abs(np.mean(experts < 4) - 0.2 / not_full) < tol
  assert abs(np.mean(top_k == 1) - 0.2 / not_full) < tol
  # Reduced: uniform over the choices (2 or 3 experts).
  assert abs(np.mean(experts == 2) - np.mean(experts == 3)) < tol
  assert abs(np.mean((depth == 2) & (experts < 4)) - 0.25 * 0.2 / not_full) < tol
  # "prefix": layer masks are the canonical ones, expert masks prefixes.
  np.testing.assert_array_equal(np.asarray(masks.layer_keep)[depth == 2][0], [True, False, True])
  em = np.asarray(masks.expert_mask)
  np.testing.assert_array_equal(em, np.arange(4)[None, :] < experts[:, None])


def test_paper_scheme_draws_random_layers_and_expert_subsets_per_shard():
  config = tiny_config(num_layers=5, num_experts=8)
  config.elastic.scheme = "paper"
  config.mesh.expert = 2
  config_lib.validate(config)
  assert elastic.expert_choices(config) == (4, 6) and elastic.depth_choices(config) == (2, 4)
  masks = jax.jit(jax.vmap(lambda k: elastic.sample_masks(config, k)))(
      jax.random.split(jax.random.key(2), 2000))
  keep, em = np.asarray(masks.layer_keep), np.asarray(masks.expert_mask)
  depth, experts = keep.sum(-1), em.sum(-1)
  assert keep[:, 0].all() and keep[:, -1].all()  # first and last always kept
  assert set(np.unique(depth)) == {2, 4, 5} and set(np.unique(experts)) == {4, 6, 8}
  assert len({tuple(row) for row in keep[depth == 4]}) == 3  # any one interior layer drops
  # Experts: as many on each of the 2 shards (4 experts each), a random subset.
  assert (em.reshape(-1, 2, 4).sum(-1) == experts[:, None] // 2).all()
  assert len({tuple(row) for row in em[experts == 4]}) > 8
  np.testing.assert_allclose(em[experts == 4].mean(0), 0.5, atol=0.1)  # no expert favoured
  # k uniform over ceil(k/2)..k-1 by default under "paper".
  prefix8 = tiny_config(num_experts=8, top_k=8)
  assert elastic.top_k_choices(prefix8) == (4, 6, 8)
  prefix8.elastic.scheme = "paper"
  assert elastic.top_k_choices(prefix8) == (4, 5, 6, 7, 8)


def test_masks_for_and_axis_without_choices():
  config = tiny_config(num_layers=2, top_k=1)  # no depth below 2, no top-k below 1
  assert elastic.depth_choices(config) == () and elastic.top_k_choices(config) == (1,)
  masks = jax.jit(jax.vmap(lambda k: elastic.sample_masks(config, k)))(
      jax.random.split(jax.random.key(1), 64))
  assert np.asarray(masks.layer_keep).all() and (np.asarray(masks.top_k) == 1).all()
  m = elastic.masks_for(tiny_config(), elastic.SubModel(2, 3, 1))
  np.testing.assert_array_equal(np.asarray(m.layer_keep), [True, False, True])
  np.testing.assert_array_equal(np.asarray(m.expert_mask), [True, True, True, False])
  assert int(m.top_k_index) == 0 and int(m.top_k) == 1


# --- the masked decoder -----------------------------------------------------------------


def test_full_masks_equal_the_plain_model(config, model, batch, forward):
  fn, state = forward
  logits, aux = nnx.jit(lambda m, b: m(*b))(model, batch)
  m_logits, m_aux = fn(state, batch, elastic.masks_for(config, elastic.full_submodel(config)))
  np.testing.assert_allclose(np.asarray(m_logits), np.asarray(logits), atol=1e-5, rtol=1e-5)
  for name in aux:
    np.testing.assert_allclose(np.asarray(m_aux[name]), np.asarray(aux[name]), atol=1e-5,
                               rtol=1e-5, err_msg=name)


def test_every_submodel_runs_in_one_compiled_program(config, batch, forward):
  fn, state = forward
  seen = {}
  for sub in elastic.family(config):
    logits, aux = fn(state, batch, elastic.masks_for(config, sub))
    seen[sub] = np.asarray(logits)
    load = np.asarray(aux["expert_load"])  # [moe_layers, experts]
    kept_moe = [i - 1 for i in elastic.kept_layers(config, sub) if i >= 1]
    for layer in range(2):
      # Skipped MoE layers report no load; kept ones route tokens * top_k slots, all to
      # the kept experts.
      want = BATCH * SEQ * sub.top_k if layer in kept_moe else 0
      assert load[layer].sum() == want and not load[layer, sub.experts:].any()
  assert fn._cache_size() == 1  # pylint: disable=protected-access
  subs = list(seen)
  assert all(not np.allclose(seen[subs[0]], seen[s]) for s in subs[1:])


def test_a_skipped_layer_is_the_identity(config, batch):
  unrolled = build(tiny_config(scan_layers=False), seed=2)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(BATCH, SEQ, 32)), jnp.float32)
  angles = unrolled.rope_angles(batch[1])
  routing = dict(expert_mask=jnp.ones(4, bool), top_k_index=jnp.asarray(1), top_ks=(1, 2))

  @nnx.jit
  def run(stack, x, keep):
    return stack(x, angles, batch[2], batch[3], keep=keep, **routing)
  y, stats = run(unrolled.moe_layers, x, jnp.array([False, False]))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  assert not np.asarray(stats["expert_load"]).any() and not np.asarray(stats["z_loss"]).any()
  # Layer 0 skipped: the stack is block 1 alone.
  y, stats = run(unrolled.moe_layers, x, jnp.array([False, True]))
  want, _ = nnx.jit(lambda b, x: b(x, angles, batch[2], batch[3]))(
      unrolled.moe_layers.layers[1], x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), atol=1e-6)
  assert np.asarray(stats["expert_load"])[1].sum() == BATCH * SEQ * 2


def test_masked_experts_are_never_routed_and_get_no_bias_update():
  rngs = nnx.Rngs(0)
  router = router_lib.Router(32, 6, 2, score="softmax", param_dtype=jnp.float32, rngs=rngs)
  router.bias[...] = jnp.array([0.0, 0.0, 5.0, 0.0, 0.0, 5.0])  # masked experts look best
  mask = jnp.array([True, True, False, True, True, False])
  x = jnp.asarray(np.random.default_rng(4).normal(size=(32, 32)), jnp.float32)
  out = nnx.jit(lambda r, x: r(x, expert_mask=mask))(router, x)
  ids = np.asarray(out.expert_ids)
  assert not np.isin(ids, [2, 5]).any() and len(np.unique(ids)) > 1
  np.testing.assert_allclose(np.asarray(out.combine_weights).sum(-1), 1.0, rtol=1e-6)
  # Softmax over the active experts only (the masked ones have -inf logits).
  logits = np.asarray(x, np.float64) @ np.asarray(router.kernel[...], np.float64)
  active = np.asarray(mask)
  p = np.exp(logits[:, active] - logits[:, active].max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  load = np.asarray(out.expert_load)
  assert load[~active].sum() == 0 and load.sum() == 32 * 2
  f = load[active] / (32 * 2)
  np.testing.assert_allclose(float(out.load_balance_loss), 4 * np.sum(f * p.mean(0)), rtol=1e-5)
  z = np.mean(np.log(np.exp(logits[:, active]).sum(-1)) ** 2)
  np.testing.assert_allclose(float(out.z_loss), z, rtol=1e-5)
  # The bias update leaves masked experts alone and balances against the active mean.
  bias = np.asarray(router.bias[...])
  new = np.asarray(router_lib.update_router_bias(router.bias[...], out.expert_load, 0.1, mask))
  np.testing.assert_array_equal(new[~active], bias[~active])
  mean = load[active].mean()
  np.testing.assert_allclose(new[active] - bias[active], 0.1 * np.sign(mean - load[active]),
                             atol=1e-6)


def test_router_selects_with_the_bias_only_at_full_width_and_top_k():
  router = router_lib.Router(32, 6, 2, score="softmax", param_dtype=jnp.float32,
                             rngs=nnx.Rngs(0))
  router.bias[...] = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0, 5.0])  # expert 5 always wins with it
  x = jnp.asarray(np.random.default_rng(4).normal(size=(32, 32)), jnp.float32)
  logits = router.logits(x)
  all_on = jnp.ones(6, bool)
  full = router.route(logits, 2, all_on)
  assert (np.asarray(full.expert_ids)[:, 0] == 5).all()
  scores = np.asarray(jax.nn.softmax(logits, -1))
  for k, mask in ((1, all_on), (2, all_on.at[0].set(False)), (1, all_on.at[0].set(False))):
    out = router.route(jnp.where(mask, logits, -jnp.inf), k, mask)
    want = np.argsort(-np.where(np.asarray(mask), scores, -np.inf), axis=-1)[:, :k]
    np.testing.assert_array_equal(np.asarray(out.expert_ids), want, err_msg=f"{k=}")


def test_bias_update_sums_pass_deviations():
  bias = jnp.zeros((2, 4))  # [layers, experts]
  load = jnp.array([[[5.0, 3.0, 4.0, 4.0], [4.0, 4.0, 4.0, 4.0]],  # pass 0: full
                    [[0.0, 0.0, 0.0, 0.0], [2.0, 6.0, 0.0, 0.0]]])  # 1: layer 0 skipped,
  active = jnp.array([[[True] * 4, [True] * 4],                     # 2 experts
                      [[False] * 4, [True, True, False, False]]])
  new = np.asarray(router_lib.update_router_bias(bias, load, 1.0, active))
  # Layer 0: pass 0 alone. Layer 1: only pass 1 deviates (mean 4 of 2, 6).
  np.testing.assert_array_equal(new, [[-1.0, 1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]])
  # Without elastic passes: the plain rule.
  np.testing.assert_array_equal(
      np.asarray(router_lib.update_router_bias(bias, load[0], 1.0)), new * [[1], [0]])


def test_decoder_bias_update_with_active_masks(config):
  model = build(config, seed=5)
  before = np.asarray(model.moe_layers.layers.ffn.router.bias[...])  # [moe_layers, experts]
  load = jnp.array([[[1.0, 2.0, 3.0, 10.0], [3.0, 3.0, 3.0, 3.0]]])  # [passes, layers, E]
  active = jnp.array([[[True, True, True, False], [True] * 4]])
  model.update_router_bias(load, 0.5, active)
  delta = np.asarray(model.moe_layers.layers.ffn.router.bias[...]) - before
  np.testing.assert_allclose(delta, [[0.5, 0.0, -0.5, 0.0], [0.0] * 4], atol=1e-6)


def test_masks_of_another_model_shape_are_rejected(config, model, batch):
  masks = elastic.masks_for(tiny_config(num_layers=4), elastic.SubModel(4, 4, 2))
  with pytest.raises(ValueError, match=r"elastic.layer_keep.shape=\(4,\) is not accepted: "
                     r"expected \(3,\)"):
    jax.eval_shape(lambda: model(*batch, elastic=masks))
  masks = dataclasses.replace(elastic.masks_for(config, elastic.full_submodel(config)),
                              expert_mask=jnp.ones(5, bool))
  with pytest.raises(ValueError, match=r"elastic.expert_mask.shape=\(5,\)"):
    jax.eval_shape(lambda: model(*batch, elastic=masks))
