"""The ModelNet40 reader: the missing-data message, and tiny files this test writes itself."""

import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from data.modelnet40 import modelnet40_dataset_builder as mn
from ernie5_jax.m2cp import config as config_lib
from ernie5_jax.m2cp import data as data_lib

CLASSES = ("airplane", "bathtub")
TINY = mn.ModelNet40Config(name="tiny_test", num_points=16, num_faces=8, num_views=12,
                           view_size=8)


def _write_tiny(root, *, nan=False, bad_neighbor=False):
  rng = np.random.default_rng(0)
  h5_dir = os.path.join(root, mn.H5_DIR)
  os.makedirs(h5_dir)
  with open(os.path.join(h5_dir, "shape_names.txt"), "w") as f:
    f.write("\n".join(CLASSES) + "\n")
  for split in ("train", "test"):
    names = [f"{c}/{c}_{i:04d}.ply" for c in CLASSES for i in (1, 2)]
    data = rng.normal(size=(4, 32, 3)).astype(np.float32)
    if nan and split == "train":
      data[1, 3, 0] = np.nan
    with h5py.File(os.path.join(h5_dir, f"ply_data_{split}0.h5"), "w") as h5:
      h5["data"] = data
      h5["label"] = np.array([[0], [0], [1], [1]], np.uint8)
    with open(os.path.join(h5_dir, f"ply_data_{split}_0_id2file.json"), "w") as f:
      json.dump(names, f)
    for name in names:
      cls, stem = os.path.splitext(name)[0].split("/")
      vdir = os.path.join(root, mn.VIEWS_DIR, cls, split)
      mdir = os.path.join(root, mn.MESH_DIR, cls, split)
      os.makedirs(vdir, exist_ok=True)
      os.makedirs(mdir, exist_ok=True)
      for v in range(1, 13):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(
            os.path.join(vdir, f"{stem}.obj.shaded_v{v:03d}.png"))
      faces = rng.normal(size=(10, 15)).astype(np.float32)  # More than num_faces: sampled.
      nbr = rng.integers(0, 10, (10, 3))
      if bad_neighbor and stem.endswith("0002"):
        nbr[4, 1] = 99
      np.savez(os.path.join(mdir, f"{stem}.npz"), faces=faces, neighbors=nbr)


def test_missing_data_message_says_where_to_put_what(tmp_path):
  cfg = config_lib.default_config()
  cfg.data.dataset, cfg.model.num_classes = "modelnet40", 40
  cfg.data.manual_dir, cfg.data.data_dir = str(tmp_path / "nothing_here"), str(tmp_path / "d")
  with pytest.raises(mn.MissingDataError) as e:
    data_lib.builder(cfg.data)
  msg = str(e.value)
  for needed in ("nothing_here", "modelnet40_ply_hdf5_2048/", "shape_names.txt",
                 "ply_data_train0.h5", "id2file.json", "modelnet40_images_new_12x/",
                 "shaded_v001.png", "ModelNet40_MeshNet/", ".npz", "config.data.manual_dir"):
    assert needed in msg, needed


def test_config_requires_manual_dir_for_modelnet40():
  cfg = config_lib.default_config()
  cfg.data.dataset, cfg.model.num_classes = "modelnet40", 40
  with pytest.raises(config_lib.ConfigError, match="data.manual_dir=''.*ModelNet40_MeshNet"):
    config_lib.validate(cfg)


def test_reads_tiny_files(tmp_path):
  root = str(tmp_path / "manual")
  _write_tiny(root)
  b = mn.Modelnet40(data_dir=str(tmp_path / "data"), manual_dir=root, config=TINY,
                    file_format="array_record")
  examples = dict(b._generate_examples("test"))  # pylint: disable=protected-access
  assert sorted(examples) == ["airplane/airplane_0001", "airplane/airplane_0002",
                              "bathtub/bathtub_0001", "bathtub/bathtub_0002"]
  ex = examples["bathtub/bathtub_0001"]
  assert ex["label"] == 1
  assert ex["points"].shape == (16, 3) and ex["views"].shape == (12, 8, 8)
  assert ex["centers"].shape == (8, 3) and ex["corners"].shape == (8, 9)
  assert ex["neighbors"].min() >= 0 and ex["neighbors"].max() < 8
  assert b.info.features["label"].names == list(CLASSES)


@pytest.mark.parametrize("kind,pattern", [("nan", "airplane_0002.*non-finite"),
                                          ("bad_neighbor", "_0002.*out of range")])
def test_bad_input_names_the_sample(tmp_path, kind, pattern):
  root = str(tmp_path / "manual")
  _write_tiny(root, nan=kind == "nan", bad_neighbor=kind == "bad_neighbor")
  b = mn.Modelnet40(data_dir=str(tmp_path / "data"), manual_dir=root, config=TINY,
                    file_format="array_record")
  with pytest.raises(ValueError, match=pattern):
    list(b._generate_examples("train"))  # pylint: disable=protected-access
