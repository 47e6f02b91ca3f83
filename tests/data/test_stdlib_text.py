"""The embedded stdlib_text corpus: prose filter, determinism, TFDS build and read."""

import pytest

import data as data_lib
from data.stdlib_text import corpus


def test_is_prose_filter():
  assert corpus.is_prose("Return the number of items in the sequence, counting duplicates.")
  assert not corpus.is_prose("x = foo(bar[0], {'a': 1}) # with a lot of code-like symbols")
  assert not corpus.is_prose("Too short.")
  assert not corpus.is_prose("lowercase start is usually a fragment of code, not a sentence.")


def test_records_are_deterministic_and_deduplicated():
  a = [r["text"] for r in corpus.iter_records("test")]
  b = [r["text"] for r in corpus.iter_records("test")]
  assert a == b and len(a) > 100
  assert len(set(a)) == len(a)


def test_bad_split_is_rejected():
  with pytest.raises(ValueError, match="'train' or 'test'"):
    next(corpus.iter_records("validation"))


def test_build_and_read(tmp_path_factory):
  b = data_lib.ensure_built("stdlib_text", str(tmp_path_factory.getbasetemp() / "shared_data"))
  src = b.as_data_source("train")
  assert len(src) > 3000
  rec = src[0]
  assert isinstance(rec["text"], bytes) and rec["text"].decode()[0].isupper()
