"""The objective (ernie5_jax/train/objective.py) against naive references on a hand-built batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax.input_pipeline import sequence as S
from ernie5_jax.model import Decoder
from ernie5_jax.train import objective

LAYOUT = S.VocabularyLayout(text_size=20, image_scales=(1, 2), image_codebook_size=4,
                            audio_levels=3, audio_codebook_size=8)
SEQ = 24
TEXT, IMAGE, AUDIO = int(S.Modality.TEXT), int(S.Modality.IMAGE), int(S.Modality.AUDIO)
LEVEL_WEIGHTS = (0.5, 0.25)
MTP_WEIGHT = 0.3


def _pack(docs):
  """Concatenates documents into one row of SEQ positions (segment ids 1, 2, ...)."""
  row = {k: np.concatenate([d[k] for d in docs]) for k in docs[0]}
  row["segment_ids"] = np.concatenate([np.full(len(d["tokens"]), i + 1, np.int32)
                                       for i, d in enumerate(docs)])
  pad = SEQ - len(row["tokens"])
  assert pad >= 0
  for k, v in row.items():
    fill = -1 if k.startswith("audio") else 0
    row[k] = np.concatenate([v, np.full((pad,) + v.shape[1:], fill, v.dtype)])
  row["group_ids"] = S.unique_groups(row["group_ids"], row["segment_ids"])
  return row


def _batch():
  rng = np.random.default_rng(0)
  text = lambda n: rng.integers(2, LAYOUT.text_size, n)
  image = [rng.integers(0, 4, (1, 1)), rng.integers(0, 4, (2, 2))]
  audio = rng.integers(0, 8, (4, 3))
  w = lambda: S.DocumentWriter(LAYOUT)
  row0 = _pack([w().text(text(5)).finish(),
                w().text(text(3)).vision([image], S.Modality.IMAGE, generate=True).finish()])
  row1 = _pack([w().text(text(3)).audio(audio).finish(), w().text(text(4)).finish()])
  return {k: np.stack([row0[k], row1[k]]) for k in row0}


def _config(weighting):
  config = config_lib.default_config()
  config.model.update(dict(
      vocab_size=LAYOUT.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=8, rope_sections=(2, 1, 1), num_dense_layers=1, dense_hidden=48, num_experts=4,
      num_shared_experts=0, expert_hidden=16, top_k=2, audio_levels=3, audio_codebook_size=8,
      audio_head_hidden=16))
  config.data.update(source="synthetic", num_modalities=2)
  config.objective.update(mtp_depth=1, mtp_weight=MTP_WEIGHT, audio_level_weights=LEVEL_WEIGHTS,
                          loss_weighting=weighting, loss_ema_decay=0.9)
  config_lib.validate(config)
  return config


@pytest.fixture(scope="module")
def model():
  abstract = nnx.eval_shape(lambda: Decoder(_config("posterior").model, mtp_depth=1,
                                            rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), params)
  rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), rest)
  m = nnx.merge(graphdef, params, rest)
  m.loss_ema[...] = jnp.array([2.0, 0.0, 0.0, 50.0])  # text seen before, image first sight
  return m


def _nll(logits, labels):
  """-log softmax(logits)[label] and top-1 hit, float64: [..., V], [...] -> [...], [...]."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  nll = logz - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  return nll, (logits.argmax(-1) == labels).astype(np.float64)


def _mean(x, mask):
  return float((x * mask).sum() / max(mask.sum(), 1.0))


def test_posterior_weights_formula_and_ema_update():
  ema = jnp.array([0.0, 2.0, 4.0, 3.0])
  losses = jnp.array([1.0, 4.0, 2.0, 9.0])
  shares = jnp.array([0.5, 0.25, 0.25, 0.0])  # modality 3 absent from the batch
  new, weights = objective.posterior_weights(ema, losses, shares, decay=0.5)
  # first sight -> the loss itself; seen -> 0.5 e + 0.5 L; absent -> unchanged
  np.testing.assert_allclose(np.asarray(new), [1.0, 3.0, 3.0, 3.0])
  e_bar = 0.5 * 1.0 + 0.25 * 3.0 + 0.25 * 3.0
  np.testing.assert_allclose(np.asarray(weights), [e_bar / 1.0, e_bar / 3.0, e_bar / 3.0, 0.0])
  # The weights are constants for the gradient: d total / d L_m = pi_m w_m.
  grad = jax.grad(lambda l: jnp.sum(shares * objective.posterior_weights(
      ema, l, shares, decay=0.5)[1] * l))(losses)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(shares * weights), rtol=1e-6)


def test_mtp_labels_mask_segments_and_non_text():
  b = _batch()
  labels, mask = (np.asarray(x) for x in objective.mtp_labels(b, 1))
  tok, tgt, seg, mod, lm = (b[k] for k in ("tokens", "targets", "segment_ids", "modality",
                                            "loss_mask"))
  want = np.zeros_like(mask)
  for r in range(tok.shape[0]):
    for p in range(SEQ - 1):
      want[r, p] = (lm[r, p] > 0 and lm[r, p + 1] > 0 and seg[r, p] == seg[r, p + 1] > 0
                    and tgt[r, p] == tok[r, p + 1] and mod[r, p] == TEXT
                    and mod[r, p + 1] == TEXT)
  np.testing.assert_array_equal(mask, want)
  np.testing.assert_array_equal(labels[:, :-1][want[:, :-1] > 0], tgt[:, 1:][want[:, :-1] > 0])
  # Row 0: text doc 1 (positions 0..4, 4 predicts EOS): 3 predicts that EOS two ahead; 4
  # would cross into segment 2.
  np.testing.assert_array_equal(mask[0, :5], [1, 1, 1, 1, 0])
  assert labels[0, 3] == LAYOUT.eos_id
  assert mask[1][b["modality"][1] == AUDIO].sum() == 0


@pytest.mark.parametrize("weighting", ["posterior", "uniform"])
def test_compute_loss_matches_naive_reference(model, weighting):
  config = _config(weighting)
  b = _batch()
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  loss, (metrics, aux) = nnx.jit(functools.partial(objective.compute_loss, config=config))(
      model, batch)

  # Naive reference from the model's own outputs.
  hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                  batch["group_ids"], batch["audio_codes"])
  logits = model.logits(hidden)
  (mtp_logits,) = model.mtp_logits(hidden, batch["tokens"], batch["positions"],
                                   batch["segment_ids"], batch["group_ids"])
  level_logits = model.audio_logits(hidden, batch["targets"], batch["audio_targets"])
  assert level_logits.shape == (2, SEQ, 2, 8)  # teacher-forced heads of levels 2, 3
  mask, mod = b["loss_mask"], b["modality"]
  nll, hit = _nll(logits, b["targets"])
  counts = np.array([(mask * (mod == m)).sum() for m in range(4)])
  main = np.array([_mean(nll, mask * (mod == m)) for m in range(4)])
  assert counts[TEXT] > 0 and counts[IMAGE] > 0 and counts[AUDIO] > 0 and counts[2] == 0
  labels, mtp_mask = (np.asarray(x) for x in objective.mtp_labels(b, 1))
  mtp_nll, mtp_hit = _nll(mtp_logits, labels)
  mtp = _mean(mtp_nll, mtp_mask)
  levels = []
  for i in range(2):
    l_mask = mask * (b["audio_targets"][..., i + 1] >= 0)
    l_nll, l_hit = _nll(level_logits[..., i, :], np.maximum(b["audio_targets"][..., i + 1], 0))
    levels.append(_mean(l_nll, l_mask))
    np.testing.assert_allclose(float(metrics[f"loss/audio_level{i + 2}"]), levels[-1], rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"accuracy/audio_level{i + 2}"]),
                               _mean(l_hit, l_mask), rtol=1e-5)
    assert float(metrics[f"tokens/audio_level{i + 2}"]) == l_mask.sum() == 4  # 4 frames
  per_modality = main.copy()
  per_modality[TEXT] += MTP_WEIGHT * mtp
  per_modality[AUDIO] += LEVEL_WEIGHTS[0] * levels[0] + LEVEL_WEIGHTS[1] * levels[1]
  shares = counts / counts.sum()
  if weighting == "posterior":
    old = np.array([2.0, 0.0, 0.0, 50.0])
    ema = np.where(old > 0, 0.9 * old + 0.1 * per_modality, per_modality)
    ema = np.where(counts > 0, ema, old)
    weights = np.where(counts > 0, (shares * ema).sum() / np.where(counts > 0, ema, 1.0), 0.0)
    np.testing.assert_allclose(np.asarray(aux["loss_ema"]), ema, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_ema/text"]), ema[TEXT], rtol=1e-5)
  else:
    weights = (counts > 0).astype(np.float64)
  total = float((shares * weights * per_modality).sum())
  np.testing.assert_allclose(float(loss), total, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), total, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce_loss"]), _mean(nll, mask), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss/text_mtp1"]), mtp, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy/text_mtp1"]), _mean(mtp_hit, mtp_mask),
                             rtol=1e-5)
  for m, name in enumerate(objective.metric_modalities(config)):  # text, image (synthetic: 2)
    np.testing.assert_allclose(float(metrics[f"loss/{name}"]), main[m], rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"accuracy/{name}"]),
                               _mean(hit, mask * (mod == m)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f"loss_weight/{name}"]), weights[m], rtol=1e-5)


def test_cross_entropy_and_hit_match_optax_and_argmax():
  # The fused CE (one max, one exp-sum, a one-pass backward) against optax's CE and an argmax.
  logits = jax.random.normal(jax.random.key(3), (4, 6, 50)) * 3.0  # [batch, seq, vocab]
  labels = jax.random.randint(jax.random.key(4), (4, 6), 0, 50)
  labels = labels.at[0, :3].set(jnp.argmax(logits[0, :3], axis=-1))  # some hits for sure
  weights = jax.random.uniform(jax.random.key(5), (4, 6))
  ce, hit = objective.cross_entropy_and_hit(logits, labels)
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(ce, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(hit, (jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  assert float(jnp.sum(hit)) >= 3
  grad = jax.grad(lambda l: jnp.sum(objective.cross_entropy(l, labels) * weights))(logits)
  grad_ref = jax.grad(lambda l: jnp.sum(
      optax.softmax_cross_entropy_with_integer_labels(l, labels) * weights))(logits)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-7)
