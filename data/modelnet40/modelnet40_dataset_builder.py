"""TFDS builder `modelnet40`: ModelNet40 as point cloud, MeshNet faces and 12 views.

Reads the public layouts the M2CP / DGCNN / MVCNN / MeshNet code use, from the manual
directory (nothing is downloaded); see LAYOUT. Objects are matched across modalities
by the `<class>/<class>_<id>` names in the HDF5 files' id2file.json lists.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from data.modelnet40 import layout
from data.shapes3d import geometry
from data.shapes3d.shapes3d_dataset_builder import features

# Re-exported: the layout lives in layout.py so that config validation needs no TFDS import.
H5_DIR, VIEWS_DIR, MESH_DIR = layout.H5_DIR, layout.VIEWS_DIR, layout.MESH_DIR
LAYOUT, MissingDataError, check_manual_dir = (layout.LAYOUT, layout.MissingDataError,
                                              layout.check_manual_dir)


@dataclasses.dataclass
class ModelNet40Config(tfds.core.BuilderConfig):
  """Output sizes: points kept of the 2048, faces sampled/padded, view side in pixels."""
  num_points: int = 1024
  num_faces: int = 1024
  num_views: int = 12
  view_size: int = 64


def _h5_files(h5_dir: str, split: str) -> list[str]:
  names = sorted(n for n in os.listdir(h5_dir)
                 if n.startswith(f"ply_data_{split}") and n.endswith(".h5"))
  if not names:
    raise MissingDataError(f"no {h5_dir}/ply_data_{split}*.h5 files; expected:\n{LAYOUT}")
  return [os.path.join(h5_dir, n) for n in names]


def _load_view(path: str, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    img = Image.open(io.BytesIO(f.read())).convert("L").resize((size, size), Image.BILINEAR)
  return np.asarray(img, np.uint8)


def read_object(manual_dir: str, split: str, name: str, points: np.ndarray,
                cfg: ModelNet40Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One object's three modalities; name is '<class>/<class>_<id>' (no extension)."""
  cls, stem = name.split("/")
  base = os.path.join(manual_dir, VIEWS_DIR, cls, split, stem)
  views = []
  for v in range(1, cfg.num_views + 1):
    path = f"{base}.obj.shaded_v{v:03d}.png"
    if not os.path.exists(path):
      raise MissingDataError(f"sample {name!r}: view {path} is missing; expected:\n{LAYOUT}")
    views.append(_load_view(path, cfg.view_size))
  mesh_path = os.path.join(manual_dir, MESH_DIR, cls, split, stem + ".npz")
  if not os.path.exists(mesh_path):
    raise MissingDataError(f"sample {name!r}: mesh {mesh_path} is missing; expected:\n{LAYOUT}")
  with np.load(mesh_path) as data:
    faces, nbr = np.asarray(data["faces"], np.float32), np.asarray(data["neighbors"], np.int64)
  geometry.check_example(name, points, nbr, min_points=cfg.num_points)
  num = len(faces)
  idx = (np.sort(rng.choice(num, cfg.num_faces, replace=False)) if num > cfg.num_faces
         else np.arange(cfg.num_faces) % num)
  remap = np.full(num, -1)
  remap[idx[:min(num, cfg.num_faces)]] = np.arange(min(num, cfg.num_faces))
  nbr = remap[nbr[idx]]
  nbr = np.where(nbr < 0, np.arange(cfg.num_faces)[:, None], nbr)  # Dropped neighbour: self.
  centers, corners, normals = faces[idx, :3], faces[idx, 3:12], faces[idx, 12:15]
  return {"points": points[:cfg.num_points].astype(np.float32),
          "views": np.stack(views), "centers": centers,
          "corners": corners - np.tile(centers, 3),  # MeshNet stores corner positions.
          "normals": normals, "neighbors": nbr.astype(np.int32)}


class Modelnet40(tfds.core.GeneratorBasedBuilder):
  """ModelNet40 (Wu et al., CVPR 2015) in the DGCNN / MVCNN / MeshNet release layouts."""

  name = "modelnet40"
  VERSION = tfds.core.Version("1.0.0")
  url_infos = None
  RELEASE_NOTES = {"1.0.0": "Points, MeshNet faces and 12 shaded views per object."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT
  BUILDER_CONFIGS = [ModelNet40Config(name="default", description="1024 points, 1024 faces, "
                                      "12 views of 64x64.")]

  def _class_names(self) -> list[str]:
    path = os.path.join(str(self._manual_dir_for_names), H5_DIR, "shape_names.txt")
    with open(path) as f:
      return [line.strip() for line in f if line.strip()]

  def __init__(self, *, manual_dir: str = "", **kwargs):
    self._manual_dir_for_names = manual_dir
    check_manual_dir(manual_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=features(cfg.num_points, cfg.num_faces, cfg.num_views, cfg.view_size,
                          self._class_names()),
        supervised_keys=("points", "label"),
        homepage="https://modelnet.cs.princeton.edu/")

  def _split_generators(self, dl_manager):
    del dl_manager  # The manual dir was checked in __init__.
    return {s: self._generate_examples(s) for s in ("train", "test")}

  def _generate_examples(self, split: str):
    import h5py  # pylint: disable=g-import-not-at-top
    manual_dir = self._manual_dir_for_names
    rng = np.random.default_rng(0)
    for path in _h5_files(os.path.join(manual_dir, H5_DIR), split):
      shard = os.path.basename(path)[len(f"ply_data_{split}"):-len(".h5")]
      with open(os.path.join(os.path.dirname(path),
                             f"ply_data_{split}_{shard}_id2file.json")) as f:
        names = [os.path.splitext(n)[0] for n in json.load(f)]
      with h5py.File(path, "r") as h5:
        data, labels = np.asarray(h5["data"]), np.asarray(h5["label"]).reshape(-1)
      if len(names) != len(data):
        raise ValueError(f"{path}: {len(data)} rows but {len(names)} names in its id2file.json")
      for name, points, label in zip(names, data, labels):
        example = read_object(manual_dir, split, name, points, self.builder_config, rng)
        example["label"] = int(label)
        yield name, example
