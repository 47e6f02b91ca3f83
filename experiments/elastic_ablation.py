"""Elastic-training ablation (issue #5): the tiny model trained as an elastic family.

  python -m ernie5_jax.main --config=experiments/elastic_ablation.py --workdir=workdirs/abl_elastic
  python -m ernie5_jax.main --config=experiments/elastic_ablation_static.py \
      --workdir=workdirs/abl_static
  python -m ernie5_jax.main --mode=eval --checkpoint=workdirs/abl_elastic \
      --workdir=workdirs/abl_elastic/eval
  python -m ernie5_jax.main --mode=eval --checkpoint=workdirs/abl_static \
      --workdir=workdirs/abl_static/eval
  python benchmarks/elastic_ablation.py workdirs/abl_elastic/eval workdirs/abl_static/eval
  # elastic.scheme="paper" (random expert subsets / interior layers; docs/elastic.md), and
  # the static run evaluated with the same load-ranked experts:
  python -m ernie5_jax.main --config=experiments/elastic_ablation.py \
      --config.elastic.scheme=paper --workdir=workdirs/abl_paper
  python -m ernie5_jax.main --mode=eval --checkpoint=workdirs/abl_paper \
      --workdir=workdirs/abl_paper/eval
  python -m ernie5_jax.main --mode=eval --config=experiments/elastic_ablation_static.py \
      --checkpoint=workdirs/abl_static --workdir=workdirs/abl_static/eval_paper \
      --config.elastic.scheme=paper
  python benchmarks/elastic_ablation.py workdirs/abl_paper/eval \
      workdirs/abl_static/eval_paper --name=elastic_ablation_paper

Both runs see the same data, batch, steps and learning-rate schedule; the only difference
is config.elastic.enabled (ERNIE 5.0 defaults: each step trains the full model and one
sampled sub-model on the same batch, with full depth p=0.75, all experts p=0.8, default
top-k p=0.8; the elastic step costs two passes). The eval job reports the same family for
both (for the static run, the family members are plain truncations of a model that never
trained them).
"""

import os
import runpy

_TINY = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))


def get_config(arg: str = "digits_multimodal"):
  """Returns the elastic arm: tiny on `arg` data, 1000 steps, elastic training on."""
  config = _TINY["get_config"](arg)
  config.train.num_steps = 1000
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.elastic.enabled = True
  return config
