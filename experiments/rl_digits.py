"""RL post-training of the SFT model on the verifiable digit tasks (issue #8).

  python -m ernie5_jax.main --mode=rl --config=experiments/rl_digits.py --workdir=workdirs/rl \
      --config.train.init_from=workdirs/sft
  # baselines on the same SFT checkpoint:
  python -m ernie5_jax.main --mode=rl --config=experiments/rl_digits.py:token_clip ...
  python -m ernie5_jax.main --mode=rl --config=experiments/rl_digits.py:no_replay ...

Every family of rl.families (image / video / audio digit naming, two-image sums, caption ->
image scored by the digit classifier); GSPO with MISC + WPSM and router replay (ERNIE 5.0's
recipe; config.rl documents each coefficient). The arms: "" (that recipe), "token_clip"
(the plain PPO/GRPO token-clipped loss without MISC / WPSM), "no_replay" (router replay off). After the arm, key=value items (get_config), e.g. the FP8-engine pair
and the hints pair of docs/rl.md:
  ...:rollout_dtype=float8_e4m3fn,iterations=30      ...:no_replay,rollout_dtype=float8_e4m3fn,...
  ...:family=image_arithmetic,hints=1,iterations=30  ...:family=image_arithmetic,iterations=30
"""

import os
import runpy

from ernie5_jax import config as base_config

_SFT = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_digits.py"))


def get_config(arg: str = ""):
  """RL config; arg: ARM[,key=value...], ARM "" | "token_clip" | "no_replay" (module
  docstring); keys: rollout_dtype (rl.rollout_dtype, e.g. float8_e4m3fn), hints (0/1:
  rl.hints), family (train one of rl.families only), iterations (rl.iterations)."""
  arm, _, rest = arg.partition(",") if "=" not in arg.split(",")[0] else ("", "", arg)
  args = base_config.parse_arg(rest, rollout_dtype="bfloat16", hints=0, family="",
                               iterations=100)
  config = _SFT["get_config"]("workdirs/sft")
  config.rl.iterations = args.iterations
  config.rl.rollout_dtype = args.rollout_dtype
  config.rl.hints = bool(args.hints)
  if args.family:
    config.rl.families = (args.family,)
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
  if arm == "token_clip":
    config.rl.loss = "token_clip"
    config.rl.misc = False
    config.rl.wpsm = False
  elif arm == "no_replay":
    config.rl.router_replay = False
  elif arm:
    raise ValueError(f"experiments/rl_digits.py:{arm} is not accepted: expected '', "
                     "'token_clip' or 'no_replay'")
  return config
