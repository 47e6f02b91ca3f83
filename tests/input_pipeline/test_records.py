"""records.py: unreadable records are named errors, or skips that are counted and capped."""

import pytest

from ernie5_jax.input_pipeline import records


class _Broken:
  """A source whose records in `bad` raise like a truncated ArrayRecord shard."""

  def __init__(self, n, bad):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i in self.bad:
      raise RuntimeError("Corrupted Riegeli/records file\nmore detail")
    return {"text": f"record {i}"}


def _locate(i):
  return (f"corpus-train.array_record-0000{i // 100}-of-00002", i % 100)


def test_unreadable_record_is_named_without_skipping():
  src = records.GuardedSource(_Broken(200, [150]), "stdlib_text:train", None, skip=False,
                              locate=_locate)
  assert src[149] == {"text": "record 149"}
  with pytest.raises(records.DataError) as e:
    src[150]
  assert str(e.value) == (
      "corrupt or truncated shard corpus-train.array_record-00001-of-00002 record 50 (record 150 "
      "of stdlib_text:train): RuntimeError: Corrupted Riegeli/records file (set "
      "data.skip_corrupt=True to skip and count such records)")


def test_skips_are_counted_per_source_and_kind_and_reported_once_per_interval():
  skips = records.SkipCounter(max_fraction=0.5)
  text = records.GuardedSource(_Broken(10, [2, 5]), "stdlib_text:train", skips, skip=True)
  digits = records.GuardedSource(_Broken(10, [7]), "digits:train", skips, skip=True)
  got = [text[i] for i in range(10)] + [digits[i] for i in range(10)]
  assert [i for i, r in enumerate(got) if r is None] == [2, 5, 17]
  skips.count_lost("digits:train", "image_to_caption")
  assert skips.read == {"stdlib_text:train": 10, "digits:train": 10}
  assert skips.interval() == {"data/skipped/stdlib_text:train": 2,
                              "data/skipped/digits:train": 1,
                              "data/skipped/digits:train/image_to_caption": 1}
  assert skips.interval() == {}  # Nothing new since.
  text[5]
  assert skips.interval() == {"data/skipped/stdlib_text:train": 1}


def test_too_many_skips_stop_the_run_naming_the_source_and_the_field():
  skips = records.SkipCounter(max_fraction=0.01)
  src = records.GuardedSource(_Broken(400, range(0, 400, 50)), "digits:train", skips, skip=True,
                              locate=_locate)
  for i in range(100):  # 2 of the first 100: over 1%, but checked from MIN_READS on.
    src[i]
  with pytest.raises(records.DataError, match=r"^3 of the 101 records of digits:train read so "
                     r"far are unreadable \(latest: shard .*00001-of-00002 record 0 .*\), over "
                     r"config.data.max_skip_fraction=0.01"):
    for i in range(100, 400):
      src[i]
