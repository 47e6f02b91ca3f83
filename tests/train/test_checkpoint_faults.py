"""What the checkpoint writer does when things go wrong: corrupt steps, another data stream,
a full disk. On a small stand-in model (test_checkpoint.py's), so every case is quick."""

import errno
import glob
import os
import subprocess

import numpy as np
import pytest
from absl import logging

from ernie5_jax import config as config_lib
from ernie5_jax import store
from ernie5_jax.train import checkpoint

from test_checkpoint import _abstract, _assert_trees_equal, _iterator, _state
from tiny_train_config import make_tiny_config


def _workdir_with_steps(tmp_path, steps=(1, 2), data=True):
  """A checkpoints/ dir holding `steps` of _state(seed=step) (sync writes), plus iterators."""
  manager = checkpoint.create_manager(str(tmp_path), keep=5, async_save=False, data=data)
  it = _iterator() if data else None
  run = checkpoint.run_record(make_tiny_config())
  for s in steps:
    checkpoint.save(manager, _state(seed=s, step=s), it, run=run)
  manager.close()
  return run


def _truncate_arrays(step_dir):
  for f in glob.glob(os.path.join(step_dir, "model", "**", "d", "*"), recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(16)


def _garbage(path):
  with open(path, "w") as f:
    f.write("{not json")


CORRUPTIONS = {
    "truncated arrays": _truncate_arrays,
    "garbage _METADATA": lambda d: _garbage(os.path.join(d, "model", "_METADATA")),
    "garbage iterator state": lambda d: _garbage(glob.glob(os.path.join(d, "data", "*.json"))[0]),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_restore_walks_back_past_a_corrupt_newest_step_and_moves_it_aside(tmp_path, corrupt):
  run = _workdir_with_steps(tmp_path)
  CORRUPTIONS[corrupt](str(tmp_path / "checkpoints" / "2"))
  manager = checkpoint.create_manager(str(tmp_path), keep=5, async_save=False)
  with pytest.MonkeyPatch.context() as mp:
    warnings = []
    mp.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    restored = checkpoint.restore(manager, _abstract(), _iterator(), run=run)
  # Only the restore's own lines (a CLI test in this worker may have left main's thread hooks).
  warnings = [w for w in warnings if w.startswith(("Checkpoint step", "Moved"))]
  _assert_trees_equal(restored, _state(seed=1, step=1))
  assert warnings[0].startswith("Checkpoint step 2 is unreadable, trying the one before it: "
                                f"{tmp_path}/checkpoints/2: ")
  assert "Moved the unreadable checkpoint step 2 aside to" in warnings[1]
  assert checkpoint.committed_steps(manager) == [1] and manager.latest_step() == 1
  aside = glob.glob(str(tmp_path / "checkpoints" / "2.corrupt-*"))
  assert len(aside) == 1  # Kept for inspection, out of orbax's way: step 2 can be saved again.
  checkpoint.save(manager, _state(seed=5, step=2), run=run)
  manager.wait_until_finished()
  assert checkpoint.committed_steps(manager) == [1, 2]


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
  run = _workdir_with_steps(tmp_path)
  for s in (1, 2):
    _truncate_arrays(str(tmp_path / "checkpoints" / str(s)))
  manager = checkpoint.create_manager(str(tmp_path), keep=5, async_save=False)
  with pytest.raises(store.CheckpointCorruptError, match=r"no checkpoint in .*checkpoints can be "
                     r"read \(steps \[2, 1\]; newest: .*\): move them aside"):
    checkpoint.restore(manager, _abstract(), _iterator(), run=run)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_store_names_the_corrupt_step_and_the_older_one_to_use(tmp_path):
  # The jobs (eval / export / generate) restore through the store: corruption is reported as
  # such (never as a config mismatch), with the step to pass instead.
  _workdir_with_steps(tmp_path, data=False)
  loc = store.locate(str(tmp_path))
  for corrupt in (_truncate_arrays, lambda d: _garbage(os.path.join(d, "model", "_METADATA"))):
    corrupt(str(tmp_path / "checkpoints" / "2"))
    error = store.corrupt_error(loc, ValueError("x"))
    assert str(error).endswith(f"pass --checkpoint={tmp_path}/checkpoints/1 (step 1, the newest "
                               f"older checkpoint), or delete {tmp_path}/checkpoints/2")


def test_a_resume_reading_another_data_stream_is_refused_naming_the_fields(tmp_path):
  _workdir_with_steps(tmp_path, steps=(1,))
  manager = checkpoint.create_manager(str(tmp_path), keep=5, async_save=False)
  config = make_tiny_config()
  config.data.global_batch_size = 8
  config.data.shuffle_seed = 3
  with pytest.raises(store.CheckpointMismatchError, match=re_escape(
      "was written reading another data stream (data.global_batch_size: 4 -> 8, "
      "data.shuffle_seed: 0 -> 3); its iterator position would skip or repeat examples")):
    checkpoint.restore(manager, _abstract(), _iterator(), run=checkpoint.run_record(config))
  config = make_tiny_config(num_steps=16)  # A new length is allowed, and said.
  config.data.data_dir, config.data.skip_corrupt = "/elsewhere", True  # Not part of the stream.
  with pytest.MonkeyPatch.context() as mp:
    warnings = []
    mp.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    checkpoint.restore(manager, _abstract(), _iterator(), run=checkpoint.run_record(config))
  warnings = [w for w in warnings if w.startswith("config.train.num_steps")]
  assert warnings == ["config.train.num_steps changed from 8 to 16 on resume at step 1: the "
                      "learning-rate schedule is recomputed for the new length (its decay phase "
                      "moves with the end), and steps after 1 follow it."]


def re_escape(text):
  import re  # pylint: disable=g-import-not-at-top
  return re.escape(text)


def _small_tmpfs(path):
  """Mounts a 512 KiB tmpfs at path if this machine allows it (root in a container); else None."""
  os.makedirs(path)
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(path)],
                          capture_output=True, check=False)
  except OSError:  # No mount command.
    return None
  return path if proc.returncode == 0 else None


def test_a_full_disk_is_one_error_naming_the_failed_and_the_last_good_step(tmp_path, monkeypatch):
  disk = _small_tmpfs(tmp_path / "disk")
  workdir = str(disk if disk else tmp_path / "workdir")
  try:
    manager = checkpoint.create_manager(workdir, keep=5, async_save=True, data=False)
    checkpoint.save(manager, _state(width=4, seed=1, step=1))
    manager.wait_until_finished()
    if disk is None:  # No tmpfs here: the writer fails the way tensorstore does on ENOSPC.
      def full(*args, **kwargs):
        os.makedirs(os.path.join(manager.directory, f"2{checkpoint.TMP_SUFFIX}-x", "model"))
        raise OSError(errno.ENOSPC, "No space left on device")
      monkeypatch.setattr(manager, "save", full)
      big = _state(width=4, seed=2, step=2)
    else:
      # 3 x 40000 parameters, with two Adam moments: ~1.4 MB, over the 512 KiB disk.
      big = _state(width=40000, seed=2, step=2)
      manager = checkpoint.create_manager(workdir, keep=5, async_save=True, data=False)
    with pytest.raises(store.CheckpointWriteError) as e:
      checkpoint.save(manager, big)  # Async: the failure may surface only when it is awaited.
      checkpoint.finish_writes(manager)
    assert str(e.value) == (
        f"writing checkpoint step 2 to {workdir}/checkpoints failed (no space left on device); "
        f"the partial step was removed and the last good checkpoint is step 1 "
        f"({workdir}/checkpoints/1), where a restart resumes: free space on (or move) "
        "--workdir, then run again")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  finally:
    if disk:
      subprocess.run(["umount", str(disk)], check=False)


def test_config_json_on_a_full_disk_is_a_workdir_error_and_leaves_no_tmp_file(tmp_path,
                                                                            monkeypatch):
  store.save_config(make_tiny_config(), str(tmp_path))
  before = (tmp_path / "config.json").read_text()

  def full(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(type(store.epath.Path(tmp_path)), "write_text", full)
  with pytest.raises(store.WorkdirError, match=r"could not write .*config.json \(OSError: No "
                     r"space left on device\): free space in"):
    store.save_config(config_lib.default_config(), str(tmp_path))
  assert os.listdir(tmp_path) == ["config.json"]
  assert (tmp_path / "config.json").read_text() == before
  np.testing.assert_equal(len(before) > 0, True)
