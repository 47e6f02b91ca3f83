"""Routing record + replay in the Decoder (model/router.py, moe.py, decoder.py; issue 8).

Reference: the plain forward of the same model. Replaying its own recorded ids must
reproduce it; replaying other ids must route with exactly those ids.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax.model import apply_variant
from ernie5_jax.model import elastic as elastic_lib
from ernie5_jax.model.moe import MoE
from ernie5_jax.model.rope import text_positions

BATCH, SEQ, VOCAB = 2, 8, 64


def _config():
  cfg = config_lib.default_config()
  apply_variant(cfg.model, "tiny")  # 2 MoE layers, 8 experts, top-2 (scanned).
  cfg.model.vocab_size = VOCAB
  config_lib.validate(cfg)
  return cfg


@pytest.fixture(scope="module")
def cfg():
  return _config()


@pytest.fixture(scope="module")
def model(cfg, numpy_decoder):
  return numpy_decoder(cfg.model)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, SEQ)), jnp.int32)
  return (tokens, text_positions(BATCH, SEQ), jnp.ones((BATCH, SEQ), jnp.int32),
          jnp.zeros((BATCH, SEQ), jnp.int32))


@nnx.jit
def forward(model, batch, replay):
  return model(*batch, routing_replay=replay)


@nnx.jit
def forward_elastic(model, batch, masks, replay):
  return model(*batch, elastic=masks, routing_replay=replay)


@pytest.fixture(scope="module")
def plain(model, batch):
  return forward(model, batch, None)


def test_aux_records_expert_ids(plain):
  _, aux = plain
  ids = np.asarray(aux["expert_ids"])
  assert ids.shape == (2, BATCH, SEQ, 2) and ids.dtype == np.int32
  assert ids.min() >= 0 and ids.max() < 8
  assert np.all(ids[..., 0] != ids[..., 1])  # Top-k picks distinct experts.
  # The recorded ids are what expert_load counts.
  load = np.stack([np.bincount(ids[l].reshape(-1), minlength=8) for l in range(2)])
  np.testing.assert_array_equal(load, np.asarray(aux["expert_load"]))


def test_replay_own_ids_reproduces_forward(model, batch, plain):
  logits, aux = plain
  replayed, aux_r = forward(model, batch, aux["expert_ids"])
  np.testing.assert_allclose(np.asarray(replayed), np.asarray(logits), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux_r["expert_ids"]), np.asarray(aux["expert_ids"]))
  np.testing.assert_allclose(float(aux_r["load_balance_loss"]), float(aux["load_balance_loss"]),
                             rtol=1e-6)


def test_replay_other_ids_routes_with_them(model, batch, plain):
  logits, aux = plain
  other = (aux["expert_ids"] + 3) % 8  # Still distinct within each row.
  replayed, aux_r = forward(model, batch, other)
  np.testing.assert_array_equal(np.asarray(aux_r["expert_ids"]), np.asarray(other))
  assert float(jnp.max(jnp.abs(replayed - logits))) > 1e-3


def test_negative_rows_route_live(model, batch, plain):
  logits, aux = plain
  ids = np.asarray(aux["expert_ids"]).copy()
  other = (ids + 3) % 8
  other[:, 0] = -1  # Batch row 0 not recorded: routed live.
  _, aux_r = forward(model, batch, jnp.asarray(other))
  got = np.asarray(aux_r["expert_ids"])
  np.testing.assert_array_equal(got[:, 0], ids[:, 0])
  np.testing.assert_array_equal(got[:, 1], other[:, 1])


def test_router_gets_gradient_under_replay(cfg):
  """One MoE layer (cheaper to differentiate than the decoder) routed with replayed ids."""
  abstract = nnx.eval_shape(lambda: MoE(cfg.model, dtype=jnp.float32, param_dtype=jnp.float32,
                                        rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), params)
  moe = nnx.merge(graphdef, params, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest))
  x = jnp.asarray(rng.normal(size=(BATCH, SEQ, cfg.model.d_model)), jnp.float32)
  replay = jnp.asarray(rng.permuted(np.tile(np.arange(8), (BATCH, SEQ, 1)), axis=-1)[..., :2],
                       jnp.int32)
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def loss(moe):
    y, stats = moe(x, replay_ids=replay)
    return jnp.sum(y * weights), stats  # No aux loss: only the combine weights reach the router.

  grads, stats = nnx.jit(nnx.grad(loss, has_aux=True))(moe)
  np.testing.assert_array_equal(np.asarray(stats["expert_ids"]), np.asarray(replay))
  assert np.abs(np.asarray(grads.router.kernel[...])).max() > 0


@pytest.mark.parametrize("shape", [(1, BATCH, SEQ, 2), (2, BATCH, SEQ, 1), (2, BATCH, SEQ + 1, 2),
                                   (2, BATCH + 1, SEQ, 2), (2, BATCH, SEQ)])
def test_replay_shape_errors(model, batch, shape):
  with pytest.raises(ValueError, match=r"routing_replay\.shape=.*expected \(2, 2, 8, 2\)"):
    model(*batch, routing_replay=jnp.zeros(shape, jnp.int32))


def test_replay_dtype_error(model, batch):
  with pytest.raises(ValueError, match="routing_replay.dtype=float32"):
    model(*batch, routing_replay=jnp.zeros((2, BATCH, SEQ, 2), jnp.float32))


def test_elastic_record_and_replay(cfg, model, batch):
  """A sub-model (4 experts, top-1) records -1 past its top-k; replaying that record under
  the same masks reproduces its forward."""
  masks = elastic_lib.masks_for(cfg, elastic_lib.SubModel(depth=2, experts=4, top_k=1))
  live = jnp.full((2, BATCH, SEQ, 2), -1, jnp.int32)  # Nothing recorded: routes live (one compile).
  logits, aux = forward_elastic(model, batch, masks, live)
  ids = np.asarray(aux["expert_ids"])
  assert np.all(ids[..., 1] == -1) and ids[..., 0].min() >= 0 and ids[..., 0].max() < 4
  replayed, aux_r = forward_elastic(model, batch, masks, aux["expert_ids"])
  np.testing.assert_array_equal(np.asarray(aux_r["expert_ids"]), ids)
  np.testing.assert_allclose(np.asarray(replayed), np.asarray(logits), rtol=1e-6, atol=1e-6)
