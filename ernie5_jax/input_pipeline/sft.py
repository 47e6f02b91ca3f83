"""Instruction SFT data: prompt + reference response of the verifiable families, as batches.

  it = sft.sft_batches(config, split="train", batch_size=8, seq_len=128, seed=0)
  batch = next(it)        # the pre-training batch dict (input_pipeline/multimodal.py keys)
  state = it.get_state()  # grain state: saved with the checkpoint, set_state resumes exactly

Each example is the document verifiable.py builds for one prompt (`verifiable.example`): the
prompt's parts written by DocumentWriter exactly as pre-training writes them, then the
reference response (text answer + EOS, or the real image's next-scale groups). loss_mask
is 1 only where the target is a response token: text families, from the prompt's last
position (whose target is the answer's first id) to the position that predicts EOS;
caption_image, the image's code groups (not BOI -> SOS, which is structure, nor EOI -> EOS,
which the image sampler appends and never generates).

Pipeline (grain, checkpointable like the pre-training one): element g of this process
(global element g * process_count + process_index) draws its family by `families` weights
and a prompt index from rng((seed, global element)), so the stream is a pure function of
(seed, element); documents are packed first-fit into rows of seq_len
(sequence.pack_documents, positions restart per document) and batched, drop_remainder.
A document longer than seq_len raises (a truncated answer would teach a wrong one).
"""

from __future__ import annotations

from typing import Mapping

import grain
import jax
import numpy as np

from ernie5_jax.input_pipeline import sequence as seq_lib
from ernie5_jax.input_pipeline import verifiable

_ELEMENTS = 2**62  # Elements of the (virtually endless) example stream.


def family_weights(families: Mapping[str, float] | str | None) -> dict[str, float]:
  """Validated {family: weight > 0}; None -> every family, equal weights; "a:1,b:2" accepted."""
  if families is None:
    return {f: 1.0 for f in verifiable.FAMILIES}
  if isinstance(families, str):
    families = {k.strip(): float(v) for k, v in (p.split(":") for p in families.split(",") if p)}
  out = {}
  for name, w in dict(families).items():
    if name not in verifiable.FAMILIES:
      raise ValueError(f"families has name={name!r}, which is not accepted: expected one of "
                       f"{verifiable.FAMILIES}")
    if float(w) < 0:
      raise ValueError(f"families[{name!r}]={w} is not accepted: expected a weight >= 0")
    if float(w) > 0:
      out[name] = float(w)
  if not out:
    raise ValueError(f"families={families!r} is not accepted: expected a positive weight")
  return out


def sft_document(example: verifiable.Example) -> dict[str, np.ndarray]:
  """The example's full document with loss_mask 1 exactly where the target is a response id."""
  doc = dict(example.document)
  n, n_prompt = len(doc["tokens"]), len(example.prompt["tokens"])
  mask = np.zeros((n,), np.float32)
  if verifiable.RESPONSE_KINDS[example.family] == "image":
    mask[n_prompt:] = doc["group_ids"][n_prompt:] > 0  # The image's groups (targets = codes).
  else:
    mask[n_prompt - 1:] = 1.0  # Targets: answer ids, then EOS.
  doc["loss_mask"] = mask
  return doc


def element_example(data: verifiable.TaskData, weights: Mapping[str, float], *, split: str,
                    seed: int, element: int) -> verifiable.Example:
  """The example of global stream element `element`: family and prompt from rng((seed, element))."""
  names = list(weights)
  cum = np.cumsum([weights[k] for k in names]) / sum(weights.values())
  u = np.random.default_rng((seed, element))
  family = names[min(int(np.searchsorted(cum, u.random(), side="right")), len(names) - 1)]
  n = data.num_records(split)
  # Pairs (image_arithmetic) range over n * n prompt indices, single records over n.
  index = int(u.integers(n * n if family == "image_arithmetic" else n))
  return verifiable.example(data, family, split, index)


def sft_dataset(config, *, split: str, batch_size: int, seq_len: int, seed: int,
                families: Mapping[str, float] | str | None = None,
                process_index: int | None = None, process_count: int | None = None
                ) -> grain.IterDataset:
  """grain IterDataset of SFT batches of this process ([batch_size, seq_len] per field)."""
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len}, batch_size={batch_size} are not accepted: expected "
                     "seq_len >= 2 and batch_size >= 1")
  if split not in verifiable.SPLITS:
    raise ValueError(f"split={split!r} is not accepted: expected one of {verifiable.SPLITS}")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  weights = family_weights(families)
  data = verifiable.task_data(config)

  def to_document(g: int) -> dict[str, np.ndarray]:
    ex = element_example(data, weights, split=split, seed=seed,
                         element=int(g) * process_count + process_index)
    doc = sft_document(ex)
    if len(doc["tokens"]) > seq_len:
      raise ValueError(f"seq_len={seq_len} is not accepted: a {ex.family} SFT document needs "
                       f"{len(doc['tokens'])} positions")
    return doc

  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # Cheap Python work.
  docs = grain.MapDataset.range(0, _ELEMENTS).map(to_document).to_iter_dataset(read)
  rows = seq_lib.pack_documents(docs, seq_len=seq_len, num_packing_bins=2 * batch_size,
                                seed=seed)
  return rows.batch(batch_size, drop_remainder=True)


def sft_batches(config, *, split: str, batch_size: int, seq_len: int, seed: int,
                families: Mapping[str, float] | str | None = None, **shard
                ) -> grain.DatasetIterator:
  """Checkpointable iterator (get_state / set_state) of SFT batch dicts; see sft_dataset."""
  return iter(sft_dataset(config, split=split, batch_size=batch_size, seq_len=seq_len,
                          seed=seed, families=families, **shard))
