"""Rewards of the RL task families (ernie5_jax/rl/verifiers.py) on hand-made responses."""

import numpy as np
import pytest

from ernie5_jax.input_pipeline import verifiable as tasks
from ernie5_jax.rl import verifiers

TEXT_FAMILIES = tuple(f for f in tasks.FAMILIES if f != "caption_image")


@pytest.fixture(scope="module")
def ctx(config):
  return verifiers.make_context(config)


def _ids(ctx, text, eos=True, pad=0):
  ids = list(ctx.tokenizers.text.encode(text)) + ([ctx.layout.eos_id] if eos else [])
  return np.array(ids + [ctx.layout.pad_id] * pad, np.int32)


def test_parse_numbers():
  assert verifiers.parse_numbers("a handwritten Three, not 12") == [3, 12]
  assert verifiers.parse_numbers("someone at noon") == []  # Whole words only.
  assert verifiers.parse_numbers("eighteen") == [18]


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_text_rewards(ctx, family):
  r = lambda ids, answer=7: verifiers.reward(family, ids, answer, context=ctx)
  assert r(_ids(ctx, "7")) == 1.0  # The reference form.
  assert r(_ids(ctx, "seven")) == 1.0 and r(_ids(ctx, "it is a 7.")) == 1.0
  assert r(_ids(ctx, "7", eos=False)) == 1.0  # Ran out of tokens before EOS.
  assert r(_ids(ctx, "7", pad=5)) == 1.0  # Trailing EOS and pad.
  assert r(np.concatenate([_ids(ctx, "7"), _ids(ctx, "8")])) == 1.0  # After EOS: ignored.
  assert r(_ids(ctx, "8")) == 0.0 and r(_ids(ctx, "17")) == 0.0  # Wrong.
  assert r(_ids(ctx, "7 or 8")) == 0.0  # Hedging.
  assert r(np.zeros((0,), np.int32)) == 0.0 and r(_ids(ctx, "")) == 0.0  # Empty.
  assert r(_ids(ctx, "a digit")) == 0.0  # Names no number.
  garbage = np.array([ctx.layout.image_offset + 3, *_ids(ctx, "7")], np.int32)
  assert r(garbage) == 0.0  # Non-text ids.
  assert r(np.array([-5, 10**6], np.int64)) == 0.0
  rng = np.random.default_rng(0)
  for _ in range(20):
    value = r(rng.integers(0, ctx.layout.vocab_size, 12))
    assert value in (0.0, 1.0)


def test_arithmetic_two_digit_answers(ctx, config):
  b = tasks.make_prompts(config, "image_arithmetic", split="test", start=0, num=6)
  for ref, answer in zip(b.references, b.answers):
    assert verifiers.reward("image_arithmetic", ref, int(answer), context=ctx) == 1.0
    assert verifiers.reward("image_arithmetic", ref, int(answer) + 1, context=ctx) == 0.0
  assert verifiers.reward("image_arithmetic", _ids(ctx, "12"), 12, context=ctx) == 1.0
  assert verifiers.reward("image_arithmetic", _ids(ctx, "1 2"), 12, context=ctx) == 0.0


def test_caption_image_reward_real_codes_vs_noise(ctx, config):
  b = tasks.make_prompts(config, "caption_image", split="test", start=0, num=40)
  real = [verifiers.reward("caption_image", ref, int(a), context=ctx)
          for ref, a in zip(b.references, b.answers)]
  assert np.mean(real) >= 0.75  # Measured 0.88 on the tiny test split (3 scales decoded).
  rng = np.random.default_rng(0)
  noise = []
  for ref, a in zip(b.references, b.answers):
    codes = [rng.integers(0, ctx.layout.image_codebook_size, (s, s)) for s in ctx.image_scales]
    noise.append(verifiers.reward("caption_image", tasks.image_tokens(ctx.layout, codes),
                                  int(a), context=ctx))
  assert np.mean(noise) <= 0.3
  ref, a = b.references[0], int(b.answers[0])
  tail = np.array([ctx.layout.special("EOI"), ctx.layout.eos_id, 0, 0], np.int32)
  with_tail = verifiers.reward("caption_image", np.concatenate([ref, tail]), a, context=ctx)
  assert with_tail == real[0]  # Trailing EOI / EOS / pad ignored.
  assert verifiers.reward("caption_image", ref[:-1], a, context=ctx) == 0.0  # Too short.
  assert verifiers.reward("caption_image", ref - 1000, a, context=ctx) == 0.0  # Text ids.
  shifted = ref.copy()
  shifted[1] = ctx.layout.image_code_offset(2)  # Scale 2's id where scale 1's belongs.
  assert verifiers.reward("caption_image", shifted, a, context=ctx) == 0.0
  assert verifiers.reward("caption_image", np.zeros(0, np.int32), a, context=ctx) == 0.0


def test_bad_family_and_missing_classifier(ctx):
  with pytest.raises(ValueError, match="family='text'"):
    verifiers.reward("text", np.array([1]), 1, context=ctx)
  no_clf = verifiers.RewardContext(ctx.layout, ctx.tokenizers, ctx.image_scales)
  with pytest.raises(ValueError, match="context.classifier=None"):
    verifiers.reward("caption_image", np.array([1]), 1, context=no_clf)


def test_every_configured_family_has_its_reward():
  from ernie5_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert tuple(verifiers.REWARDS) == config_lib.RL_FAMILIES
  assert verifiers.REWARDS["caption_image"] is verifiers.image_reward
  assert verifiers.REWARDS["image_arithmetic"] is verifiers.text_reward
