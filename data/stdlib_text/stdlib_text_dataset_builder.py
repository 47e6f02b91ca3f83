"""TFDS builder `stdlib_text`: prose paragraphs from the Python stdlib's docstrings, offline.

Each example: {"text": paragraph (bytes when read back), "source": "module.Class.func"}.
Splits: train / test, split by a hash of the module name (see corpus.py). The
content depends only on the Python version (3.11 here): nothing is downloaded.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data.stdlib_text import corpus


class StdlibText(tfds.core.GeneratorBasedBuilder):
  """English prose from Python standard library docstrings (no download)."""

  name = "stdlib_text"
  VERSION = tfds.core.Version("1.0.0")
  # No URLs, so no checksums file; the default lookup of one next to the code needs the
  # `importlib_resources` backport, which is not installed.
  url_infos = None
  RELEASE_NOTES = {"1.0.0": "Paragraphs of stdlib docstrings, ast-parsed, deduplicated."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
        homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split: str):
    for i, record in enumerate(corpus.iter_records(split)):
      yield i, record
