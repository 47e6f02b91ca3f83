"""Summarises RL runs (issue #8): held-out reward over the SFT start, entropy curves, mismatch.

  python benchmarks/rl_report.py recipe=workdirs/rl token_clip=workdirs/rl_token_clip \
      [--plot docs/figures/rl_entropy.png]

Reads each run's rl_metrics.jsonl (ernie5_jax/rl/train.py) and prints, per run: the mean
held-out reward of every family at iteration 0 (the SFT checkpoint) and at the last
evaluation; the policy entropy over iterations (first / min / last and the last-10 mean); the
training-inference mismatch KL with the run's routing and the other one (router replay on vs
off, measured on the same rollouts every iteration). Plots the entropy curves and held-out
rewards. Writes benchmarks/results/rl_report.json.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_json  # pylint: disable=g-import-not-at-top,wrong-import-position
from ernie5_jax.rl.train import read_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position


def summarize(metrics: dict[int, dict[str, float]]) -> dict:
  """Held-out rewards at the start and end, entropy curve, mismatch KLs of one run."""
  held = {i: m for i, m in metrics.items() if "heldout/reward" in m}
  first, last = min(held), max(held)
  families = sorted(k.split("/")[-1] for k in held[first] if k.startswith("heldout/reward/"))
  steps = sorted(i for i, m in metrics.items() if "rl/entropy" in m)
  entropy = [metrics[i]["rl/entropy"] for i in steps]

  def mean_of(key):
    values = [metrics[i][key] for i in steps if key in metrics[i]]
    return float(np.mean(values)) if values else None

  # rl/mismatch_kl is the run's own routing; rl/mismatch_kl_<other> the other choice.
  own, live = mean_of("rl/mismatch_kl"), mean_of("rl/mismatch_kl_live")
  kl_replay, kl_live = (own, live) if live is not None else (mean_of("rl/mismatch_kl_replay"),
                                                             own)
  return {
      "heldout_start_iteration": first, "heldout_end_iteration": last,
      "heldout_start": {f: held[first][f"heldout/reward/{f}"] for f in families},
      "heldout_end": {f: held[last][f"heldout/reward/{f}"] for f in families},
      "entropy_iterations": steps, "entropy": entropy,
      "entropy_first": entropy[0], "entropy_min": float(np.min(entropy)),
      "entropy_last": entropy[-1], "entropy_last10": float(np.mean(entropy[-10:])),
      "train_reward_first10": float(np.mean([metrics[i]["rl/reward"] for i in steps[:10]])),
      "train_reward_last10": float(np.mean([metrics[i]["rl/reward"] for i in steps[-10:]])),
      "mismatch_kl_replay": kl_replay, "mismatch_kl_live": kl_live,
  }


def main() -> None:
  """Prints the tables and writes the JSON (and the plot)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="name=workdir of an --mode=rl run")
  parser.add_argument("--plot", default=None, help="PNG of the entropy and reward curves")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  runs = dict(r.split("=", 1) for r in args.runs)
  report = {name: summarize(read_metrics(path)) for name, path in runs.items()}
  for name, r in report.items():
    print(f"== {name} ({runs[name]})")
    print("| family | held-out reward, SFT (it. 0) | after RL (it. "
          f"{r['heldout_end_iteration']}) |\n|---|---|---|")
    for f in r["heldout_start"]:
      print(f"| {f} | {r['heldout_start'][f]:.3f} | {r['heldout_end'][f]:.3f} |")
    start, end = np.mean(list(r["heldout_start"].values())), np.mean(
        list(r["heldout_end"].values()))
    print(f"| mean | {start:.3f} | {end:.3f} |")
    print(f"entropy: first {r['entropy_first']:.3f}, min {r['entropy_min']:.3f}, last "
          f"{r['entropy_last']:.3f}, mean of the last 10 {r['entropy_last10']:.3f}")
    print(f"training reward: first 10 iterations {r['train_reward_first10']:.3f}, last 10 "
          f"{r['train_reward_last10']:.3f}")
    if r["mismatch_kl_replay"] and r["mismatch_kl_live"]:
      print(f"mismatch KL (k3, mean over iterations): router replay {r['mismatch_kl_replay']:.3e}"
            f", live routing {r['mismatch_kl_live']:.3e}, ratio "
            f"{r['mismatch_kl_live'] / r['mismatch_kl_replay']:.1f}x")
  if args.plot:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in report.items():
      axes[0].plot(r["entropy_iterations"], r["entropy"], label=name)
    axes[0].set(xlabel="RL iteration", ylabel="mean token entropy (nats)",
                title="policy entropy on rollout tokens")
    axes[0].legend()
    width = 0.8 / (len(report) + 1)
    families = list(next(iter(report.values()))["heldout_start"])
    x = np.arange(len(families))
    axes[1].bar(x, [next(iter(report.values()))["heldout_start"][f] for f in families], width,
                label="SFT")
    for k, (name, r) in enumerate(report.items(), start=1):
      axes[1].bar(x + k * width, [r["heldout_end"][f] for f in families], width, label=name)
    axes[1].set_xticks(x + width * len(report) / 2, [f.replace("_", "\n") for f in families],
                       fontsize=7)
    axes[1].set(ylabel="held-out reward", title="held-out reward per task family")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")
  write_json({"runs": runs, "report": report}, "rl_report", args.out)


if __name__ == "__main__":
  main()
