"""The unified sequence (DESIGN.md): one vocabulary, interleaved documents, packing.

Vocabulary (`VocabularyLayout`): [text ids | image codes, one range per scale |
audio level-1 codes | specials BOI EOI BOV EOV BOA EOA SOS]. PAD and EOS are the
text vocabulary's (seqio convention: pad 0, eos 1). `vocab_size` sets
`config.model.vocab_size`.

Per position of a document (all int32 unless stated; L = document length):
  tokens, targets [L]; loss_mask [L] float32; modality [L] (`Modality`);
  positions [L, 3] = (t, h, w); group_ids [L] (0 = none, else one per vision scale);
  audio_codes [L, K]: the K raw codec codes of the frame whose level-1 code is the
    input token here (-1 elsewhere; level 0 equals tokens - audio offset);
  audio_targets [L, K]: the K raw codes of the frame whose level-1 code is the
    target here (-1 elsewhere; level 0 equals targets - audio offset).
Packing adds segment_ids [L] (1, 2, ... per document in a row, 0 = padding).

Target conventions (what position p learns; loss only where loss_mask = 1):
- Text and audio: next token, targets[p] = tokens[p + 1]; a document's last
  position predicts EOS. Audio is next-codec prediction: the backbone predicts the
  next frame's level-1 code; audio heads read audio_targets[p, 1:] (levels 2..K of
  that same frame, teacher-forced on audio_targets[p, :l]). Audio positions carry
  loss in both directions (audio->text and text->audio).
- Vision generation (caption->image, text->video): next-frame-and-scale
  prediction after VAR (arXiv 2404.02905) / ERNIE 5.0. Each (frame, scale) is one
  group (bidirectional inside, causal to everything before). The group of scale k
  has one position per code of scale k, its targets are scale k's codes, and its
  input tokens are the codes of scale k-1 at the parent cell (nearest upsampling,
  cell (i, j) <- (i * s_{k-1} // s_k, j * s_{k-1} // s_k)); scale 1's single position
  holds SOS. So a group never sees its own targets and is predicted in parallel
  from all earlier scales and frames. Layout: [BOI] [SOS] [up(c1)] ... [up(c_{n-1})]
  [EOI]; BOI's target (SOS) is structural (mask 0); nothing predicts EOI (the
  sampler appends it after the last scale); EOI predicts the next text token/EOS.
- Vision understanding (image->caption, video->text): [BOI] [c1] [c2] ... [cn]
  [EOI] with the codes themselves as inputs (each scale one group) and no loss
  inside; EOI predicts the caption's first token.
Modality: a span's opening special (BOI/BOV/BOA) and SOS take the span's
modality; the closing special (EOI/EOV/EOA) is text (it predicts text).

Positions (Uni-RoPE): a running index r starts at 0 in every document; text,
audio and special tokens get (r, r, r) and advance r by 1. A vision block of F
frames with top scale S starts at b = r and gives cell (i, j) of scale s in frame f
(b + f, b + floor((i + 0.5) * S / s), b + floor((j + 0.5) * S / s)) -- centre-aligned
across scales -- then r = b + max(F, S) (as Qwen2-VL's M-RoPE continues text).

Packing (`pack_documents` via grain's FirstFitPackIterDataset): documents are
placed first-fit into rows of seq_len; positions restart per document because
they are computed per document. Text documents longer than seq_len are split into
seq_len chunks (each its own document, positions restarted); other documents are
truncated to seq_len (a cut group keeps its targets; choose scales/frames so that
documents fit). Group ids are renumbered to be unique within a row.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import numpy as np

SPECIALS = ("BOI", "EOI", "BOV", "EOV", "BOA", "EOA", "SOS")


class Modality(enum.IntEnum):
  """Values of the `modality` field (same order as input_pipeline.MODALITIES)."""
  TEXT = 0
  IMAGE = 1
  VIDEO = 2
  AUDIO = 3


@dataclasses.dataclass(frozen=True)
class VocabularyLayout:
  """Offsets and sizes of each modality's id range in the one vocabulary."""
  text_size: int = 1024
  image_scales: tuple[int, ...] = (1, 2, 4, 8)  # One codebook (id range) per scale.
  image_codebook_size: int = 64
  audio_levels: int = 4  # Only level 1 is in the vocabulary; levels 2..K go to audio heads.
  audio_codebook_size: int = 128
  pad_id: int = 0  # Text vocabulary's pad.
  eos_id: int = 1  # Text vocabulary's EOS.

  @property
  def image_offset(self) -> int:
    """First image-code id (scale 0's codebook)."""
    return self.text_size

  def image_code_offset(self, scale_index: int) -> int:
    """First id of scale `scale_index`'s codebook."""
    if not 0 <= scale_index < len(self.image_scales):
      raise ValueError(f"scale_index={scale_index} is not accepted: expected 0.."
                       f"{len(self.image_scales) - 1}")
    return self.image_offset + scale_index * self.image_codebook_size

  @property
  def audio_offset(self) -> int:
    """First audio level-1 code id."""
    return self.image_offset + len(self.image_scales) * self.image_codebook_size

  @property
  def special_offset(self) -> int:
    """First special-token id."""
    return self.audio_offset + self.audio_codebook_size

  def special(self, name: str) -> int:
    """Id of a special token by name (one of SPECIALS)."""
    if name not in SPECIALS:
      raise ValueError(f"special token name={name!r} is not accepted: expected one of {SPECIALS}")
    return self.special_offset + SPECIALS.index(name)

  @property
  def vocab_size(self) -> int:
    """Total ids: set config.model.vocab_size to this (or more)."""
    return self.special_offset + len(SPECIALS)

  def ranges(self) -> dict[str, tuple[int, int]]:
    """[start, stop) id range of each part of the vocabulary."""
    return {"text": (0, self.text_size), "image": (self.image_offset, self.audio_offset),
            "audio": (self.audio_offset, self.special_offset),
            "special": (self.special_offset, self.vocab_size)}

  @classmethod
  def from_tokenizers(cls, tokenizers) -> "VocabularyLayout":
    """Layout matching a tokenizers.Tokenizers bundle."""
    return cls(text_size=tokenizers.text.vocab_size,
               image_scales=tuple(tokenizers.image.spec.scales),
               image_codebook_size=tokenizers.image.spec.codebook_size,
               audio_levels=tokenizers.audio.spec.levels,
               audio_codebook_size=tokenizers.audio.spec.codebook_size,
               pad_id=tokenizers.text.pad_id, eos_id=tokenizers.text.eos_id)


# Per-position fields of a document, their dtype and padding value. 2-D fields: [L, x].
FIELDS = ("tokens", "targets", "loss_mask", "modality", "positions", "group_ids",
          "audio_codes", "audio_targets")
_PAD = {"tokens": 0, "targets": 0, "loss_mask": 0.0, "modality": 0, "positions": 0,
        "group_ids": 0, "audio_codes": -1, "audio_targets": -1}


def _upsample_nearest(codes: np.ndarray, side: int) -> np.ndarray:
  """Parent code of each cell: [s, s] -> [side, side] (cell i <- i * s // side)."""
  idx = np.arange(side) * codes.shape[0] // side
  return codes[np.ix_(idx, idx)]


@functools.lru_cache(maxsize=None)
def _vision_grid(side: int, top: int) -> np.ndarray:
  """(0, h, w) of each cell of a side x side map, centre-aligned on a top x top grid."""
  c = ((np.arange(side) + 0.5) * top / side).astype(np.int32)  # floor: centre-aligned.
  h, w = np.meshgrid(c, c, indexing="ij")
  grid = np.stack([np.zeros_like(h), h, w], -1).reshape(-1, 3)  # [side * side, 3]
  grid.flags.writeable = False
  return grid


class DocumentWriter:
  """Appends text, special, vision and audio parts to one document (see module doc)."""

  def __init__(self, layout: VocabularyLayout):
    self.layout = layout
    self._cols = {k: [] for k in FIELDS}
    self._r = 0  # Running position index.
    self._group = 0  # Last group id used.
    self._pending = False  # True: the last position's target is the next token emitted.

  def _add(self, tokens, modality, positions, *, targets=None, loss=0.0, groups=0,
           audio_codes=None, audio_targets=None):
    n = len(tokens)
    k = self.layout.audio_levels
    cols = self._cols
    cols["tokens"].append(np.asarray(tokens, np.int32))
    cols["targets"].append(np.full(n, self.layout.pad_id, np.int32) if targets is None
                           else np.asarray(targets, np.int32))
    cols["loss_mask"].append(np.full(n, loss, np.float32))
    cols["modality"].append(np.full(n, int(modality), np.int32))
    cols["positions"].append(np.asarray(positions, np.int32).reshape(n, 3))
    cols["group_ids"].append(np.full(n, groups, np.int32))
    cols["audio_codes"].append(np.full((n, k), -1, np.int32) if audio_codes is None
                               else np.asarray(audio_codes, np.int32))
    cols["audio_targets"].append(np.full((n, k), -1, np.int32) if audio_targets is None
                                 else np.asarray(audio_targets, np.int32))

  def _set_last(self, field: str, value) -> None:
    """Writes value at the document's last position."""
    self._cols[field][-1][-1] = value

  def _resolve(self, token: int, loss: float, audio_target=None) -> None:
    """Sets the pending (last) position's target to `token` (the next-token convention)."""
    if not self._pending:
      return
    self._set_last("targets", token)
    self._set_last("loss_mask", loss)
    if audio_target is not None:
      self._set_last("audio_targets", audio_target)
    self._pending = False

  def _text_positions(self, n: int) -> np.ndarray:
    r = np.arange(self._r, self._r + n, dtype=np.int32)
    self._r += n
    return np.repeat(r[:, None], 3, 1)  # [n, 3]

  def text(self, ids: np.ndarray, *, loss: bool = True) -> "DocumentWriter":
    """Text ids [n]: next-token targets; the last one waits for what comes next."""
    ids = np.asarray(ids, np.int32)
    if not len(ids):
      return self
    self._resolve(int(ids[0]), float(loss))
    targets = np.append(ids[1:], self.layout.pad_id)
    self._add(ids, Modality.TEXT, self._text_positions(len(ids)), targets=targets,
              loss=float(loss))
    self._pending = True
    return self

  def special(self, name: str, modality: Modality, *, predicted: bool = True) -> "DocumentWriter":
    """One special token; the previous position predicts it (with loss if `predicted`)."""
    tok = self.layout.special(name)
    self._resolve(tok, float(predicted))
    self._add([tok], modality, self._text_positions(1))
    self._pending = True
    return self

  def vision(self, frames: list[list[np.ndarray]], modality: Modality, *,
             generate: bool) -> "DocumentWriter":
    """Frames, each a list of raw code maps [s, s] (a prefix of the layout's scales)."""
    open_tok, close_tok = ("BOI", "EOI") if modality == Modality.IMAGE else ("BOV", "EOV")
    self.special(open_tok, modality)
    sides = [m.shape[0] for m in frames[0]]
    if sides != list(self.layout.image_scales[:len(sides)]):
      raise ValueError(f"code map sides={sides} are not accepted: expected a prefix of the "
                       f"layout's image_scales={self.layout.image_scales}")
    offsets = [self.layout.image_code_offset(k) for k in range(len(sides))]
    top, base = sides[-1], self._r
    if generate:
      # BOI -> SOS is structure, not content: no loss.
      self._resolve(self.layout.special("SOS"), 0.0)
    else:
      self._pending = False  # Nothing inside an understood image is a target.
    for f, maps in enumerate(frames):
      for k, (side, codes) in enumerate(zip(sides, maps)):
        self._group += 1
        ids = codes.reshape(-1) + offsets[k]
        pos = _vision_grid(side, top) + (base + np.array([f, 0, 0], np.int32))
        if generate:
          inputs = (np.array([self.layout.special("SOS")]) if k == 0 else
                    _upsample_nearest(maps[k - 1], side).reshape(-1) + offsets[k - 1])
          self._add(inputs, modality, pos, targets=ids, loss=1.0, groups=self._group)
        else:
          self._add(ids, modality, pos, groups=self._group)
    self._r = base + max(len(frames), top)
    self.special(close_tok, Modality.TEXT, predicted=False)
    return self

  def audio(self, codes: np.ndarray, *, loss: bool = True) -> "DocumentWriter":
    """Audio codes [T, K] (raw): BOA, one position per frame (level-1 token), EOA."""
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 2 or codes.shape[1] != self.layout.audio_levels:
      raise ValueError(f"audio codes.shape={codes.shape} is not accepted: expected [T, "
                       f"{self.layout.audio_levels}]")
    self.special("BOA", Modality.AUDIO)
    level1 = codes[:, 0] + self.layout.audio_offset
    self._resolve(int(level1[0]), float(loss), audio_target=codes[0])
    targets = np.append(level1[1:], self.layout.special("EOA"))
    audio_targets = np.concatenate([codes[1:], np.full((1, codes.shape[1]), -1, np.int32)])
    self._add(level1, Modality.AUDIO, self._text_positions(len(codes)), targets=targets,
              loss=float(loss), audio_codes=codes, audio_targets=audio_targets)
    self._add([self.layout.special("EOA")], Modality.TEXT, self._text_positions(1))
    self._pending = True
    return self

  def finish(self) -> dict[str, np.ndarray]:
    """Closes the document (the pending position predicts EOS); returns its fields."""
    self._resolve(self.layout.eos_id, 1.0)
    return {k: np.concatenate(v) for k, v in self._cols.items()}


# --- documents of each task ---------------------------------------------------------------
TASKS = ("caption_to_image", "image_to_caption", "video_to_text", "audio_to_text",
         "text_to_audio", "text_to_video")


def digits_document(task: str, rec: dict, layout: VocabularyLayout, *,
                    variant: int = 0) -> dict[str, np.ndarray]:
  """One document of `task` from an encoded digits record (multimodal.EncodedDigitsSource).

  variant 1 swaps the caption for the question/answer text (image_to_caption,
  audio_to_text); other tasks ignore it.
  """
  w = DocumentWriter(layout)
  image, video, audio = [rec["image_codes"]], rec["video_codes"], rec["audio_codes"]
  if task == "caption_to_image":
    return w.text(rec["caption"]).vision(image, Modality.IMAGE, generate=True).finish()
  if task == "image_to_caption":
    text = rec["qa"] if variant else rec["caption"]
    return w.vision(image, Modality.IMAGE, generate=False).text(text).finish()
  if task == "video_to_text":
    return w.vision(video, Modality.VIDEO, generate=False).text(rec["video_caption"]).finish()
  if task == "audio_to_text":
    text = rec["audio_qa"] if variant else rec["audio_caption"]
    return w.audio(audio).text(text).finish()
  if task == "text_to_audio":
    return w.text(rec["audio_caption"]).audio(audio).finish()
  if task == "text_to_video":
    return w.text(rec["video_caption"]).vision(video, Modality.VIDEO, generate=True).finish()
  raise ValueError(f"task={task!r} is not accepted: known tasks are {TASKS + ('text',)}")


def text_documents(ids: np.ndarray, layout: VocabularyLayout, max_len: int
                   ) -> list[dict[str, np.ndarray]]:
  """Plain text ids [n] -> documents of <= max_len positions (longer text is split)."""
  ids = np.asarray(ids, np.int32)
  return [DocumentWriter(layout).text(ids[i:i + max_len]).finish()
          for i in range(0, max(len(ids), 1), max_len) if len(ids[i:i + max_len])]


def truncate(doc: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
  """Keeps the first max_len positions of a document."""
  if len(doc["tokens"]) <= max_len:
    return doc
  return {k: v[:max_len] for k, v in doc.items()}


# --- packing ------------------------------------------------------------------------------
def pack_documents(docs, *, seq_len: int, num_packing_bins: int, seed: int = 0):
  """grain IterDataset of documents -> IterDataset of packed rows (first-fit, grain)."""
  import grain
  length = {k: seq_len for k in FIELDS}
  padding = dict(_PAD)
  packed = grain.experimental.FirstFitPackIterDataset(
      docs, length_struct=length, num_packing_bins=num_packing_bins, seed=seed,
      shuffle_bins=False, meta_features=[k for k in FIELDS if k != "tokens"],
      padding_struct=padding)
  return packed.map(finish_packed_row)


def finish_packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's packing outputs to the batch contract; makes group ids row-unique."""
  seg = row.pop("tokens_segment_ids")
  row.pop("tokens_positions", None)
  row["segment_ids"] = seg
  row["group_ids"] = unique_groups(row["group_ids"], seg)
  row["loss_mask"] = row["loss_mask"].astype(np.float32)
  return row


def unique_groups(group_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """Offsets each segment's nonzero group ids past the previous segments' ([S] -> [S])."""
  out = group_ids.astype(np.int32).copy()
  offset = 0
  for s in np.unique(segment_ids[segment_ids > 0]):
    sel = (segment_ids == s) & (group_ids > 0)
    if sel.any():
      out[sel] += offset
      offset = int(out[sel].max())
  return out


def mtp_targets(batch, depth: int):
  """(targets, mask) for multi-token prediction `depth` steps past the next token.

  Position p's depth-d target is targets[p + d], valid when positions p..p+d form a
  next-token chain in one segment (targets[q] == tokens[q + 1]) and loss_mask[p + d] > 0.
  Works on numpy or jax arrays [B, S]; callers restrict to modality TEXT as they wish.
  """
  import jax.numpy as jnp
  tokens, targets = jnp.asarray(batch["tokens"]), jnp.asarray(batch["targets"])
  seg, mask = jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["loss_mask"])
  b, s = tokens.shape
  chain = (targets[:, :-1] == tokens[:, 1:]) & (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] > 0)
  chain = jnp.concatenate([chain, jnp.zeros((b, 1), bool)], 1)  # [B, S]: p -> p+1 linked.
  valid = mask > 0
  out_t = targets
  for _ in range(depth):
    valid = valid & chain
    out_t = jnp.concatenate([out_t[:, 1:], jnp.zeros((b, 1), out_t.dtype)], 1)
    chain = jnp.concatenate([chain[:, 1:], jnp.zeros((b, 1), bool)], 1)
  # valid[p] now: chain over p..p+depth; the shifted loss mask must hold at p + depth.
  shifted_mask = jnp.concatenate([mask[:, depth:], jnp.zeros((b, depth), mask.dtype)], 1)
  return out_t, (valid & (shifted_mask > 0)).astype(jnp.float32)
