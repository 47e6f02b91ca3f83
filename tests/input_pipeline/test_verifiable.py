"""RL prompt families (ernie5_jax/input_pipeline/verifiable.py) on the tiny embedded digits build."""

import numpy as np
import pytest

from ernie5_jax.input_pipeline import sequence as S
from ernie5_jax.input_pipeline import verifiable as tasks

NUM = 4
_INPUTS = ("tokens", "positions", "group_ids")


@pytest.fixture(scope="module")
def data(digits_config):
  return tasks.task_data(digits_config)


@pytest.fixture(scope="module")
def batches(digits_config):
  return {f: tasks.make_prompts(digits_config, f, split="train", start=3, num=NUM)
          for f in tasks.FAMILIES}


def _written(data, family, index, split="train"):
  """The prompt and answer written independently with DocumentWriter from the raw records."""
  layout, enc, m = data.layout, data.tokenizers.text.encode, S.Modality
  recs = [data.record(split, i) for i in tasks.record_indices(data, family, split, index)]
  w = S.DocumentWriter(layout)
  if family == "caption_image":
    doc = w.text(recs[0]["caption"]).special("BOI", m.IMAGE).finish()
    return doc, recs[0]["label"]
  if family == "image_digit":
    w.vision([recs[0]["image_codes"]], m.IMAGE, generate=False)
  elif family == "video_digit":
    w.vision(recs[0]["video_codes"], m.VIDEO, generate=False)
  elif family == "audio_digit":
    w.audio(recs[0]["audio_codes"])
  else:
    for r in recs:
      w.vision([r["image_codes"]], m.IMAGE, generate=False)
  return w.text(enc(tasks.QUESTIONS[family])).finish(), sum(r["label"] for r in recs)


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_prompt_layout_is_the_documents(batches, data, digits_config, family):
  b = batches[family]
  f = b.fields
  lp = f["tokens"].shape[1]
  k = digits_config.model.audio_levels
  assert f["positions"].shape == (NUM, lp, 3) and f["audio_codes"].shape == (NUM, lp, k)
  assert b.response_kind == ("image" if family == "caption_image" else "text")
  for i in range(NUM):
    doc, answer = _written(data, family, 3 + i)
    n = len(doc["tokens"])
    assert b.answers[i] == answer
    pad = slice(0, lp - n)  # Left padding: segment 0, zeros, audio -1.
    assert (f["segment_ids"][i, pad] == 0).all() and (f["tokens"][i, pad] == 0).all()
    assert (f["audio_codes"][i, pad] == -1).all()
    assert (f["segment_ids"][i, lp - n:] == 1).all()
    for key in _INPUTS:
      np.testing.assert_array_equal(f[key][i, lp - n:], doc[key], err_msg=key)
    np.testing.assert_array_equal(f["audio_codes"][i, lp - n:], doc["audio_codes"][:, :k])
    assert b.next_position[i] == doc["positions"][-1, 0] + 1
  assert b.next_group == 1 + max(int(f["group_ids"].max()), 0)


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_reference_continues_the_prompt(data, family):
  ex = tasks.example(data, family, "train", 5)
  n = len(ex.prompt["tokens"])
  doc = ex.document
  for key in _INPUTS:
    np.testing.assert_array_equal(doc[key][:n], ex.prompt[key], err_msg=key)
  if family == "caption_image":
    assert doc["tokens"][n - 1] == data.layout.special("BOI")
    groups = doc["group_ids"] > 0
    np.testing.assert_array_equal(doc["targets"][groups], ex.reference)
    assert len(ex.reference) == sum(s * s for s in data.data_cfg.image_scales)
  else:
    assert ex.reference[-1] == data.layout.eos_id
    np.testing.assert_array_equal(doc["tokens"][n:], ex.reference[:-1])
    np.testing.assert_array_equal(doc["targets"][n - 1:], ex.reference)
    text = data.tokenizers.text.decode(ex.reference[:-1].tolist()).strip()
    assert text == str(ex.answer)


def test_audio_prompt_is_the_pretraining_qa_document(data):
  """audio_digit + its reference has the tokens/positions of pre-training's audio QA document."""
  ex = tasks.example(data, "audio_digit", "train", 0)
  pre = S.digits_document("audio_to_text", data.sources["train"][0].fields, data.layout,
                          variant=1)
  for key in ("tokens", "targets", "positions", "group_ids", "audio_codes"):
    np.testing.assert_array_equal(ex.document[key], pre[key], err_msg=key)


def test_held_out_ids_and_records_are_disjoint(digits_config, data):
  import data as data_lib
  train = tasks.make_prompts(digits_config, "image_digit", split="train", start=0, num=8)
  test = tasks.make_prompts(digits_config, "image_digit", split="test", start=0, num=8)
  assert not set(train.prompt_ids) & set(test.prompt_ids)
  again = tasks.make_prompts(digits_config, "image_digit", split="train", start=0, num=8)
  np.testing.assert_array_equal(again.prompt_ids, train.prompt_ids)  # Stable.
  assert tasks.parse_prompt_id(int(test.prompt_ids[3])) == ("image_digit", "test", 3)
  ids = {f: tasks.prompt_id(f, s, 7) for f in tasks.FAMILIES for s in tasks.SPLITS}
  assert len(set(ids.values())) == len(ids)
  # The underlying digits: the held-out split never shares one with train.
  b = data_lib.ensure_built(digits_config.data.dataset, data.data_dir)
  digit = {s: {int(b.as_data_source(s)[i]["digit_index"]) for i in range(data.num_records(s))}
           for s in tasks.SPLITS}
  assert digit["train"] and digit["test"] and not digit["train"] & digit["test"]


def test_prompt_len_pads_and_rejects(digits_config, batches):
  lp = batches["image_digit"].fields["tokens"].shape[1]
  b = tasks.make_prompts(digits_config, "image_digit", split="train", start=3, num=NUM,
                         prompt_len=lp + 5)
  np.testing.assert_array_equal(b.fields["tokens"][:, 5:], batches["image_digit"].fields["tokens"])
  with pytest.raises(ValueError, match="length="):
    tasks.make_prompts(digits_config, "image_digit", split="train", start=0, num=1, prompt_len=lp - 1)
  with pytest.raises(ValueError, match="family='nope'"):
    tasks.make_prompts(digits_config, "nope", split="train", start=0, num=1)
  with pytest.raises(ValueError, match="split='validation'"):
    tasks.make_prompts(digits_config, "image_digit", split="validation", start=0, num=1)


def test_hints_prefix_the_reference(data, batches):
  b = batches["image_arithmetic"]
  fractions = np.array([0.0, 0.25, 0.5, 1.0])
  h = tasks.with_hints(b, fractions)
  for i, frac in enumerate(fractions):
    ref = b.references[i]
    k = min(int(np.ceil(frac * len(ref))), len(ref) - 1)  # Never the EOS.
    np.testing.assert_array_equal(h.hints[i], ref[:k])
    np.testing.assert_array_equal(h.references[i], ref[k:])
    np.testing.assert_array_equal(tasks.full_responses(h, [h.references[i]], [i])[0], ref)
    # The hinted prompt is the prompt document continued by the hint text.
    doc, _ = _written(data, "image_arithmetic", 3 + i)
    w_doc = {key: np.concatenate([doc[key], S.DocumentWriter(data.layout).text(ref[:k]).finish()[
        key]]) for key in ("tokens", "group_ids")} if k else doc
    n = len(w_doc["tokens"])
    lp = h.fields["tokens"].shape[1]
    np.testing.assert_array_equal(h.fields["tokens"][i, lp - n:], w_doc["tokens"])
    assert (h.fields["segment_ids"][i] > 0).sum() == n
    pos = h.fields["positions"][i, lp - n:]
    np.testing.assert_array_equal(pos[:, 0], np.concatenate([doc["positions"][:, 0],
                                                             doc["positions"][-1, 0] + 1
                                                             + np.arange(k)]))
    assert h.next_position[i] == b.next_position[i] + k
  assert tasks.with_hints(b, np.zeros(NUM)).fields["tokens"].shape == b.fields["tokens"].shape
  image = batches["caption_image"]
  assert tasks.with_hints(image, np.ones(NUM)) is image  # No-op for image responses.
  with pytest.raises(ValueError, match="fractions"):
    tasks.with_hints(b, np.array([0.5, 2.0, 0.0, 0.0]))
