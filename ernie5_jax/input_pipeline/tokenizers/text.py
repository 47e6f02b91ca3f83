"""Text vocabulary: the committed SentencePiece model, raw or as a seqio vocabulary."""

from __future__ import annotations

import functools
import os

import numpy as np

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "stdlib_sp1k.model")


class TextTokenizer:
  """SentencePiece ids (pad=0, eos=1, unk=2) without importing seqio / TensorFlow."""

  def __init__(self, model_path: str = DEFAULT_MODEL):
    import sentencepiece as spm
    if not os.path.exists(model_path):
      raise FileNotFoundError(f"text model_path={model_path!r} does not exist: train one with "
                              "python -m ernie5_jax.input_pipeline.tokenizers.train_sentencepiece")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.eos_id, self.unk_id = self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()

  def encode(self, text: str | bytes) -> np.ndarray:
    """Text (str or UTF-8 bytes) -> ids [n] int32, no EOS."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    """Ids -> text (ids outside the text range must be removed first)."""
    return self._sp.decode([int(i) for i in ids])


@functools.lru_cache(maxsize=None)
def text_tokenizer(model_path: str = DEFAULT_MODEL) -> TextTokenizer:
  """Cached TextTokenizer for a model path."""
  return TextTokenizer(model_path)


def seqio_vocabulary(model_path: str = DEFAULT_MODEL):
  """The same model as a seqio.SentencePieceVocabulary (imports seqio / TensorFlow)."""
  import seqio
  return seqio.SentencePieceVocabulary(model_path)
