"""eval/samples.py (--mode=generate) end to end: a stored model (model/ + config.json) -> PNG, WAV, text, report."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from ernie5_jax import config as config_lib
from ernie5_jax import store
from ernie5_jax.eval import samples as run
from ernie5_jax.generate import media
from ernie5_jax.input_pipeline.multimodal import vocabulary_layout
from ernie5_jax.model import Decoder


def _config(data_dir: str):
  cfg = config_lib.default_config()
  cfg.data.source, cfg.data.dataset, cfg.data.data_dir = ("digits_multimodal",
                                                          "digits_multimodal/tiny", data_dir)
  layout = vocabulary_layout(cfg.data)
  cfg.model.update(dict(
      vocab_size=layout.vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
      head_dim=16, rope_sections=(4, 2, 2), num_dense_layers=1, dense_hidden=32,
      num_experts=4, expert_hidden=16, top_k=2, audio_levels=layout.audio_levels,
      audio_codebook_size=layout.audio_codebook_size, audio_head_hidden=16))
  cfg.objective.audio_level_weights = (1.0,) * (layout.audio_levels - 1)
  cfg.generate.update(dict(samples_per_digit=1, text_tokens=3))
  config_lib.validate(cfg)
  return cfg


@pytest.mark.slow
def test_generate_from_a_stored_model(tmp_path):
  config = _config(str(tmp_path / "data"))
  abstract = nnx.eval_shape(lambda: Decoder(config.model, mtp_depth=config.objective.mtp_depth,
                                            rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), state)
  stored = tmp_path / "model_dir"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(stored / store.MODEL_ITEM, state)
  store.save_config(config, str(stored))

  out = str(tmp_path / "samples")
  report = run.generate_from_checkpoint(str(stored), out)
  assert report["step"] is None and report["checkpoint"].endswith("model")
  assert 0 <= report["image"]["accuracy"] <= 1 and 0 <= report["audio"]["accuracy"] <= 1
  assert len(report["image"]["predicted"]) == 10 and report["decode_tokens_per_sec"] > 0
  assert len(report["text"]) == len(run.TEXT_PROMPTS)
  # Images and audio share their prefill and per-position steps: 9 compiled steps in all.
  assert sum(report["compiles"].values()) == len(report["compiles"]) <= 9
  files = set(os.listdir(out))
  assert {"report.json", "text.txt", "images.png"} <= files
  for d in range(10):
    image = np.asarray(Image.open(os.path.join(out, f"image_d{d}_0.png")))
    assert image.shape == (16 * 8, 16 * 8)
    wave, rate = media.read_wav(os.path.join(out, f"audio_d{d}_0.wav"))
    assert rate == 8000 and wave.shape == (3200,)
  with open(os.path.join(out, "report.json")) as f:
    assert json.load(f)["image"]["accuracy"] == report["image"]["accuracy"]


def test_keypad_scorer_reads_the_data_tones():
  from data.digits_multimodal import generate as digits
  waves = np.stack([digits.make_audio(d, np.random.default_rng(d)) for d in range(10)])
  np.testing.assert_array_equal(run.keypad_digits(waves / 32768.0, digits.SAMPLE_RATE),
                                np.arange(10))
