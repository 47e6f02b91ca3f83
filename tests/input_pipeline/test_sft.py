"""SFT batches of the RL task families (ernie5_jax/input_pipeline/sft.py): fields, loss mask, resume."""

import numpy as np
import pytest

from ernie5_jax.input_pipeline import sft
from ernie5_jax.input_pipeline import verifiable as tasks

SEQ, BATCH = 96, 3
KEYS = ("tokens", "targets", "loss_mask", "modality", "positions", "segment_ids", "group_ids",
        "audio_codes", "audio_targets")  # What input_pipeline/multimodal.py yields.


@pytest.fixture(scope="module")
def data(digits_config):
  return tasks.task_data(digits_config)


@pytest.fixture(scope="module")
def batches(digits_config):
  it = sft.sft_batches(digits_config, split="train", batch_size=BATCH, seq_len=SEQ, seed=0)
  return [next(it) for _ in range(4)]


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_loss_mask_is_exactly_the_response(data, family):
  ex = tasks.example(data, family, "train", 2)
  doc = sft.sft_document(ex)
  mask = doc["loss_mask"] > 0
  assert doc["loss_mask"].dtype == np.float32
  np.testing.assert_array_equal(doc["targets"][mask], ex.reference)
  n_prompt = len(ex.prompt["tokens"])
  if family == "caption_image":
    assert not mask[:n_prompt].any()
    assert doc["targets"][-1] == data.layout.eos_id and not mask[-1]  # EOI -> EOS: not generated.
  else:
    assert not mask[:n_prompt - 1].any() and mask[n_prompt - 1:].all()
  for key in ("tokens", "positions", "group_ids"):  # Same layout as the RL prompt.
    np.testing.assert_array_equal(doc[key][:n_prompt], ex.prompt[key])


def test_batch_fields_match_the_pretraining_pipeline(batches, data):
  for b in batches:
    assert set(b) == set(KEYS)
    for k in KEYS:
      want = {"positions": (BATCH, SEQ, 3), "audio_codes": (BATCH, SEQ, data.layout.audio_levels),
              "audio_targets": (BATCH, SEQ, data.layout.audio_levels)}.get(k, (BATCH, SEQ))
      assert b[k].shape == want, k
      assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32), k
    assert b["tokens"].max() < data.layout.vocab_size


def test_batches_are_the_example_documents(batches, data):
  """Every packed segment is one element's SFT document, loss mask included; families mix."""
  weights = sft.family_weights(None)
  docs = [sft.sft_document(sft.element_example(data, weights, split="train", seed=0, element=g))
          for g in range(8 * BATCH)]
  by_tokens = {d["tokens"].tobytes(): d for d in docs}
  seen = set()
  for b in batches[:2]:
    for row in range(BATCH):
      seg = b["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        sel = seg == s
        doc = by_tokens[b["tokens"][row][sel].tobytes()]
        for k in ("targets", "loss_mask", "positions", "modality"):
          np.testing.assert_array_equal(b[k][row][sel], doc[k], err_msg=k)
        seen.add(tuple(doc["modality"][:1]))
      assert (b["loss_mask"][row][seg == 0] == 0).all()
  assert len(seen) >= 2


def test_deterministic_and_resumes(digits_config, batches):
  it = sft.sft_batches(digits_config, split="train", batch_size=BATCH, seq_len=SEQ, seed=0)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  np.testing.assert_array_equal(want[0]["tokens"], batches[1]["tokens"])
  resumed = sft.sft_batches(digits_config, split="train", batch_size=BATCH, seq_len=SEQ, seed=0)
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for k in KEYS:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)
  other = next(sft.sft_batches(digits_config, split="train", batch_size=BATCH, seq_len=SEQ, seed=1))
  assert not np.array_equal(other["tokens"], batches[0]["tokens"])


def test_family_weights_and_errors(digits_config):
  assert sft.family_weights("image_digit:2,caption_image:0") == {"image_digit": 2.0}
  with pytest.raises(ValueError, match="name='text'"):
    sft.family_weights({"text": 1.0})
  with pytest.raises(ValueError, match="positive weight"):
    sft.family_weights({"image_digit": 0.0})
  with pytest.raises(ValueError, match="split='validation'"):
    sft.sft_dataset(digits_config, split="validation", batch_size=1, seq_len=SEQ, seed=0)
  it = sft.sft_batches(digits_config, split="train", batch_size=1, seq_len=40, seed=0,
                       families={"image_arithmetic": 1.0})
  with pytest.raises(Exception, match="seq_len=40"):
    next(it)
