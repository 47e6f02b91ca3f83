"""The one declaration of every M2CP field, and its validation.

M2CP = "Multimodal Semi-Supervised Learning for 3D Objects" (Chen, Jing, Liang, Tian, Li;
BMVC 2021, arXiv 2110.11601). Experiment files (experiments/m2cp_*.py) start from
`default_config()` and override what they change. `validate` raises `ConfigError`
(the LM family's class, so the CLI reports both alike) naming the field, the value and
what is accepted.
"""

from __future__ import annotations

import ml_collections

from ernie5_jax import config as lm_config

ConfigError = lm_config.ConfigError
check_ranges = lm_config.check_ranges
_fail = lm_config.fail
DATASETS = ("shapes3d", "shapes3d/tiny", "modelnet40")
NUM_CLASSES = {"shapes3d": 12, "shapes3d/tiny": 12, "modelnet40": 40}
PSEUDO_LABEL_SOURCES = ("fused", "ensemble")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("warmup_cosine", "constant")
STORED_POINTS = 1024  # Points per object in both builders (train subsamples data.num_points).


def default_config() -> ml_collections.ConfigDict:
  """Returns the base M2CP config (the embedded shapes3d data, 2% labels)."""
  c = ml_collections.ConfigDict()
  c.trainer = "m2cp"  # ernie5_jax.main runs ernie5_jax.m2cp.train for this family.
  c.seed = 0  # Parameter init, prototype init and the per-step batch sampling.

  # --- data (ernie5_jax/m2cp/data.py) ------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  d.dataset = "shapes3d"  # One of DATASETS; "modelnet40" needs data.manual_dir.
  d.data_dir = ""  # TFDS data_dir; "" -> $ERNIE5_DATA_DIR or ~/.cache/ernie5_jax/data.
  d.manual_dir = ""  # modelnet40 only: the manual-download directory (builder LAYOUT).
  d.label_fraction = 0.02  # Fraction of train objects that keep their label, in (0, 1].
  d.split_seed = 0  # Seeds which objects are labelled (class-balanced per class).
  d.labelled_batch_size = 16  # Labelled rows per step (sampled with replacement if needed).
  d.unlabelled_batch_size = 32  # Unlabelled rows per step (drawn from all train objects).
  d.num_points = 256  # Points fed to the point encoder, a random subset of the 1024 stored.
  d.point_jitter = 0.005  # Std of the Gaussian noise added to training points.
  # Strong augmentation (augment.py). strong_unlabelled: each unlabelled row also enters
  # strongly augmented, and loss.pseudo_ce_weight's CE reads those rows (FixMatch);
  # strong_labelled: labelled rows are strongly augmented (both methods alike).
  d.strong_unlabelled = True
  d.strong_labelled = True
  d.strong_scale = (0.8, 1.25)  # Anisotropic scale range of points and mesh.
  d.strong_jitter = 0.01  # Extra point jitter std.
  d.view_shift = 3  # Max shift of each view, pixels.
  d.view_cutout = 12  # Side of the zeroed square per view, pixels (0: none).
  d.view_drop = 0.25  # Probability that a view is blanked (one is always kept).
  d.eval_batch_size = 120  # Rows per jitted eval call (the last batch is padded).

  # --- model (ernie5_jax/m2cp/encoders.py, model.py) ---------------------------
  m = c.model = ml_collections.ConfigDict()
  m.num_classes = 12  # Must equal NUM_CLASSES[data.dataset].
  m.embed_dim = 512  # Every encoder's output feature (the paper's 512-d).
  m.proj_dim = 128  # Projection head output (the NT-Xent space).
  # Per-point / per-view / per-face width before pooling; a linear maps the pooled
  # features to embed_dim (the per-element width is what costs CPU time).
  m.pool_dim = 128
  m.point_channels = (32, 32, 64)  # DGCNN edge-conv widths, one per layer.
  m.knn = 10  # Neighbours per point in each edge convolution (self included).
  # True: DGCNN's dynamic graph (kNN recomputed on each layer's features); False: the kNN
  # graph of the input xyz for every layer (3x fewer top-k sorts, the CPU default).
  m.dynamic_graph = False
  m.view_channels = (16, 32, 64)  # MVCNN CNN widths; each conv halves the view side.
  m.mesh_channels = 32  # MeshNet spatial / structural / mesh-conv width.
  m.mesh_conv_layers = 2  # MeshNet mesh-convolution blocks over edge neighbours.

  # --- loss (ernie5_jax/m2cp/losses.py) -----------------------------------------
  lo = c.loss = ml_collections.ConfigDict()
  lo.ce_weight = 1.0  # Cross-entropy per modality on labelled rows (shared classifier), each.
  lo.fused_ce_weight = 1.0  # Cross-entropy of the fused classifier on labelled rows.
  lo.consistency_weight = 1.0  # NT-Xent between each modality pair on unlabelled rows (mean).
  lo.consistency_temperature = 0.5  # NT-Xent temperature (paper: 0.5).
  lo.m2cp_weight = 1.0  # Max weight of the M2CP prototype loss, reached after rampup_steps.
  lo.m2cp_temperature = 0.1  # Cosine-to-prototype logits are divided by this.
  lo.pseudo_label_threshold = 0.95  # Max-probability for an unlabelled row to count.
  # Which prediction gives the pseudo-labels: "fused" (the paper) or "ensemble" (the mean
  # softmax of the fused and the three per-modality classifiers).
  lo.pseudo_label_source = "fused"
  # Distribution alignment of the pseudo-labelling prediction (ReMixMatch): scale it by the
  # labelled class marginal / its moving average over unlabelled rows, before thresholding;
  # keeps one class from absorbing a similar one (e.g. box / cylinder in shapes3d).
  lo.distribution_alignment = True
  lo.alignment_momentum = 0.99  # EMA momentum of that moving average (per step).
  lo.rampup_steps = 200  # Sigmoid ramp-up exp(-5 (1 - t)^2) of m2cp_weight (Laine & Aila).
  lo.prototype_momentum = 0.9  # EMA momentum of the per-class prototypes.
  # Max weight (same ramp) of the classifiers' CE to the confident fused pseudo-labels on
  # unlabelled rows (FixMatch's unlabelled loss; split as ce_weight / fused_ce_weight).
  lo.pseudo_ce_weight = 1.0
  # Class balance (losses.class_balance): KL(labelled class prior || mean prediction on the
  # unlabelled rows), linearised around the moving-average prediction, averaged over the four
  # classifiers. Without it the confident pseudo-labels can let one class absorb a similar
  # one (2% labels, seed 2: one class took 2.3x its share, fused accuracy 75.8%; with it
  # 1.25x and 81.1%; docs/m2cp.md).
  lo.class_balance_weight = 1.0

  # --- optimizer ----------------------------------------------------------------
  o = c.optimizer = ml_collections.ConfigDict()
  # "adamw" (decoupled weight decay) or "sgd" (momentum, weight decay added to the
  # gradient as torch.optim.SGD does: the authors' released code, experiments/m2cp_paper.py).
  o.name = "adamw"
  o.momentum = 0.9  # SGD only.
  # "warmup_cosine": linear warmup to learning_rate, cosine decay to 0 at num_steps;
  # "constant": learning_rate throughout.
  o.schedule = "warmup_cosine"
  o.learning_rate = 1e-3  # Peak (warmup_cosine) or the constant rate.
  o.warmup_steps = 30
  o.weight_decay = 1e-4
  o.grad_clip = 5.0  # Global-norm clip; 0 disables.

  # --- train (ernie5_jax/m2cp/train.py) ---------------------------------------
  t = c.train = ml_collections.ConfigDict()
  # 800: the supervised baseline has converged by 400 (test accuracy flat to 800), while
  # the pseudo-label losses keep gaining. Measured wall per run on the 2-core CPU: m2cp
  # 10-14 min, supervised ~3 min (two runs at a time); ~30-33 min / ~7 min when other
  # jobs also load it (load average ~7).
  t.num_steps = 800
  t.log_every = 50  # Train metrics are fetched (and checked finite) every this many steps.
  t.eval_every = 400  # Test-set accuracy / mAP; also at the last step.
  t.checkpoint_every = 400
  t.keep_checkpoints = 2
  t.async_checkpoints = True
  return c


_POSITIVE = ("data.labelled_batch_size", "data.unlabelled_batch_size", "data.num_points",
             "data.eval_batch_size", "model.num_classes", "model.embed_dim", "model.proj_dim",
             "model.pool_dim", "model.knn", "model.mesh_channels", "loss.consistency_temperature",
             "loss.m2cp_temperature", "optimizer.learning_rate", "train.num_steps",
             "train.log_every", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints")
_NON_NEGATIVE = ("data.point_jitter", "data.strong_jitter", "data.view_shift",
                 "data.view_cutout", "model.mesh_conv_layers", "loss.ce_weight",
                 "loss.fused_ce_weight", "loss.consistency_weight", "loss.m2cp_weight",
                 "loss.pseudo_ce_weight", "loss.class_balance_weight",
                 "loss.rampup_steps", "optimizer.warmup_steps", "optimizer.weight_decay",
                 "optimizer.grad_clip")




def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on an invalid or inconsistent M2CP config; cheap, no compile."""
  if config.get("trainer") != "m2cp":
    _fail("trainer", config.get("trainer"), "expected 'm2cp' for an M2CP config")
  d, m, lo = config.data, config.model, config.loss
  if d.dataset not in DATASETS:
    _fail("data.dataset", d.dataset, f"expected one of {DATASETS}")
  check_ranges(config, positive=_POSITIVE, non_negative=_NON_NEGATIVE)
  if not 0 < d.label_fraction <= 1:
    _fail("data.label_fraction", d.label_fraction, "expected a fraction in (0, 1]")
  if d.num_points > STORED_POINTS:
    _fail("data.num_points", d.num_points, f"expected <= {STORED_POINTS} (points stored)")
  if m.knn > d.num_points:
    _fail("model.knn", m.knn, f"expected <= data.num_points={d.num_points}")
  if m.num_classes != NUM_CLASSES[d.dataset]:
    _fail("model.num_classes", m.num_classes,
          f"expected {NUM_CLASSES[d.dataset]} for data.dataset={d.dataset!r}")
  if not m.point_channels or any(ch <= 0 for ch in m.point_channels):
    _fail("model.point_channels", m.point_channels, "expected a non-empty tuple of ints > 0")
  if not m.view_channels or any(ch <= 0 for ch in m.view_channels):
    _fail("model.view_channels", m.view_channels, "expected a non-empty tuple of ints > 0")
  if not 0 <= d.view_drop < 1:
    _fail("data.view_drop", d.view_drop, "expected a probability in [0, 1)")
  for name in ("view_shift", "view_cutout"):
    if not isinstance(d[name], int):
      _fail(f"data.{name}", d[name], "expected an int number of pixels >= 0")
  scale = d.strong_scale
  if (not isinstance(scale, (tuple, list)) or len(scale) != 2
      or not 0 < scale[0] <= scale[1]):
    _fail("data.strong_scale", scale, "expected (low, high) with 0 < low <= high")
  o = config.optimizer
  if o.name not in OPTIMIZERS:
    _fail("optimizer.name", o.name, f"expected one of {OPTIMIZERS}")
  if o.schedule not in SCHEDULES:
    _fail("optimizer.schedule", o.schedule, f"expected one of {SCHEDULES}")
  if not 0 <= o.momentum < 1:
    _fail("optimizer.momentum", o.momentum, "expected a value in [0, 1)")
  if lo.pseudo_label_source not in PSEUDO_LABEL_SOURCES:
    _fail("loss.pseudo_label_source", lo.pseudo_label_source,
          f"expected one of {PSEUDO_LABEL_SOURCES}")
  if not 0 < lo.pseudo_label_threshold <= 1:
    _fail("loss.pseudo_label_threshold", lo.pseudo_label_threshold,
          "expected a probability in (0, 1]")
  if not 0 <= lo.alignment_momentum < 1:
    _fail("loss.alignment_momentum", lo.alignment_momentum, "expected a value in [0, 1)")
  if not 0 <= lo.prototype_momentum < 1:
    _fail("loss.prototype_momentum", lo.prototype_momentum, "expected a value in [0, 1)")
  if d.dataset == "modelnet40":
    from data.modelnet40 import layout  # pylint: disable=g-import-not-at-top
    try:
      layout.check_manual_dir(d.manual_dir)
    except layout.MissingDataError as e:
      _fail("data.manual_dir", d.manual_dir, f"expected the ModelNet40 manual-download "
            f"directory for data.dataset='modelnet40'; {e}")


def uses_unlabelled(config: ml_collections.ConfigDict) -> bool:
  """Whether any loss reads the unlabelled rows (False: the supervised-only baseline)."""
  lo = config.loss
  return (lo.consistency_weight > 0 or lo.m2cp_weight > 0 or lo.pseudo_ce_weight > 0
          or lo.class_balance_weight > 0)
