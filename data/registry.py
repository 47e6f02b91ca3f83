"""Look up the embedded TFDS builders by name and build them on first use, offline."""

from __future__ import annotations

import importlib
import time

# name -> (module, class); "name/config" selects a builder config (e.g. "digits_multimodal/tiny").
KNOWN_DATASETS = {
    "digits_multimodal": ("data.digits_multimodal.digits_multimodal_dataset_builder",
                          "DigitsMultimodal"),
    "stdlib_text": ("data.stdlib_text.stdlib_text_dataset_builder", "StdlibText"),
}


def builder(name: str, data_dir: str):
  """Returns the TFDS builder for "name" or "name/config" under data_dir (not built)."""
  base, _, config = name.partition("/")
  if base not in KNOWN_DATASETS:
    raise ValueError(f"dataset name={name!r} is not accepted: known embedded datasets are "
                     f"{sorted(KNOWN_DATASETS)} (optionally 'name/config')")
  module, cls = KNOWN_DATASETS[base]
  builder_cls = getattr(importlib.import_module(module), cls)
  kwargs = {"config": config} if config else {}
  return builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)


def ensure_built(name: str, data_dir: str, *, verbose: bool = False):
  """Builds dataset `name` into data_dir as ArrayRecord unless already there; returns the builder."""
  import tensorflow_datasets as tfds
  b = builder(name, data_dir)
  if not b.is_prepared():
    start = time.perf_counter()
    # Nothing to fetch: no GCS lookup, no download, no statistics pass.
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    if verbose:
      print(f"built {name} in {time.perf_counter() - start:.1f}s under {data_dir}")
  return b
