"""A deterministic, learnable synthetic token source in the unified sequence layout.

Every example is a pure function of (seed, index), so any process can read any
slice of the stream and a restored grain iterator replays exactly the batches an
uninterrupted run would have seen.

The examples' content is seeded by config.seed, their order by data.shuffle_seed
(grain's index shuffle, reshuffled every epoch of _RECORDS_PER_EPOCH records).

Each row packs 2-3 documents (one segment each). Documents are
- text (modality 0), one of two patterns, each token replaced by a random one
  with probability `_NOISE`:
    * "phrase": a cyclic walk through one of a few fixed random phrases (a
      seed-fixed bank), learnable as bigrams;
    * "count": an arithmetic progression a, a+d, a+2d, ... (mod the text range)
      with d in {1, 2, 3}, learnable in context (attention to the last tokens);
- a fake image (modality 1, only when data.num_modalities >= 2): a short text
  prefix, then groups of 4 codes from the upper half of the vocabulary, one
  group per 2x2 "scale". Group g+1 is group g shifted by a per-image step, slot
  by slot. A group sees itself bidirectionally (group_ids), so its targets are
  the codes of the NEXT group at the same slot (next-group-of-tokens
  prediction, DESIGN.md), never tokens it can already see.

Targets are the next token (text) or the next group's code (image); the last
token of a text document and the last group of an image get loss_mask 0.
Positions restart at 0 in every document: text gets t=h=w=index; an image
group g gets t = base, h = base + row, w = base + col with base = prefix + 2g.
"""

from __future__ import annotations

import grain
import numpy as np

MODALITY_TEXT = 0
MODALITY_IMAGE = 1

_NOISE = 0.05  # Probability that a pattern token is replaced by a random one.
_NUM_PHRASES = 16  # Phrases in the seed-fixed bank.
_PHRASE_LEN = 8
_COUNT_STEPS = (1, 2, 3)
_IMAGE_PROB = 0.3  # Chance that a document (long enough) is an image.
_GROUP = 4  # Codes per image group (a 2x2 scale).
_MIN_DOC = 4  # Shortest document.
_RECORDS_PER_EPOCH = 1 << 20  # Shuffled as one epoch; epochs repeat, reshuffled.


class SyntheticSource:
  """Random-access grain source: example i is a pure function of (seed, i)."""

  def __init__(self, *, seq_len: int, vocab_size: int, num_modalities: int, seed: int,
               num_records: int = _RECORDS_PER_EPOCH):
    if seq_len < 2:
      raise ValueError(f"seq_len={seq_len} is not accepted: expected >= 2")
    if num_modalities not in (1, 2):
      raise ValueError(f"num_modalities={num_modalities} is not accepted: the synthetic "
                       "source makes text (1) or text + image (2)")
    self._seq_len = seq_len
    self._num_modalities = num_modalities
    self._seed = seed
    self._num_records = num_records
    # Text ids in [0, text_vocab); image codes in [text_vocab, vocab_size).
    self._text_vocab = vocab_size // 2 if num_modalities > 1 else vocab_size
    self._image_vocab = vocab_size - self._text_vocab
    bank_rng = np.random.default_rng((seed, 1 << 40))
    self._phrases = bank_rng.integers(0, self._text_vocab, (_NUM_PHRASES, _PHRASE_LEN))

  def __len__(self) -> int:
    return self._num_records

  def __repr__(self) -> str:
    return (f"SyntheticSource(seq_len={self._seq_len}, text_vocab={self._text_vocab}, "
            f"num_modalities={self._num_modalities}, seed={self._seed})")

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Returns one packed row: [seq] arrays and positions [seq, 3]."""
    rng = np.random.default_rng((self._seed, int(index)))
    s = self._seq_len
    out = {
        "tokens": np.zeros(s, np.int32),
        "targets": np.zeros(s, np.int32),
        "loss_mask": np.zeros(s, np.float32),
        "modality": np.zeros(s, np.int32),
        "positions": np.zeros((s, 3), np.int32),
        "segment_ids": np.zeros(s, np.int32),
        "group_ids": np.zeros(s, np.int32),
    }
    start, next_group = 0, 1
    for doc, length in enumerate(self._doc_lengths(rng)):
      sl = slice(start, start + length)
      out["segment_ids"][sl] = doc + 1
      is_image = (self._num_modalities > 1 and length >= 1 + 2 * _GROUP
                  and rng.random() < _IMAGE_PROB)
      if is_image:
        next_group = self._image_doc(rng, out, start, length, next_group)
      else:
        self._text_doc(rng, out, start, length)
      start += length
    return out

  def _doc_lengths(self, rng: np.random.Generator) -> list[int]:
    """Splits the row into 2-3 documents of >= _MIN_DOC tokens (one if the row is short)."""
    n = max(1, min(int(rng.integers(2, 4)), self._seq_len // _MIN_DOC))
    if n == 1:
      return [self._seq_len]
    spare = self._seq_len - n * _MIN_DOC
    cuts = np.sort(rng.integers(0, spare + 1, n - 1))
    return [int(x) + _MIN_DOC for x in np.diff(np.concatenate([[0], cuts, [spare]]))]

  def _noisy(self, rng: np.random.Generator, ids: np.ndarray, low: int, high: int) -> np.ndarray:
    flip = rng.random(ids.shape) < _NOISE
    return np.where(flip, rng.integers(low, high, ids.shape), ids)

  def _text_doc(self, rng: np.random.Generator, out: dict, start: int, length: int) -> None:
    """Fills a text document: pattern tokens, next-token targets, t=h=w=index."""
    i = np.arange(length)
    if rng.random() < 0.5:
      phrase = self._phrases[rng.integers(_NUM_PHRASES)]
      ids = phrase[(rng.integers(_PHRASE_LEN) + i) % _PHRASE_LEN]
    else:
      step = _COUNT_STEPS[rng.integers(len(_COUNT_STEPS))]
      ids = (rng.integers(self._text_vocab) + step * i) % self._text_vocab
    ids = self._noisy(rng, ids, 0, self._text_vocab)
    sl = slice(start, start + length)
    out["tokens"][sl] = ids
    out["targets"][start:start + length - 1] = ids[1:]
    out["loss_mask"][start:start + length - 1] = 1.0
    out["modality"][sl] = MODALITY_TEXT
    out["positions"][sl] = i[:, None]

  def _image_doc(self, rng: np.random.Generator, out: dict, start: int, length: int,
                 first_group: int) -> int:
    """Fills a text prefix plus groups of codes; returns the next free group id."""
    prefix = 1 + (length - 1) % _GROUP
    num_groups = (length - prefix) // _GROUP
    self._text_doc(rng, out, start, prefix)
    base_codes = rng.integers(0, self._image_vocab, _GROUP)
    step = int(rng.integers(1, 4))
    g = np.arange(num_groups)[:, None]
    codes = (base_codes[None, :] + step * g) % self._image_vocab  # [groups, slot]
    codes = self._noisy(rng, codes, 0, self._image_vocab) + self._text_vocab
    sl = slice(start + prefix, start + length)
    out["tokens"][sl] = codes.reshape(-1)
    # Next-group targets: slot j of group g predicts slot j of group g + 1.
    out["targets"][start + prefix:start + length - _GROUP] = codes[1:].reshape(-1)
    out["loss_mask"][start + prefix:start + length - _GROUP] = 1.0
    out["modality"][sl] = MODALITY_IMAGE
    out["group_ids"][sl] = np.repeat(np.arange(first_group, first_group + num_groups), _GROUP)
    slot = np.arange(_GROUP)
    base = prefix + 2 * g  # [groups, 1]
    pos = np.stack([base + 0 * slot, base + slot // 2, base + slot % 2], axis=-1)
    out["positions"][sl] = pos.reshape(-1, 3)
    return first_group + num_groups


def make_dataset(*, seq_len: int, vocab_size: int, num_modalities: int, seed: int,
                 shuffle_seed: int, local_batch_size: int, process_index: int,
                 process_count: int) -> grain.MapDataset:
  """Returns this process's batches: global batch b holds records [b*G, (b+1)*G).

  Process p reads rows [p*L, (p+1)*L) of every global batch (L = local batch,
  G = L * process_count), so the global batch does not depend on the process
  count.
  """
  source = SyntheticSource(seq_len=seq_len, vocab_size=vocab_size,
                           num_modalities=num_modalities, seed=seed)
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  ds = ds.batch(local_batch_size, drop_remainder=True)
  # Local batch k*P + p is process p's share of global batch k.
  return ds[process_index::process_count]
