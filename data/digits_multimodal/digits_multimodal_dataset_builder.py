"""TFDS builder `digits_multimodal`: one digit as image, video, audio and text (offline).

Generated from scikit-learn's bundled handwritten digits (see generate.py); nothing
is downloaded. Configs: "default" (all 1797 digits, 1500 train / 297 test) and
"tiny" (a 200 / 50 subset for tests). Deterministic given the config's seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data.digits_multimodal import generate as gen


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  """seed: all random choices; copies: examples per digit; limit: max digits per split (0 = all)."""
  seed: int = 0
  copies: int = 1
  limit: int = 0


class DigitsMultimodal(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits as image, moving-digit video, keypad tone and captions."""

  name = "digits_multimodal"
  VERSION = tfds.core.Version("1.0.0")
  # No URLs, so no checksums file; the default lookup of one next to the code needs the
  # `importlib_resources` backport, which is not installed.
  url_infos = None
  RELEASE_NOTES = {"1.0.0": "Images, videos, DTMF audio and captions of sklearn digits."}
  BUILDER_CONFIGS = [
      DigitsConfig(name="default", description="All digits, one copy each."),
      DigitsConfig(name="tiny", description="200 train / 50 test digits (tests).", limit=200),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "label": tfds.features.ClassLabel(names=list(gen.WORDS)),
            "image": tfds.features.Tensor(shape=(gen.CANVAS, gen.CANVAS), dtype=np.uint8),
            "video": tfds.features.Tensor(shape=(gen.NUM_FRAMES, gen.CANVAS, gen.CANVAS),
                                          dtype=np.uint8),
            "direction": tfds.features.ClassLabel(names=list(gen.DIRECTIONS)),
            "audio": tfds.features.Tensor(shape=(gen.AUDIO_LEN,), dtype=np.int16),
            "digit_index": np.int64,
            "caption": text, "question": text, "answer": text,
            "video_caption": text, "audio_caption": text,
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated from installed packages.
    images, labels = gen.load_digits()
    return {split: self._generate_examples(images, labels, split) for split in ("train", "test")}

  def _generate_examples(self, images, labels, split):
    cfg = self.builder_config
    indices = gen.split_indices(split, len(labels), cfg.seed)
    if cfg.limit:
      indices = indices[:cfg.limit if split == "train" else max(1, cfg.limit // 4)]
    for copy in range(cfg.copies):
      for i in indices:
        yield f"{copy}_{i}", gen.make_example(images[i], labels[i], cfg.seed, copy, int(i))
