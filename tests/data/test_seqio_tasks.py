"""seqio registry and the named-source text pipeline (TFDS and seqio)."""

import numpy as np
import pytest

from ernie5_jax.input_pipeline import seqio_tasks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / "shared_data")


def _check(batch, seq_len=32):
  assert batch["tokens"].shape == (2, seq_len)
  assert (batch["modality"] == 0).all() and (batch["group_ids"] == 0).all()
  seg = batch["segment_ids"]
  nxt = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
  np.testing.assert_array_equal(batch["targets"][:, :-1][nxt], batch["tokens"][:, 1:][nxt])


def test_tfds_source_and_resume(data_dir):
  ds = seqio_tasks.make_text_pipeline("tfds:stdlib_text", seq_len=32, batch_size=2, seed=0,
                                      data_dir=data_dir)
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  _check(first[0])
  it2 = iter(ds)
  next(it2)
  it3 = iter(ds)
  it3.set_state(it2.get_state())
  np.testing.assert_array_equal(next(it3)["tokens"], first[1]["tokens"])


def test_seqio_mixture_and_resume(data_dir):
  assert seqio_tasks.register_tasks(data_dir) == [seqio_tasks.STDLIB_TASK,
                                                  seqio_tasks.TEXT_MIXTURE]
  ds = seqio_tasks.make_text_pipeline("seqio:" + seqio_tasks.TEXT_MIXTURE, seq_len=32,
                                      batch_size=2, seed=0, data_dir=data_dir)
  it = iter(ds)
  a, b = next(it), next(it)
  _check(a)
  it2 = iter(ds)
  next(it2)
  it3 = iter(ds)
  it3.set_state(it2.get_state())
  np.testing.assert_array_equal(next(it3)["tokens"], b["tokens"])


def test_unknown_names(data_dir):
  with pytest.raises(ValueError, match="expected 'tfds:NAME"):
    seqio_tasks.make_text_pipeline("c4", seq_len=32, batch_size=2, seed=0, data_dir=data_dir)
  with pytest.raises(ValueError, match="known tasks and mixtures"):
    seqio_tasks.make_text_pipeline("seqio:nope", seq_len=32, batch_size=2, seed=0,
                                   data_dir=data_dir)
  with pytest.raises(ValueError, match="embedded datasets are"):
    seqio_tasks.make_text_pipeline("tfds:not_a_dataset", seq_len=32, batch_size=2, seed=0,
                                   data_dir=data_dir)
