"""M2CP input: the datasets in memory, the seeded labelled split, and grain pipelines.

A train step reads one batch of labelled_batch_size + unlabelled_batch_size rows (the
labelled rows first), then, with data.strong_unlabelled, the same unlabelled objects
again under the strong augmentation (augment.py): rows [labelled | weak | strong]
(data.strong_labelled: the labelled rows are strongly augmented too). Batch number s is
a pure function of (config.seed, s), drawn in a grain MapDataset over step numbers, so
the iterator state is one integer and a resumed run reads exactly the batches it would
have read.
"""

from __future__ import annotations

import os

import grain
import ml_collections
import numpy as np

from ernie5_jax.m2cp import augment

KEYS = ("points", "views", "centers", "normals", "corners", "neighbors", "label")


def default_data_dir() -> str:
  """$ERNIE5_DATA_DIR, else ~/.cache/ernie5_jax/data (as the LM family's pipeline)."""
  return os.environ.get("ERNIE5_DATA_DIR") or os.path.expanduser("~/.cache/ernie5_jax/data")


def builder(cfg: ml_collections.ConfigDict):
  """The TFDS builder of cfg.dataset (config.data), not necessarily built."""
  # pylint: disable=g-import-not-at-top
  data_dir = cfg.data_dir or default_data_dir()
  if cfg.dataset.startswith("shapes3d"):
    from data.shapes3d import shapes3d_dataset_builder as b
    _, _, name = cfg.dataset.partition("/")
    return b.Shapes3d(data_dir=data_dir, config=name or "default", file_format="array_record")
  if cfg.dataset == "modelnet40":
    from data.modelnet40 import modelnet40_dataset_builder as b
    return b.Modelnet40(data_dir=data_dir, manual_dir=cfg.manual_dir,
                        file_format="array_record")
  raise ValueError(f"config.data.dataset={cfg.dataset!r} is not accepted")


def load_arrays(cfg: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
  """Builds the dataset once (offline), then returns {split: {key: stacked array}}."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  b = builder(cfg)
  if not b.is_prepared():
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  out = {}
  for split in ("train", "test"):
    source = b.as_data_source(split)
    rows = [source[i] for i in range(len(source))]
    out[split] = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in KEYS}
  return out


def labelled_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted indices of the labelled objects: round(fraction * n_c) (>= 1) of each class c."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction!r} is not accepted: expected a value in (0, 1]")
  rng = np.random.default_rng((seed, 1234))
  picked = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n = min(len(members), max(1, int(round(fraction * len(members)))))
    picked.append(rng.choice(members, n, replace=False))
  return np.sort(np.concatenate(picked))


def _subsample_points(points: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
  """A random subset of num points per row: [B, P, 3] -> [B, num, 3]."""
  idx = np.argsort(rng.random(points.shape[:2]), axis=1)[:, :num]
  return np.take_along_axis(points, idx[..., None], axis=1)


class TrainBatch:
  """Step number -> batch dict: labelled rows, unlabelled rows, [strong unlabelled rows]."""

  def __init__(self, arrays: dict[str, np.ndarray], labelled: np.ndarray,
               cfg: ml_collections.ConfigDict, seed: int, with_unlabelled: bool):
    self.arrays, self.labelled, self.cfg, self.seed = arrays, labelled, cfg, seed
    self.with_unlabelled = with_unlabelled

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    cfg = self.cfg
    rng = np.random.default_rng((self.seed, 77, int(step)))
    rows = [rng.choice(self.labelled, cfg.labelled_batch_size,
                       replace=len(self.labelled) < cfg.labelled_batch_size)]
    if self.with_unlabelled:
      num = len(self.arrays["label"])
      rows.append(rng.choice(num, cfg.unlabelled_batch_size,
                             replace=num < cfg.unlabelled_batch_size))
    rows = np.concatenate(rows)
    batch = {k: self.arrays[k][rows] for k in KEYS}
    pts = _subsample_points(batch["points"], cfg.num_points, rng)
    batch["points"] = (pts + rng.normal(0, cfg.point_jitter, pts.shape)).astype(np.float32)
    bl = cfg.labelled_batch_size
    if cfg.strong_labelled:
      labelled = augment.strong({k: v[:bl] for k, v in batch.items()}, rng, cfg)
      batch = {k: np.concatenate([labelled[k], v[bl:]]) for k, v in batch.items()}
    if self.with_unlabelled and cfg.strong_unlabelled:
      strong = augment.strong({k: v[bl:] for k, v in batch.items()}, rng, cfg)
      batch = {k: np.concatenate([v, strong[k]]) for k, v in batch.items()}
    return batch


def create_train_iterator(arrays: dict[str, np.ndarray], labelled: np.ndarray,
                          config: ml_collections.ConfigDict, *, with_unlabelled: bool
                          ) -> grain.DatasetIterator:
  """A grain iterator of train batches (checkpointable: its state is the step position)."""
  fn = TrainBatch(arrays, labelled, config.data, config.seed, with_unlabelled)
  ds = grain.MapDataset.range(config.train.num_steps + 1).map(fn)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)).__iter__()


def eval_batches(arrays: dict[str, np.ndarray], cfg: ml_collections.ConfigDict):
  """Fixed test batches of eval_batch_size rows (last padded); yields (batch, num_valid)."""
  rng = np.random.default_rng(0)
  num = len(arrays["label"])
  points = _subsample_points(arrays["points"], cfg.num_points, rng).astype(np.float32)
  ds = grain.MapDataset.range(-(-num // cfg.eval_batch_size))

  def make(i):
    rows = np.arange(i * cfg.eval_batch_size, (i + 1) * cfg.eval_batch_size)
    valid = int((rows < num).sum())
    rows = np.minimum(rows, num - 1)
    batch = {k: arrays[k][rows] for k in KEYS}
    batch["points"] = points[rows]
    return batch, valid

  return ds.map(make)
