"""KV-cache decoding (ernie5_jax/generate): cached == uncached logits; task layouts == training's.

References: the Decoder's own full forward on the whole document (f32), and the document
`sequence.DocumentWriter` writes from the generated codes (what training would see).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax.eval.samples import decode_tokens_per_sec
from ernie5_jax.generate import decode, loops
from ernie5_jax.input_pipeline import prompts as prompt_lib
from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.model import Decoder

LAYOUT = seq_lib.VocabularyLayout(text_size=32, image_scales=(1, 2, 4), image_codebook_size=4,
                                  audio_levels=3, audio_codebook_size=4)
CAPTIONS = [np.array([5, 6, 7], np.int32), np.array([9, 10], np.int32)]  # Unequal: left padding.
TOL = dict(rtol=1e-4, atol=1e-4)
# Every generation below uses these two lengths, so the tests share compiled steps.
PROMPT_LEN, CACHE_LEN = 4, 32
LENGTHS = dict(prompt_len=PROMPT_LEN, cache_len=CACHE_LEN)


def _config(scan: bool):
  cfg = config_lib.default_config()
  cfg.model.update(dict(
      vocab_size=LAYOUT.vocab_size, d_model=32, num_layers=3, num_heads=2, num_kv_heads=1,
      head_dim=16, rope_sections=(4, 2, 2), num_dense_layers=1, dense_hidden=32,
      num_experts=4, num_shared_experts=1, expert_hidden=16, top_k=2, scan_layers=scan,
      audio_levels=LAYOUT.audio_levels, audio_codebook_size=LAYOUT.audio_codebook_size,
      audio_head_hidden=16))
  cfg.objective.audio_level_weights = (1.0,) * (LAYOUT.audio_levels - 1)
  config_lib.validate(cfg)
  return cfg


def _model(scan: bool) -> Decoder:
  """A tiny Decoder with numpy-drawn parameters and router bias (no init compile)."""
  cfg = _config(scan)
  abstract = nnx.eval_shape(lambda: Decoder(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(1)
  draw = lambda scale: lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype)
  return nnx.merge(graphdef, jax.tree.map(draw(0.3), params), jax.tree.map(draw(0.1), rest))


@pytest.fixture(scope="module")
def model():
  return _model(scan=True)


@pytest.fixture(scope="module")
def dec(model):
  return decode.CachedDecoder(model)


def _document(caption, seed, scales):
  """Caption -> image, text, text -> audio: every kind of position in one document."""
  r = np.random.default_rng(seed)
  image = [[r.integers(0, 4, (s, s)) for s in scales]]
  return (seq_lib.DocumentWriter(LAYOUT).text(caption)
          .vision(image, seq_lib.Modality.IMAGE, generate=True).text(np.array([8, 9]))
          .audio(r.integers(0, 4, (2, LAYOUT.audio_levels))).finish())


SEQ = 48  # Every reference forward is padded to this length: one compile per model.


@nnx.jit
def _reference(model, batch):
  hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                  batch["group_ids"], batch["audio_codes"])
  heads = model.audio_logits(hidden, batch["targets"], batch["audio_targets"])
  return model.logits(hidden), heads


def _full_forward(model, doc):
  """Uncached Decoder forward of one document: (logits [L, V], audio-head logits [L, K-1, C])."""
  n = len(doc["tokens"])
  batch = {k: np.pad(doc[k], [(0, SEQ - n)] + [(0, 0)] * (doc[k].ndim - 1),
                     constant_values=-1 if k.startswith("audio") else 0)[None]
           for k in ("tokens", "positions", "group_ids", "audio_codes", "targets",
                     "audio_targets")}
  batch["segment_ids"] = (np.arange(SEQ) < n).astype(np.int32)[None]
  logits, heads = _reference(model, batch)
  return np.asarray(logits[0, :n]), np.asarray(heads[0, :n])


def _chunks(group_ids):
  """[start, stop) of each step after the prompt: a whole nonzero group, else one position."""
  out, i = [], 0
  while i < len(group_ids):
    j = i + 1
    while group_ids[i] and j < len(group_ids) and group_ids[j] == group_ids[i]:
      j += 1
    out.append((i, j))
    i = j
  return out


def _rows(docs, starts, stops, pads):
  fields = {}
  for name, fill in (("tokens", 0), ("positions", 0), ("group_ids", 0), ("audio_codes", -1)):
    fields[name] = np.stack([np.pad(d[name][a:b], [(p, 0)] + [(0, 0)] * (d[name].ndim - 1),
                                    constant_values=fill)
                             for d, a, b, p in zip(docs, starts, stops, pads)])
  fields["segment_ids"] = np.stack([np.pad(np.ones(b - a, np.int32), (p, 0))
                                    for a, b, p in zip(starts, stops, pads)])
  return decode.as_inputs(fields)


@pytest.mark.parametrize("scan", [True, False])
def test_cached_logits_match_full_forward(scan, model, dec):
  """Left-padded prefill + per-group / per-token steps == the full forward at every position."""
  if not scan:  # The unscanned stacks (a Python loop over blocks), on a shorter document.
    model = _model(scan=False)
    dec = decode.CachedDecoder(model)
  scales = LAYOUT.image_scales if scan else LAYOUT.image_scales[:2]
  docs = [_document(c, i, scales) for i, c in enumerate(CAPTIONS)]
  refs = [_full_forward(model, d)[0] for d in docs]
  prompts = [len(c) + 1 for c in CAPTIONS]  # Caption + BOI.
  pads = [PROMPT_LEN - p for p in prompts]
  rest = len(docs[0]["tokens"]) - prompts[0]
  cache = dec.init_cache(batch=2, max_len=CACHE_LEN)
  key = jax.random.key(0)
  out, cache = dec.step(cache, _rows(docs, [0, 0], prompts, pads), key)
  for i, (ref, p, pad) in enumerate(zip(refs, prompts, pads)):
    np.testing.assert_allclose(np.asarray(out.logits[i, pad:]), ref[:p], **TOL)
  for a, b in _chunks(docs[0]["group_ids"][prompts[0]:]):
    out, cache = dec.step(cache, _rows(docs, [p + a for p in prompts], [p + b for p in prompts],
                                       [0, 0]), key)
    for i, (ref, p) in enumerate(zip(refs, prompts)):
      np.testing.assert_allclose(np.asarray(out.logits[i]), ref[p + a:p + b], **TOL)
  assert int(cache.index) == PROMPT_LEN + rest
  # One compile per distinct step length: prompt = scale 2 (4), one position, scale 3 (16).
  lengths = {k[1][1] for k in dec.traces if k[0] == "step"}
  assert lengths == ({1, 4, 16} if scan else {1, 4})
  assert set(dec.traces.values()) == {1}


def test_text_decode_compiles_once_and_is_greedy(model, dec):
  prompts = [np.array([3, 4, 5, 6], np.int32), np.array([7, 8], np.int32)]
  transcript = loops.Transcript()
  kw = dict(max_new_tokens=10, stop_at_eos=False, prompt_len=PROMPT_LEN, cache_len=CACHE_LEN)
  out = loops.generate_text(dec, LAYOUT, prompts, transcript=transcript, **kw)
  again = loops.generate_text(dec, LAYOUT, prompts, **kw)
  assert dec.traces["text_step", (2,), CACHE_LEN] == 1  # Every position of both calls: 1 compile.
  assert dec.traces["step", (2, PROMPT_LEN), CACHE_LEN] == 1  # The prefill.
  for i, (prompt, ids) in enumerate(zip(prompts, out)):
    assert len(ids) == 10 and (ids < LAYOUT.text_size).all()
    np.testing.assert_array_equal(again[i], ids)
    doc = seq_lib.DocumentWriter(LAYOUT).text(np.concatenate([prompt, ids])).finish()
    fed = transcript.row(i)
    n = len(fed["tokens"])  # The last generated id is not fed back.
    assert n == len(prompt) + 9
    for k in ("tokens", "positions", "group_ids"):
      np.testing.assert_array_equal(fed[k], doc[k][:n], err_msg=k)
    logits, _ = _full_forward(model, doc)
    greedy = np.argmax(logits[:, :LAYOUT.text_size], -1)
    np.testing.assert_array_equal(ids, greedy[len(prompt) - 1:len(prompt) + 9])


def test_image_scales_follow_training_layout(model, dec):
  transcript = loops.Transcript()
  codes = loops.generate_images(dec, LAYOUT, CAPTIONS, transcript=transcript, **LENGTHS)
  assert [c.shape for c in codes] == [(2, s, s) for s in LAYOUT.image_scales]
  for i, caption in enumerate(CAPTIONS):
    maps = [c[i] for c in codes]
    doc = (seq_lib.DocumentWriter(LAYOUT).text(caption)
           .vision([maps], seq_lib.Modality.IMAGE, generate=True).finish())
    fed = transcript.row(i)
    n = len(fed["tokens"])
    assert n == len(caption) + 1 + sum(s * s for s in LAYOUT.image_scales)
    assert doc["tokens"][n] == LAYOUT.special("EOI")  # All but the closing EOI was fed.
    for k in ("tokens", "positions", "group_ids"):
      np.testing.assert_array_equal(fed[k], doc[k][:n], err_msg=k)
    # Greedy: each scale is the argmax, within its codebook, of the full forward's logits.
    logits, _ = _full_forward(model, doc)
    start = len(caption) + 1
    for k, side in enumerate(LAYOUT.image_scales):
      lo = LAYOUT.image_code_offset(k)
      span = logits[start:start + side * side, lo:lo + LAYOUT.image_codebook_size]
      np.testing.assert_array_equal(np.argmax(span, -1), maps[k].reshape(-1))
      np.testing.assert_array_equal(doc["targets"][start:start + side * side] - lo,
                                    maps[k].reshape(-1))
      start += side * side


def test_audio_frames_follow_training_layout(model, dec):
  frames = 4
  transcript = loops.Transcript()
  clips = loops.generate_audio(dec, LAYOUT, CAPTIONS, frames=frames, transcript=transcript,
                               **LENGTHS)
  assert clips.shape == (2, frames, LAYOUT.audio_levels)
  assert ((clips >= 0) & (clips < LAYOUT.audio_codebook_size)).all()
  lo, hi = LAYOUT.audio_offset, LAYOUT.special_offset
  for i, caption in enumerate(CAPTIONS):
    doc = seq_lib.DocumentWriter(LAYOUT).text(caption).audio(clips[i]).finish()
    fed = transcript.row(i)
    n = len(fed["tokens"])
    assert n == len(caption) + 1 + frames - 1
    for k in ("tokens", "positions", "group_ids", "audio_codes"):
      np.testing.assert_array_equal(fed[k], doc[k][:n], err_msg=k)
    # Greedy: level 1 from the LM head, levels 2..K from the teacher-forced audio heads.
    logits, heads = _full_forward(model, doc)
    boa = len(caption)
    np.testing.assert_array_equal(np.argmax(logits[boa:boa + frames, lo:hi], -1), clips[i, :, 0])
    np.testing.assert_array_equal(np.argmax(heads[boa:boa + frames], -1), clips[i, :, 1:])


def test_sampled_decoding_is_seeded_and_in_range(dec):
  from ernie5_jax.generate.sampling import Sampling
  hot = Sampling(temperature=1.5, top_p=0.9)
  a = loops.generate_images(dec, LAYOUT, CAPTIONS, sampling=hot, seed=3, **LENGTHS)
  b = loops.generate_images(dec, LAYOUT, CAPTIONS, sampling=hot, seed=3, **LENGTHS)
  c = loops.generate_images(dec, LAYOUT, CAPTIONS, sampling=hot, seed=4, **LENGTHS)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any((x != z).any() for x, z in zip(a, c))
  assert all(((x >= 0) & (x < LAYOUT.image_codebook_size)).all() for x in a)


def test_decode_tokens_per_sec(model, dec):
  measure = lambda: decode_tokens_per_sec(_config(True), model, batch=2, prompt_len=PROMPT_LEN,
                                          new_tokens=CACHE_LEN - PROMPT_LEN - 1, decoder=dec)
  measure()  # Compiles the prefill and the text step, unless another test of dec already did.
  before = sum(dec.traces.values())
  rate = measure()
  assert np.isfinite(rate) and rate > 0
  assert sum(dec.traces.values()) == before  # Timed steps reuse the compiled ones.


def test_bad_lengths_are_named(dec):
  image_doc = (seq_lib.DocumentWriter(LAYOUT)
               .vision([[np.zeros((1, 1), int)]], seq_lib.Modality.IMAGE, generate=False))
  doc = {k: v[:-1] for k, v in image_doc.finish().items()}  # Cut before EOI: ends in a group.
  with pytest.raises(ValueError, match="ends inside a group"):
    prompt_lib.pad_prompts([doc], audio_levels=1)
  with pytest.raises(ValueError, match="length=2 is not accepted"):
    prompt_lib.pad_prompts([_document(CAPTIONS[0], 0, (1,))], audio_levels=1, length=2)
  with pytest.raises(ValueError, match="cache_len=8 is not accepted"):
    loops.generate_text(dec, LAYOUT, CAPTIONS, max_new_tokens=6, prompt_len=PROMPT_LEN,
                        cache_len=8)
