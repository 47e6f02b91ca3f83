"""Tests of the objective's model parts: audio input sum, audio heads, MTP modules, LossEMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax import input_pipeline
from ernie5_jax.model import Decoder
from ernie5_jax.model.heads import NUM_MODALITIES, LossEMA
from ernie5_jax.model.rope import text_positions

B, S, V, K, C = 2, 8, 64, 3, 8  # batch, seq, vocab, audio levels, audio codebook


def tiny_model_config():
  cfg = config_lib.default_config()
  cfg.model.update(dict(
      vocab_size=V, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      rope_sections=(2, 1, 1), num_dense_layers=1, dense_hidden=48, num_experts=4,
      num_shared_experts=0, expert_hidden=16, top_k=2, audio_levels=K, audio_codebook_size=C,
      audio_head_hidden=16))
  cfg.objective.audio_level_weights = (1.0,) * (K - 1)
  config_lib.validate(cfg)
  return cfg.model


@pytest.fixture(scope="module")
def model():
  """Decoder with 1 MTP module; numpy parameters (no init kernels to compile)."""
  abstract = nnx.eval_shape(lambda: Decoder(tiny_model_config(), mtp_depth=1, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), params)
  rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
  return nnx.merge(graphdef, params, rest)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
  codes = np.full((B, S, K), -1, np.int32)
  codes[:, 2:6] = rng.integers(0, C, (B, 4, K))  # positions 2..5 are audio frames
  return dict(tokens=tokens, positions=text_positions(B, S),
              segment_ids=jnp.ones((B, S), jnp.int32), group_ids=jnp.zeros((B, S), jnp.int32),
              audio_codes=jnp.asarray(codes))


@nnx.jit
def forward(model, tokens, positions, segment_ids, group_ids, audio_codes):
  hidden, _ = model.hidden_states(tokens, positions, segment_ids, group_ids, audio_codes)
  return model.logits(hidden), hidden


def test_audio_input_sum_adds_levels_2_to_k(model, inputs):
  codes = inputs["audio_codes"]
  table = np.asarray(model.audio.code_embed.table[...])  # [(K - 1) * C, embed]
  want = np.zeros((B, S, table.shape[1]))
  c = np.asarray(codes)
  for b in range(B):
    for s in range(S):
      for k in range(1, K):  # levels 2..K: rows (k - 1) * C + code
        if c[b, s, k] >= 0:
          want[b, s] += table[(k - 1) * C + c[b, s, k]] * np.sqrt(table.shape[1])
  np.testing.assert_allclose(np.asarray(model.audio.input_sum(codes)), want, rtol=1e-5,
                             atol=1e-6)


def test_audio_codes_reach_only_their_position_and_later(model, inputs):
  base, _ = forward(model, **inputs)
  none, _ = forward(model, **dict(inputs, audio_codes=jnp.full((B, S, K), -1, jnp.int32)))
  plain = model(inputs["tokens"], inputs["positions"], inputs["segment_ids"],
                inputs["group_ids"])[0]
  np.testing.assert_allclose(np.asarray(none), np.asarray(plain), rtol=1e-5, atol=1e-5)
  codes = inputs["audio_codes"].at[:, 3, 1].set((inputs["audio_codes"][:, 3, 1] + 1) % C)
  moved, _ = forward(model, **dict(inputs, audio_codes=codes))
  np.testing.assert_allclose(np.asarray(moved[:, :3]), np.asarray(base[:, :3]), rtol=1e-5,
                             atol=1e-5)  # causal: earlier positions unchanged
  assert not np.allclose(np.asarray(moved[:, 3]), np.asarray(base[:, 3]))


def test_audio_heads_are_teacher_forced_on_earlier_levels(model, inputs):
  _, hidden = forward(model, **inputs)
  targets = inputs["tokens"]
  audio_targets = inputs["audio_codes"]
  heads = nnx.jit(lambda m, h, t, a: m.audio_logits(h, t, a))
  logits = heads(model, hidden, targets, audio_targets)
  assert logits.shape == (B, S, K - 1, C) and logits.dtype == jnp.float32
  # Changing the level-2 target changes the level-3 head only (it reads levels 1..2).
  bumped = audio_targets.at[..., 1].set((audio_targets[..., 1] + 1) % C)
  moved = heads(model, hidden, targets, bumped)
  np.testing.assert_allclose(np.asarray(moved[..., 0, :]), np.asarray(logits[..., 0, :]),
                             rtol=1e-6)
  assert not np.allclose(np.asarray(moved[:, 2:6, 1]), np.asarray(logits[:, 2:6, 1]))
  # Changing the level-1 target (a vocabulary token) changes every level's head.
  moved = heads(model, hidden, (targets + 1) % V, audio_targets)
  assert not np.allclose(np.asarray(moved[..., 0, :]), np.asarray(logits[..., 0, :]))


def test_mtp_depth1_reads_the_token_one_ahead(model, inputs):
  mtp = nnx.jit(lambda m, h, t, p, s, g: m.mtp_logits(h, t, p, s, g))
  _, hidden = forward(model, **inputs)
  args = (inputs["positions"], inputs["segment_ids"], inputs["group_ids"])
  (logits,) = mtp(model, hidden, inputs["tokens"], *args)
  assert logits.shape == (B, S, V)
  # Position p combines h_p with Emb(t_{p+1}): changing t_4 moves MTP logits at p >= 3 only.
  tokens = inputs["tokens"].at[:, 4].set((inputs["tokens"][:, 4] + 1) % V)
  (moved,) = mtp(model, hidden, tokens, *args)
  np.testing.assert_allclose(np.asarray(moved[:, :3]), np.asarray(logits[:, :3]), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(np.asarray(moved[:, 3]), np.asarray(logits[:, 3]))


def test_loss_ema_is_non_trainable_state(model):
  assert NUM_MODALITIES == len(input_pipeline.MODALITIES)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  (ema,) = jax.tree.leaves(rest.filter(LossEMA))
  assert ema.shape == (NUM_MODALITIES,)
  assert not jax.tree.leaves(params.filter(LossEMA))
