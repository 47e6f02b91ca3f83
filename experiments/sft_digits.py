"""Instruction SFT of a pre-trained tiny model on the RL task families (issue #8, step 1).

  python -m ernie5_jax.main --config=experiments/elastic_ablation.py --workdir=workdirs/abl_elastic
  python -m ernie5_jax.main --config=experiments/sft_digits.py --workdir=workdirs/sft \
      --config.train.init_from=workdirs/abl_elastic

The same trainer and config system as pre-training (--mode=train): only the data
(data.source "digits_sft": prompt + reference answer of every family in rl.families, loss on
the answer only; ernie5_jax/input_pipeline/sft.py), the start weights (train.init_from) and the schedule
differ. The model fields are tiny.py's, so any tiny pre-training run is a valid start.
"""

import os
import runpy

_TINY = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))


def get_config(arg: str = ""):
  """SFT config; `arg` (optional) is the pre-trained checkpoint path (train.init_from)."""
  config = _TINY["get_config"]("digits_multimodal")
  config.data.source = "digits_sft"
  config.train.init_from = arg or "workdirs/abl_elastic"
  config.train.num_steps = 300
  config.train.log_every = 25
  config.train.checkpoint_every = 100
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  config.objective.mtp_depth = 1  # Kept: the pre-trained MTP module's weights load as well.
  return config
