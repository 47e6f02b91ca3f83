"""Prompt documents for generation and rollouts, laid out as training lays out documents.

Prompts are written with `sequence.DocumentWriter` (so their positions, groups and
specials are the training ones) and left-padded to one length with segment 0
(`pad_prompts`), as the KV-cache decoder (model/kv_cache.py) expects: the decoding loops
(generate/loops.py) and the RL rollouts prefill them in one step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ernie5_jax.input_pipeline import sequence as seq_lib


@dataclasses.dataclass
class Prompts:
  """Left-padded prompt batch (fields [batch, P, ...]) and where each row's document goes on."""
  fields: dict[str, np.ndarray]
  next_position: np.ndarray  # [batch] int32: the running position index r after the prompt
  next_group: int  # First group id not used by any prompt


def pad_prompts(docs: Sequence[dict[str, np.ndarray]], *, audio_levels: int,
                length: int | None = None) -> Prompts:
  """Stacks DocumentWriter documents left-padded to `length` (default: the longest).

  Each prompt must end in a text or special token (group 0), whose t position + 1 is the
  next running index (DocumentWriter's convention).
  """
  longest = max(len(d["tokens"]) for d in docs)
  length = longest if length is None else length
  if length < longest:
    raise ValueError(f"length={length} is not accepted: expected >= the longest prompt "
                     f"({longest} positions)")
  b = len(docs)
  fields = {"tokens": np.zeros((b, length), np.int32),
            "positions": np.zeros((b, length, 3), np.int32),
            "segment_ids": np.zeros((b, length), np.int32),
            "group_ids": np.zeros((b, length), np.int32),
            "audio_codes": np.full((b, length, audio_levels), -1, np.int32)}
  next_position = np.zeros((b,), np.int32)
  for i, d in enumerate(docs):
    n = len(d["tokens"])
    if d["group_ids"][-1] != 0:
      raise ValueError(f"prompt {i} ends inside a group: expected a text or special token last")
    for k in ("tokens", "positions", "group_ids"):
      fields[k][i, length - n:] = d[k]
    fields["segment_ids"][i, length - n:] = 1
    codes = d["audio_codes"][:, :audio_levels]
    fields["audio_codes"][i, length - n:, :codes.shape[1]] = codes
    next_position[i] = d["positions"][-1, 0] + 1
  next_group = 1 + max(int(d["group_ids"].max(initial=0)) for d in docs)
  return Prompts(fields, next_position, next_group)


def image_prompt(layout: seq_lib.VocabularyLayout, caption: np.ndarray) -> dict[str, np.ndarray]:
  """The caption->image prompt: caption text then BOI (as DocumentWriter.vision opens it)."""
  return (seq_lib.DocumentWriter(layout).text(np.asarray(caption, np.int32))
          .special("BOI", seq_lib.Modality.IMAGE).finish())


def audio_prompt(layout: seq_lib.VocabularyLayout, caption: np.ndarray) -> dict[str, np.ndarray]:
  """The text->audio prompt: caption text then BOA (as DocumentWriter.audio opens it)."""
  return (seq_lib.DocumentWriter(layout).text(np.asarray(caption, np.int32))
          .special("BOA", seq_lib.Modality.AUDIO).finish())
