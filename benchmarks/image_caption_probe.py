"""Probe: image->caption classification of held-out digits by caption likelihood.

For each of N test-split digits of data/digits_multimodal, the probe writes one
image->caption document per candidate caption exactly as training lays it out
(sequence.digits_document("image_to_caption"): BOI, the image's real multi-scale
codes as inputs with one bidirectional group per scale, EOI, caption, EOS; same
tokenizers, positions and group ids, no loss inside the image). Candidates: the 10
digit classes x the 6 caption templates the data uses (data/digits_multimodal/
generate.py, e.g. "a handwritten seven", "the digit 7"). A candidate's score is the
teacher-forced log-likelihood summed over the positions training puts a loss on
(EOI -> first caption token, ..., last caption token -> EOS). A class's score is
the log of its caption probability averaged over the templates (uniform template
prior: logsumexp_t LL(class, t) - log 6); prediction = argmax over the 10 classes.
Per-template accuracies (argmax with one fixed template) are reported too.
Accuracy comes with a Wilson score 95% interval (Wilson 1927) and the exact
one-sided binomial p-value against chance (10%); the confusion matrix is printed.

  python benchmarks/image_caption_probe.py --workdir=/tmp/probe_run
  python benchmarks/image_caption_probe.py --workdir=DIR --config=experiments/tiny.py \
      --config.model.top_k=1      # a run without config.json: repeat its --config overrides

The model and its config are restored from the latest (or --step) orbax checkpoint in
--workdir with train/checkpoint.py restore_model (the config.json the trainer writes
into the workdir). Workdirs written before the trainer stored its config need --config
and the run's --config.* overrides: array shapes are checked against the checkpoint,
but non-shape fields (e.g. model.top_k, data.image_scales) are not.

Documented runs (2-core CPU shared with other jobs; all 297 test digits; probe ~20-40 s):
  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/probe_run_1500 \
      --config.train.num_steps=1500                                  # 10 min 32 s wall
  python benchmarks/image_caption_probe.py --workdir=/tmp/probe_run_1500 \
      --config.train.num_steps=1500
    -> accuracy 0.636 (189/297), Wilson 95% CI [0.580, 0.689], chance 0.100,
       p = 2e-111 (benchmarks/results/image_caption_probe.json)
  Emphasising the task (image_to_caption weight 4 instead of 1, others as default):
  python -m ernie5_jax.main --config=experiments/tiny.py --workdir=/tmp/probe_run_i2c \
      --config.train.num_steps=1500 --config.data.tasks.image_to_caption=4.0 \
      --config.train.checkpoint_every=250 --config.train.keep_checkpoints=10   # 9 min 37 s
    -> 0.845 (251/297), CI [0.800, 0.882] (step 750 of that run: 0.754, CI [0.702, 0.800])
  The default 300-step run (2 min 44 s) does not learn the task: 0.088, CI [0.060, 0.125],
  nearly every image gets "nine" (a caption prior; the image is not used yet).

Prints the figures and writes benchmarks/results/image_caption_probe.json.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import data as data_lib  # noqa: E402
from data.digits_multimodal import generate as digits_gen  # noqa: E402
from ernie5_jax import distributed  # noqa: E402
from ernie5_jax import config as config_lib  # noqa: E402
from ernie5_jax import store
from ernie5_jax.eval import scoring  # noqa: E402
from ernie5_jax.input_pipeline import multimodal  # noqa: E402
from ernie5_jax.input_pipeline import sequence as seq_lib  # noqa: E402
from ernie5_jax.input_pipeline import tokenizers as tok_lib  # noqa: E402

NUM_CLASSES = len(digits_gen.WORDS)
# The caption templates the data is generated with (one drawn per record); private there,
# read here so that the probe scores exactly the training captions.
TEMPLATES = digits_gen._CAPTIONS  # pylint: disable=protected-access
Z95 = 1.959963984540054  # Standard normal 97.5% quantile.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "Only for a workdir without config.json: the training run's "
                                "experiment config (+ its overrides).", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's --workdir (orbax checkpoints).")
flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: the latest).")
flags.DEFINE_integer("num_examples", digits_gen.NUM_TEST,
                     "Held-out digits to probe (a seeded subset of the test split when fewer).")
flags.DEFINE_integer("seed", 0, "Picks the subset when --num_examples < the test split size.")
flags.DEFINE_string("out", str(ROOT / "benchmarks" / "results" / "image_caption_probe.json"),
                    "Where to write the JSON results.")
flags.mark_flag_as_required("workdir")


def test_records(config, num_examples: int, seed: int):
  """(tokenizers, layout, encoded test records) of config.data, encoded as in training."""
  cfg = multimodal.MultimodalConfig.from_config(config.data)
  data_dir = cfg.data_dir or multimodal.default_data_dir()
  tokenizers = tok_lib.ensure_tokenizers(data_dir, cfg.dataset, seed=cfg.tokenizer_seed,
                                         text_model=cfg.text_model)
  layout = seq_lib.VocabularyLayout.from_tokenizers(tokenizers)
  raw = data_lib.ensure_built(cfg.dataset, data_dir).as_data_source("test")
  if not 1 <= num_examples <= len(raw):
    raise ValueError(f"--num_examples={num_examples} is not accepted: expected 1.."
                     f"{len(raw)} (the test split's size)")
  idx = np.arange(len(raw))
  if num_examples < len(raw):
    idx = np.sort(np.random.default_rng(seed).permutation(len(raw))[:num_examples])
  source = multimodal.EncodedDigitsSource(raw, idx, tokenizers, cfg, split="test")
  return tokenizers, layout, [source[i] for i in range(len(source))]


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion k / n (Wilson 1927, JASA 22:209)."""
  p = k / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def binomial_tail(k: int, n: int, p: float) -> float:
  """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact, no scipy)."""
  logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
          + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
  if not logs:
    return 0.0
  top = max(logs)
  return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def main(argv: list[str]) -> None:
  """Restores the model, scores every candidate caption of every test digit, reports."""
  distributed.skip_absent_tpu()  # No libtpu probe (nor its stderr noise) without TPU chips.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  loc = store.locate(FLAGS.workdir, FLAGS.step)
  if loc.config_path is not None and FLAGS.config is not None:
    logging.warning("Using %s; --config is only read for workdirs without it.", loc.config_path)
  config, model = store.restore_model(loc, None if loc.config_path else FLAGS.config)
  step = loc.step
  config_lib.validate(config)
  if config.data.source != "digits_multimodal":
    raise ValueError(f"config.data.source={config.data.source!r} is not accepted: the probe "
                     "needs a run trained on 'digits_multimodal'")
  tokenizers, layout, records = test_records(config, FLAGS.num_examples, FLAGS.seed)

  # Candidate captions [class][template] -> ids, with the data's own formatting.
  captions = [[tokenizers.text.encode(t.format(w=digits_gen.WORDS[c], d=str(c)))
               for t in TEMPLATES] for c in range(NUM_CLASSES)]
  # Sanity: every record's own caption is one of the candidates of its class.
  for rec in records:
    own = rec.fields["caption"]
    if not any(np.array_equal(own, ids) for ids in captions[rec.fields["label"]]):
      raise ValueError(f"test caption ids {own.tolist()} match none of the templates "
                       f"{TEMPLATES}: the probe's templates disagree with the data")

  def candidates(rec):
    docs = []
    for c in range(NUM_CLASSES):
      for ids in captions[c]:
        doc = seq_lib.digits_document("image_to_caption", {**rec.fields, "caption": ids},
                                      layout)
        if len(doc["tokens"]) > config.data.seq_len:
          raise ValueError(f"a probe document has {len(doc['tokens'])} positions > "
                           f"config.data.seq_len={config.data.seq_len}: training would cut it")
        docs.append(doc)
    return docs  # [classes * templates] documents, class-major.

  # One padded length for all: the longest candidate of the first record, rounded up to
  # 8 (the image part is the same length for every record, so one shape compiles).
  seq_len = int(math.ceil(max(len(d["tokens"]) for d in candidates(records[0])) / 8) * 8)
  score = scoring.make_scorer(model)
  ll = np.zeros((len(records), NUM_CLASSES, len(TEMPLATES)), np.float64)
  labels = np.array([rec.fields["label"] for rec in records])
  score_start = time.perf_counter()
  for i, rec in enumerate(records):
    batch = scoring.pad_documents(candidates(rec), seq_len=seq_len)  # [60, seq_len]
    ll[i] = score(batch).reshape(NUM_CLASSES, len(TEMPLATES))
  score_seconds = time.perf_counter() - score_start

  # Class score: log mean_t p(caption_t(class) | image).
  class_ll = np.logaddexp.reduce(ll, axis=-1) - math.log(len(TEMPLATES))  # [n, classes]
  pred = class_ll.argmax(-1)
  n, k = len(records), int((pred == labels).sum())
  acc = k / n
  lo, hi = wilson_interval(k, n)
  p_value = binomial_tail(k, n, 1.0 / NUM_CLASSES)
  confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)  # [true, predicted]
  np.add.at(confusion, (labels, pred), 1)
  per_template = {t: float((ll[:, :, j].argmax(-1) == labels).mean())
                  for j, t in enumerate(TEMPLATES)}
  majority = float(np.bincount(labels, minlength=NUM_CLASSES).max() / n)
  true_rank = (class_ll > class_ll[np.arange(n), labels][:, None]).sum(-1)  # 0 = top.

  print(f"image->caption probe: workdir={FLAGS.workdir} step={step}, {n} held-out digits, "
        f"{NUM_CLASSES} classes x {len(TEMPLATES)} templates, scored in {score_seconds:.1f} s")
  print(f"accuracy {acc:.3f} ({k}/{n}), Wilson 95% CI [{lo:.3f}, {hi:.3f}]; chance 0.100 "
        f"(majority class {majority:.3f}); one-sided binomial p = {p_value:.2e}")
  print(f"top-3 accuracy {float((true_rank < 3).mean()):.3f}; mean rank of the true class "
        f"{float(true_rank.mean()):.2f} (chance 4.5)")
  print("per-template accuracy: " + ", ".join(f"{t!r} {a:.3f}" for t, a in per_template.items()))
  print("confusion (rows: true, columns: predicted 0..9; last: recall):")
  for c in range(NUM_CLASSES):
    row = confusion[c]
    print(f"  {c}: " + " ".join(f"{v:3d}" for v in row)
          + f"   {row[c] / max(row.sum(), 1):.2f}")
  verdict = "beats" if lo > 1.0 / NUM_CLASSES else "does NOT clearly beat"
  print(f"-> {verdict} chance (the 95% interval's lower end {lo:.3f} vs 0.100)")

  result = {
      "workdir": FLAGS.workdir, "step": step, "config_argv": [a for a in sys.argv[1:]
                                                              if a.startswith("--config")],
      "num_examples": n, "num_classes": NUM_CLASSES, "templates": list(TEMPLATES),
      "scoring": "class score = logsumexp over templates of the summed teacher-forced "
                 "log-likelihood of caption tokens + EOS, minus log(#templates)",
      "correct": k, "accuracy": acc, "wilson95": [lo, hi], "chance": 1.0 / NUM_CLASSES,
      "majority_class_rate": majority, "binomial_p_value_vs_chance": p_value,
      "top3_accuracy": float((true_rank < 3).mean()), "mean_true_rank": float(true_rank.mean()),
      "per_template_accuracy": per_template, "confusion_true_by_pred": confusion.tolist(),
      "beats_chance": bool(lo > 1.0 / NUM_CLASSES), "score_seconds": score_seconds,
      "total_seconds": time.perf_counter() - start, "backend": jax.default_backend(),
  }
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
