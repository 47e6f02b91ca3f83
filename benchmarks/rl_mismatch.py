"""Training-inference mismatch with and without rollout router replay (issue #8 target).

  python benchmarks/rl_mismatch.py --checkpoint=workdirs/sft [--prompts 16] [--group 4]

On one checkpoint and the same held-out prompts of every RL family, the rollout engine
samples G responses and records its log-probs and expert ids (rl/rollout.py); the training
engine (float32, config.model) then scores the same tokens twice: routing live, and
replaying the recorded expert ids. Reported per rollout engine and family: the mean token
KL(pi_infer || pi_train) (k3 estimator, rl/objective.mismatch_kl) both ways, their ratio,
and the share of (token, layer) routing decisions where live routing picks other experts.
Rollout engines: the policy's weights rounded to bfloat16 (a bf16 inference engine), to
float8_e4m3fn with per-tensor scales (an FP8 engine, which ERNIE 5.0 pairs with MISC),
and elastic sub-models that route within fewer experts (another sparsity, as a cheaper
deployment of the same checkpoint would). Also reported: the share of response tokens
MISC masks (pi_train / pi_infer outside [rl.misc_alpha, rl.misc_beta]) both ways. The
log-probs are those of the sampled distribution (text / codebook id range, temperature):
rl/rollout.py. Writes benchmarks/results/rl_mismatch.json.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_json  # pylint: disable=g-import-not-at-top,wrong-import-position
from ernie5_jax import distributed, store
from ernie5_jax.generate.sampling import Sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from ernie5_jax.model import elastic  # pylint: disable=g-import-not-at-top,wrong-import-position
from ernie5_jax.input_pipeline import verifiable  # pylint: disable=g-import-not-at-top,wrong-import-position
from ernie5_jax.rl import objective, rollout, verifiers  # pylint: disable=g-import-not-at-top,wrong-import-position


def routing_disagreement(live_ids: np.ndarray, replayed_ids: np.ndarray,
                         mask: np.ndarray) -> float:
  """Share of (layer, generated token) whose live top-k expert set differs from the record."""
  live, rec = np.sort(live_ids, -1), np.sort(replayed_ids, -1)  # [L, N, S, K]
  differs = np.any(live != rec, axis=-1)  # [L, N, S]
  m = np.broadcast_to(mask > 0, differs.shape)
  return float(differs[m].mean()) if m.any() else 0.0


def main() -> None:
  """Measures the mismatch table (module docstring)."""
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="an SFT / RL workdir or checkpoint")
  parser.add_argument("--prompts", type=int, default=16, help="held-out prompts per family")
  parser.add_argument("--group", type=int, default=4, help="responses per prompt")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  config, model = store.restore_model(args.checkpoint)
  context = verifiers.make_context(config, classifier=False)
  m = config.model
  engines = {"bf16 weights": dict(dtype=jnp.bfloat16),
             "fp8 weights (per-tensor scale)": dict(dtype=jnp.float8_e4m3fn)}
  for experts in sorted(set(elastic.expert_choices(config))):
    engines[f"sub-model, {experts} of {m.num_experts} experts"] = dict(
        sub=elastic.SubModel(m.num_layers, experts, m.top_k))
  rows = []
  for name, engine in engines.items():
    for f_index, family in enumerate(config.rl.families):
      batch = verifiable.make_prompts(config, family, split="test", start=0, num=args.prompts)
      ro = rollout.rollout(model, batch, group_size=args.group,
                           max_new_tokens=config.rl.max_new_tokens,
                           sampling=Sampling(temperature=args.temperature),
                           rng=jax.random.key(f_index), layout=context.layout, **engine)
      mask = jnp.asarray(ro.response_mask)
      infer = jnp.asarray(ro.infer_logprobs)
      live, live_aux = rollout.train_logprobs(model, ro, replay=False, temperature=args.temperature)
      replayed, _ = rollout.train_logprobs(model, ro, replay=True, temperature=args.temperature)
      kl_live = float(objective.mismatch_kl(live, infer, mask))
      kl_replay = float(objective.mismatch_kl(replayed, infer, mask))
      misc = lambda logp: float(objective.masked_fraction(mask, objective.misc_mask(
          logp, infer, mask, alpha=config.rl.misc_alpha, beta=config.rl.misc_beta)))
      rows.append({
          "engine": name, "family": family, "tokens": int(mask.sum()),
          "kl_live": kl_live, "kl_replay": kl_replay,
          "misc_masked_live": misc(live), "misc_masked_replay": misc(replayed),
          "ratio": kl_live / kl_replay if kl_replay > 0 else float("inf"),
          "routing_disagreement": routing_disagreement(
              np.asarray(live_aux["expert_ids"]), ro.expert_ids, ro.response_mask[None])})
      r = rows[-1]
      print(f"{name:32s} {family:17s} KL live {r['kl_live']:.3e}  replay {r['kl_replay']:.3e}"
            f"  ratio {r['ratio']:.1f}x  routing differs {100 * r['routing_disagreement']:.1f}%"
            f"  MISC masks {100 * r['misc_masked_live']:.2f}% / {100 * r['misc_masked_replay']:.2f}%")
  summary = {}
  for name in engines:
    sel = [r for r in rows if r["engine"] == name]
    weights = np.array([r["tokens"] for r in sel], np.float64)
    live = float(np.average([r["kl_live"] for r in sel], weights=weights))
    replay = float(np.average([r["kl_replay"] for r in sel], weights=weights))
    misc = {k: float(np.average([r[k] for r in sel], weights=weights))
            for k in ("misc_masked_live", "misc_masked_replay")}
    summary[name] = {"kl_live": live, "kl_replay": replay,
                     "ratio": live / replay if replay > 0 else float("inf"), **misc}
    print(f"{name:32s} all families       KL live {live:.3e}  replay {replay:.3e}  "
          f"ratio {summary[name]['ratio']:.1f}x  MISC masks {100 * misc['misc_masked_live']:.2f}%"
          f" live / {100 * misc['misc_masked_replay']:.2f}% replay")
  write_json({"checkpoint": args.checkpoint, "prompts_per_family": args.prompts,
              "group_size": args.group, "temperature": args.temperature,
              "backend": jax.default_backend(), "rows": rows, "summary": summary},
             "rl_mismatch", args.out)


if __name__ == "__main__":
  main()
