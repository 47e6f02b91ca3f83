"""Tests for the Decoder: shapes, scan == unrolled (+ remat), masks, axis names, variants."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax.model import Decoder, RouterBias, VARIANTS, apply_variant
from ernie5_jax.model.rope import text_positions

BATCH, SEQ = 2, 8


def tiny_model_config(**overrides):
  cfg = config_lib.default_config()
  cfg.model.update(dict(
      vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
      rope_sections=(2, 1, 1), num_dense_layers=1, dense_hidden=48, num_experts=4,
      num_shared_experts=1, expert_hidden=16, top_k=2))
  cfg.model.update(overrides)
  config_lib.validate(cfg)
  return cfg.model


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 64, size=(BATCH, SEQ)), jnp.int32)
  segments = jnp.ones((BATCH, SEQ), jnp.int32)
  groups = jnp.zeros((BATCH, SEQ), jnp.int32)
  return tokens, text_positions(BATCH, SEQ), segments, groups


def build(model_cfg, seed=0):
  """A Decoder whose parameters come from numpy (RouterBias zeros).

  Real init compiles one XLA random kernel per distinct parameter shape (~0.3 s each on
  this CPU); numpy values keep the module-level tests fast. test_real_init covers init.
  """
  abstract = nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), params)
  rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
  return nnx.merge(graphdef, params, rest)


@nnx.jit
def forward(model, tokens, positions, segments, groups):
  return model(tokens, positions, segments, groups)


@pytest.fixture(scope="module")
def scanned():
  return build(tiny_model_config())


@pytest.fixture(scope="module")
def batch():
  return make_batch()


def test_forward_shapes_and_aux(scanned, batch):
  logits, aux = forward(scanned, *batch)
  assert logits.shape == (BATCH, SEQ, 64) and logits.dtype == jnp.float32
  assert set(aux) == {"expert_load", "router_entropy", "load_balance_loss", "z_loss",
                      "expert_ids", "token_entropy"}
  assert aux["expert_load"].shape == (2, 4) and aux["router_entropy"].shape == (2,)
  # Per-token routing entropy [L_moe, batch, seq]; its mean over tokens is router_entropy.
  assert aux["token_entropy"].shape == (2, BATCH, SEQ)
  np.testing.assert_allclose(np.asarray(aux["token_entropy"]).mean(axis=(1, 2)),
                             np.asarray(aux["router_entropy"]), rtol=1e-5)
  assert aux["load_balance_loss"].shape == () and aux["z_loss"].shape == ()
  np.testing.assert_allclose(np.asarray(aux["expert_load"]).sum(-1), BATCH * SEQ * 2)
  assert np.all(np.isfinite(np.asarray(logits)))


def unstack_into(unrolled_stack, stacked_stack):
  """Copies layer i of a stacked BlockStack's state into block i of an unrolled one."""
  state = nnx.state(stacked_stack.layers)
  for i, block in enumerate(unrolled_stack.layers):
    layer_state = jax.tree.map(lambda a: a[i], state)
    nnx.update(block, layer_state)


def test_scan_matches_unrolled(scanned, batch):
  """Same parameters (copied from the stacked state) give the same logits and aux."""
  unrolled = build(tiny_model_config(scan_layers=False), seed=1)
  load = jnp.asarray([[1.0, 5.0, 2.0, 8.0], [4.0, 4.0, 4.0, 4.0]])
  scanned.update_router_bias(load, 0.5)  # nonzero biases take part in the comparison
  nnx.update(unrolled.embed, nnx.state(scanned.embed))
  nnx.update(unrolled.final_norm, nnx.state(scanned.final_norm))
  unstack_into(unrolled.dense_layers, scanned.dense_layers)
  unstack_into(unrolled.moe_layers, scanned.moe_layers)
  np.testing.assert_array_equal(np.asarray(unrolled.moe_layers.layers[0].ffn.router.bias[...]),
                                [0.5, -0.5, 0.5, -0.5])
  logits_s, aux_s = forward(scanned, *batch)
  logits_u, aux_u = forward(unrolled, *batch)
  np.testing.assert_allclose(np.asarray(logits_u), np.asarray(logits_s), rtol=1e-5, atol=1e-5)
  for name in aux_s:
    np.testing.assert_allclose(np.asarray(aux_u[name]), np.asarray(aux_s[name]), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  # The same bias update applied to both layouts keeps them equal; equal load: no change.
  scanned.update_router_bias(load, 0.5)
  unrolled.update_router_bias(load, 0.5)
  for i in range(2):
    np.testing.assert_array_equal(
        np.asarray(unrolled.moe_layers.layers[i].ffn.router.bias[...]),
        np.asarray(scanned.moe_layers.layers.ffn.router.bias[...][i]))
  np.testing.assert_array_equal(np.asarray(scanned.moe_layers.layers.ffn.router.bias[...][1]),
                                np.zeros(4))
  nnx.update(scanned, jax.tree.map(jnp.zeros_like, nnx.state(scanned, RouterBias)))


def grad_jaxpr(model, batch):
  """The jaxpr of d(loss)/d(params): traces the whole backward pass without compiling."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest):
    logits, aux = nnx.merge(graphdef, params, rest)(*batch)
    return jnp.sum(logits) + aux["load_balance_loss"] + aux["z_loss"]
  return str(jax.make_jaxpr(jax.grad(loss))(params, rest))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_wraps_each_block(batch, scan_layers):
  plain = grad_jaxpr(build(tiny_model_config(scan_layers=scan_layers)), batch)
  remat = grad_jaxpr(build(tiny_model_config(scan_layers=scan_layers, remat=True)), batch)
  remat_ops = lambda jaxpr: len(re.findall(r"\b(?:checkpoint|remat2?)\[", jaxpr))
  assert remat_ops(plain) == 0
  # Scanned: one rematerialised body per stack (dense, MoE); unrolled: one per block.
  assert remat_ops(remat) == (2 if scan_layers else 3)


def test_causal_packing_and_groups(scanned, batch):
  tokens, positions, segments, groups = batch
  base, _ = forward(scanned, tokens, positions, segments, groups)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 64)
  # Causal: earlier positions cannot see position 5.
  out, _ = forward(scanned, changed, positions, segments, groups)
  np.testing.assert_allclose(np.asarray(out[:, :5]), np.asarray(base[:, :5]), atol=1e-6)
  assert not np.allclose(np.asarray(out[:, 5]), np.asarray(base[:, 5]))
  # Group 2..5 is bidirectional: position 2 now sees position 5, position 1 still does not.
  grouped = groups.at[:, 2:6].set(7)
  base_g, _ = forward(scanned, tokens, positions, segments, grouped)
  out_g, _ = forward(scanned, changed, positions, segments, grouped)
  np.testing.assert_allclose(np.asarray(out_g[:, :2]), np.asarray(base_g[:, :2]), atol=1e-6)
  assert not np.allclose(np.asarray(out_g[:, 2]), np.asarray(base_g[:, 2]))
  # Packing: segment 2 (positions 3..7, restarting at 0) ignores segment 1's tokens.
  packed_seg = jnp.asarray([[1] * 3 + [2] * 5] * BATCH, jnp.int32)
  packed_pos = text_positions(BATCH, SEQ).at[:, 3:].add(-3)
  other = tokens.at[:, :3].set((tokens[:, :3] + 3) % 64)
  a, _ = forward(scanned, tokens, packed_pos, packed_seg, groups)
  b, _ = forward(scanned, other, packed_pos, packed_seg, groups)
  np.testing.assert_allclose(np.asarray(a[:, 3:]), np.asarray(b[:, 3:]), atol=1e-5)


def test_every_param_has_logical_axis_names(scanned):
  names = {}
  for path, var in nnx.to_flat_state(nnx.state(scanned)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var[...].ndim, (path, axes)
    names[path] = axes
    if "layers" in path:
      assert axes[0] == "layers", (path, axes)
  assert names[("embed", "table")] == ("vocab", "embed")
  moe = ("moe_layers", "layers")
  assert names[moe + ("attn", "wq")] == ("layers", "embed", "q_heads", "head_dim")
  assert names[moe + ("attn", "wk")] == ("layers", "embed", "kv_heads", "head_dim")
  assert names[moe + ("attn", "wo")] == ("layers", "q_heads", "head_dim", "embed")
  assert names[moe + ("ffn", "experts", "w_up")] == ("layers", "expert", "embed", "expert_mlp")
  assert names[moe + ("ffn", "router", "kernel")] == ("layers", "embed", "expert")
  assert names[moe + ("ffn", "router", "bias")] == ("layers", "expert")
  assert names[("dense_layers", "layers", "ffn", "w_gate")] == ("layers", "embed", "mlp")
  assert scanned.moe_layers.layers.ffn.router.bias.shape == (2, 4)  # [L_moe, E]


def test_untied_bfloat16_and_dense_only():
  cfg = tiny_model_config(tie_embeddings=False, dtype="bfloat16", param_dtype="bfloat16",
                          num_layers=1, num_dense_layers=1)
  model = build(cfg)
  assert model.moe_layers is None
  assert model.head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")
  assert model.head.kernel[...].dtype == jnp.bfloat16
  logits, aux = forward(model, *make_batch())
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
  assert aux["expert_load"].shape == (0, 4) and float(aux["load_balance_loss"]) == 0.0


def test_real_init():
  """Init scales: embedding N(0, 1/d), kernels N(0, 1/fan_in), norms 1, router bias 0."""
  cfg = tiny_model_config(num_layers=2, num_dense_layers=0, num_shared_experts=0,
                          vocab_size=256, d_model=64, head_dim=16, rope_sections=(4, 2, 2),
                          num_experts=8)
  # "rbg" keys: XLA:CPU compiles their random kernels ~4x faster than threefry's.
  model = Decoder(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  layers = model.moe_layers.layers
  std = lambda v: float(jnp.std(v[...]))
  np.testing.assert_allclose(std(model.embed.table), 64 ** -0.5, rtol=0.1)
  np.testing.assert_allclose(std(layers.attn.wq), 64 ** -0.5, rtol=0.1)
  np.testing.assert_allclose(std(layers.attn.wo), 64 ** -0.5, rtol=0.1)
  np.testing.assert_allclose(std(layers.ffn.experts.w_down), 16 ** -0.5, rtol=0.1)
  np.testing.assert_array_equal(np.asarray(layers.attn_norm.scale[...]), np.ones((2, 64)))
  np.testing.assert_array_equal(np.asarray(layers.ffn.router.bias[...]), np.zeros((2, 8)))
  wq = np.asarray(layers.attn.wq[...])
  assert not np.allclose(wq[0], wq[1])  # each stacked layer has its own init key


def test_variants_validate_and_unknown_raises():
  for name in VARIANTS:
    cfg = config_lib.default_config()
    apply_variant(cfg.model, name)
    config_lib.validate(cfg)
    assert cfg.model.d_model == VARIANTS[name]["d_model"]
  with pytest.raises(ValueError, match="variant='XL'.*'tiny', 'S', 'B'"):
    apply_variant(config_lib.default_config().model, "XL")


def test_1t_a32_parameter_counts():
  """The flagship variant has ~1e12 total and ~3.2e10 active parameters (abstract init)."""
  cfg = apply_variant(config_lib.default_config().model, "1T-A32")
  shapes = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  total = sum(v.size for _, v in nnx.to_flat_state(nnx.state(shapes, nnx.Param)))
  moe_layers = cfg.num_layers - cfg.num_dense_layers
  inactive = (cfg.num_experts - cfg.top_k) * 3 * cfg.d_model * cfg.expert_hidden * moe_layers
  assert 0.95e12 < total < 1.05e12, total
  assert 3.0e10 < total - inactive < 3.4e10, total - inactive
