"""M2CP on ModelNet40 read from a manual-download directory (see data/modelnet40).

  python -m ernie5_jax.main \
      --config=experiments/m2cp_modelnet40.py:frac=0.02,seed=0,manual_dir=/data/modelnet40 \
      --workdir=/tmp/m2cp_mn40

arg: frac, seed, steps as in experiments/m2cp_shapes.py, plus manual_dir (else
$M2CP_MODELNET40_DIR). Without the data the run stops with the expected layout.
Sizes follow the public M2CP / DGCNN setup more closely (1024 points, k=20); on a
2-core CPU this is slow: meant for an accelerator.
"""

import os

from ernie5_jax import config as base_config
from ernie5_jax.m2cp import config as config_lib


def get_config(arg: str = ""):
  """Returns the ModelNet40 M2CP config."""
  args = base_config.parse_arg(arg, frac=0.02, seed=0, steps=20000,
                               manual_dir=os.environ.get("M2CP_MODELNET40_DIR", ""))
  config = config_lib.default_config()
  config.data.dataset = "modelnet40"
  config.data.manual_dir = args.manual_dir
  config.data.label_fraction = args.frac
  config.seed = config.data.split_seed = args.seed
  config.data.num_points = 1024
  config.data.eval_batch_size = 32
  config.model.num_classes = 40
  config.model.knn = 20
  config.model.view_channels = (32, 64, 128, 256)
  config.model.mesh_channels = 128
  config.train.num_steps = args.steps
  config.train.eval_every = 2000
  config.train.checkpoint_every = 2000
  return config
