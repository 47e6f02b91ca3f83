"""Reading records safely: a corrupt record is a named error, or a counted skip.

  skips = records.SkipCounter(max_fraction=config.data.max_skip_fraction)
  source = records.GuardedSource(raw, "stdlib_text", skips, skip=True, locate=locate)
  source[i]      # the record; None when unreadable and skipping (counted in `skips`)

Every random-access source the pipelines read (the embedded multimodal records, the stdlib
text corpus, tfds: ArrayRecord text) goes through GuardedSource. Without skipping, an
unreadable record raises DataError naming the source, the shard file and the record in it.
With data.skip_corrupt the record is skipped and counted per source (and per document kind a
pipeline reports with `lost`); the trainer logs the counts of each interval and writes them as
metrics; once more than data.max_skip_fraction of a source's records (after the first
MIN_READS) were unreadable, DataError stops the run: a truncated shard must not quietly
remove a modality from training.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable

import numpy as np

MIN_READS = 100  # Records of a source read before its skip fraction is checked.


class DataError(ValueError):
  """A record could not be read or decoded, or too many were skipped."""


class SkipCounter:
  """Per-source counts of records read and skipped (thread-safe); see the module doc."""

  def __init__(self, max_fraction: float = 1.0):
    self.max_fraction = max_fraction
    self._lock = threading.Lock()
    self.read: collections.Counter = collections.Counter()  # source -> records read
    self.skipped: collections.Counter = collections.Counter()  # source -> unreadable
    self.lost: collections.Counter = collections.Counter()  # "source/kind" -> documents lost
    self._reported: collections.Counter = collections.Counter()

  def count_read(self, source: str) -> None:
    """One record of `source` was read (readable or not)."""
    with self._lock:
      self.read[source] += 1

  def count_skip(self, source: str, where: str) -> None:
    """One record of `source` was unreadable and skipped; DataError over max_fraction."""
    with self._lock:
      self.skipped[source] += 1
      read, skipped = self.read[source], self.skipped[source]
    if read >= MIN_READS and skipped > self.max_fraction * read:
      raise DataError(
          f"{skipped} of the {read} records of {source} read so far are unreadable (latest: "
          f"{where}), over config.data.max_skip_fraction={self.max_fraction}: repair or rebuild "
          "the data (the embedded datasets rebuild when their directory under data.data_dir "
          "is deleted), or raise data.max_skip_fraction")

  def count_lost(self, source: str, kind: str) -> None:
    """A document of `kind` (e.g. a task) that a skipped record of `source` would have made."""
    with self._lock:
      self.lost[f"{source}/{kind}"] += 1

  def interval(self) -> dict[str, int]:
    """Skips since the last call, as metrics: data/skipped/<source>[/<kind>] (nonzero only)."""
    with self._lock:
      now = {f"data/skipped/{k}": v for k, v in self.skipped.items()}
      now.update({f"data/skipped/{k}": v for k, v in self.lost.items()})
      new = {k: v - self._reported[k] for k, v in now.items() if v > self._reported[k]}
      self._reported.update(new)
    return new


class GuardedSource:
  """A random-access source whose unreadable records raise DataError or are skipped (None)."""

  def __init__(self, source, name: str, counter: SkipCounter | None, *, skip: bool,
               locate: Callable[[int], tuple[str, int]] | None = None):
    self._source, self.name, self._counter, self._skip = source, name, counter, skip
    self._locate = locate

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Any:
    if self._counter is not None:
      self._counter.count_read(self.name)
    try:
      return self._source[int(index)]
    except Exception as e:  # pylint: disable=broad-except  (any read or decode failure)
      where = f"record {int(index)} of {self.name}"
      if self._locate is not None:
        shard, j = self._locate(int(index))
        where = f"shard {shard} record {j} ({where})"
      if not self._skip:
        raise DataError(f"corrupt or truncated {where}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''} (set "
                        "data.skip_corrupt=True to skip and count such records)") from e
      if self._counter is not None:
        self._counter.count_skip(self.name, where)
      return None


def shard_locator(builder, split: str) -> Callable[[int], tuple[str, int]]:
  """Maps a split-level record index of a TFDS builder to (shard file name, index in shard)."""
  info = builder.info.splits[split]
  lengths = np.cumsum([0] + list(info.shard_lengths))
  names = [os.path.basename(str(f)) for f in info.filenames]

  def locate(index: int) -> tuple[str, int]:
    shard = int(np.searchsorted(lengths, index, side="right") - 1)
    return names[shard], int(index - lengths[shard])
  return locate
