"""RL post-training of the SFT model on the verifiable digit tasks (issue #8).

  python -m ernie5_jax.main --mode=rl --config=experiments/rl_digits.py --workdir=workdirs/rl \
      --config.train.init_from=workdirs/sft
  # baselines on the same SFT checkpoint:
  python -m ernie5_jax.main --mode=rl --config=experiments/rl_digits.py:token_clip ...
  python -m ernie5_jax.main --mode=rl --config=experiments/rl_digits.py:no_replay ...

Every family of rl.families (image / video / audio digit naming, two-image sums, caption ->
image scored by the digit classifier); GSPO with MISC + WPSM and router replay (ERNIE 5.0's
recipe; config.rl documents each coefficient). The arms: "" (that recipe), "token_clip"
(the plain PPO/GRPO token-clipped loss without MISC / WPSM), "no_replay" (router replay off).
"""

import os
import runpy

_SFT = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_digits.py"))


def get_config(arg: str = ""):
  """RL config; arg: "" | "token_clip" | "no_replay" (module docstring)."""
  config = _SFT["get_config"]("workdirs/sft")
  config.rl.iterations = 100
  config.rl.prompts_per_family = 4
  config.rl.group_size = 4
  config.rl.updates = 2
  config.rl.eval_every = 25
  config.rl.eval_prompts = 20
  config.rl.eval_samples = 4
  config.train.log_every = 5
  config.train.checkpoint_every = 25
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.0
  if arg == "token_clip":
    config.rl.loss = "token_clip"
    config.rl.misc = False
    config.rl.wpsm = False
  elif arg == "no_replay":
    config.rl.router_replay = False
  elif arg:
    raise ValueError(f"experiments/rl_digits.py:{arg} is not accepted: expected '', "
                     "'token_clip' or 'no_replay'")
  return config
