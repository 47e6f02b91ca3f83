"""Trains the committed text SentencePiece model on the stdlib docstring corpus.

  python -m ernie5_jax.input_pipeline.tokenizers.train_sentencepiece \
      [--vocab_size=1024] [--out=ernie5_jax/input_pipeline/tokenizers/assets/stdlib_sp1k]

Input: the train paragraphs of data/stdlib_text (read straight from corpus.py, no
TFDS needed) plus every caption / question / answer template of
data/digits_multimodal, so digit words are single pieces. Unigram model
(Kudo 2018), byte fallback (any UTF-8 text encodes without <unk>), identity
normalisation (keeps the file small), ids pad=0, eos=1, unk=2 (seqio's convention).
One thread, fixed seed sentence order: the same corpus gives the same model.
"""

from __future__ import annotations

import argparse
import io
import os

import sentencepiece as spm

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "assets", "stdlib_sp1k")


def training_lines() -> list[str]:
  """Returns the training sentences: stdlib prose + digits captions, deterministic order."""
  from data.digits_multimodal import generate as gen
  from data.stdlib_text import corpus
  lines = [r["text"] for r in corpus.iter_records("train")]
  words = list(gen.WORDS) + [str(d) for d in range(-1, 11)]
  templates = [c.format(w=w, d=d) for c in gen._CAPTIONS for d, w in enumerate(gen.WORDS)]
  templates += [f"a {w} moving {m}" for w in gen.WORDS for m in gen.DIRECTIONS]
  templates += [f"the keypad tone for {w}" for w in gen.WORDS]
  templates += [f"the sound of key {d}" for d in range(10)]
  templates += ["Q: what digit is shown? A:", "Q: which number is this? A:",
                "Q: is the digit even or odd? A: even", "Q: is the digit even or odd? A: odd",
                "Q: what number comes next? A:", "Q: what number comes before? A:"]
  # Repeat the short templates so their words win pieces against the larger corpus.
  return lines + 20 * (templates + words)


def train(vocab_size: int, out_prefix: str) -> str:
  """Trains the model; writes out_prefix.model and .vocab; returns the .model path."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(training_lines()), model_writer=model,
      vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
      byte_fallback=True, normalization_rule_name="identity", split_digits=True,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, shuffle_input_sentence=False,
      max_sentence_length=8192, minloglevel=2)
  os.makedirs(os.path.dirname(out_prefix), exist_ok=True)
  with open(out_prefix + ".model", "wb") as f:
    f.write(model.getvalue())
  return out_prefix + ".model"


def main() -> None:
  """CLI entry point."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vocab_size", type=int, default=1024)
  p.add_argument("--out", default=DEFAULT_OUT)
  args = p.parse_args()
  path = train(args.vocab_size, args.out)
  print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
  main()
