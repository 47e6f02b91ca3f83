"""Elastic-vs-static ablation table (issue #5) from two eval-job family reports.

  python benchmarks/elastic_ablation.py workdirs/abl_elastic/eval workdirs/abl_static/eval
  python benchmarks/elastic_ablation.py workdirs/abl_paper/eval workdirs/abl_static/eval_paper \
      --name=elastic_ablation_paper     # elastic.scheme="paper" (docs/elastic.md)

The arguments are the eval job's output dirs (or their family_report.json) of
experiments/elastic_ablation.py and experiments/elastic_ablation_static.py (commands in
that file's docstring). Prints a markdown table (sub-model x modality losses of both arms,
parameters, decode tokens/s) and the issue's targets as measured:
- full-model loss cost of elastic training: (elastic - static) / static, mean over tokens
  of every modality, target <= 1%;
- every sub-model of the elastic run beats the same truncation of the static run;
- decode speed-up of halving top-k (from the decode benchmark, when its JSON exists).
Writes benchmarks/results/elastic_ablation.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.common import RESULTS, write_json
from ernie5_jax.eval.ablation import compare, load_report, markdown


def main() -> None:
  """Reads the two reports, prints and writes the table and the targets."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("elastic", help="eval dir (or family_report.json) of the elastic run")
  parser.add_argument("static", help="eval dir (or family_report.json) of the static run")
  parser.add_argument("--name", default="elastic_ablation",
                      help="results file stem, e.g. elastic_ablation_paper for the 'paper' "
                           "scheme (benchmarks/results/<name>.json / .md)")
  args = parser.parse_args()
  result = compare(load_report(args.elastic), load_report(args.static))
  table = markdown(result)
  print(table)
  print(f"\nfull-model loss cost of elastic training: {100 * result['full_model_loss_cost']:+.2f}%"
        " (target <= +1%)")
  print(f"sub-models beating the static truncation: {result['submodels_beating_truncation']}"
        f" / {result['submodels']}")
  write_json(result, args.name)
  (RESULTS / f"{args.name}.md").write_text(table + "\n")


if __name__ == "__main__":
  main()
