"""Where the ModelNet40 files go in the manual-download directory (no TFDS import: cheap)."""

from __future__ import annotations

import os

H5_DIR = "modelnet40_ply_hdf5_2048"
VIEWS_DIR = "modelnet40_images_new_12x"
MESH_DIR = "ModelNet40_MeshNet"
LAYOUT = f"""\
<manual_dir>/{H5_DIR}/            (DGCNN/PointNet release: modelnet40_ply_hdf5_2048.zip)
    shape_names.txt                  the 40 class names, one per line
    ply_data_train0.h5 ...           'data' float [N, 2048, 3], 'label' int [N, 1]
    ply_data_train_0_id2file.json    ["airplane/airplane_0627.ply", ...], one per row
    ply_data_test0.h5, ply_data_test_0_id2file.json, ...
<manual_dir>/{VIEWS_DIR}/<class>/<train|test>/<class>_<id>.obj.shaded_v001.png .. v012.png
                                     (MVCNN 12-view renders, as in jongchyisu/mvcnn_pytorch)
<manual_dir>/{MESH_DIR}/<class>/<train|test>/<class>_<id>.npz
                                     (MeshNet release: 'faces' [F, 15] = centre 3, corners 9,
                                      normal 3; 'neighbors' [F, 3] int)"""


class MissingDataError(FileNotFoundError):
  """The manual-download directory lacks a file the builder needs."""


def check_manual_dir(manual_dir: str) -> None:
  """Raises MissingDataError naming what is missing and where to put it."""
  needed = [os.path.join(H5_DIR, "shape_names.txt"), VIEWS_DIR, MESH_DIR]
  missing = [p for p in needed if not os.path.exists(os.path.join(manual_dir or "", p))]
  if not manual_dir or missing:
    raise MissingDataError(
        f"ModelNet40 data not found: manual_dir={manual_dir!r} lacks {missing or needed}. "
        "Download the three public releases (ModelNet40 point clouds, MVCNN 12-view "
        f"images, MeshNet meshes) and lay them out as:\n{LAYOUT}\n"
        "then pass that directory as config.data.manual_dir (or --manual_dir to tfds).")
