"""A digit classifier for 16x16 digits_multimodal images: scores generated images, gives RL rewards.

  labels = digit_classifier.classify(images)        # [N, 16, 16] -> [N] int64 in 0..9
  clf = digit_classifier.load_or_train()            # the cached classifier (trained on first use)
  clf.held_out_accuracy                             # on the test split's real images

Model: multinomial logistic regression (scikit-learn, L2, C=1) on the image mean-pooled
2x2 to 8x8 (the resolution of the scikit-learn digits the data is made from; pooling
also makes it less sensitive to the blur of tokenizer-decoded images), each feature
standardised by the train split's mean and std (+0.1, so near-constant border pixels
are not blown up). It is fitted on the real train-split images of data.dataset, once:
the weights are cached under the data dir (`digit_classifier/<dataset>.npz`, plain
arrays, no pickle) with the held-out accuracy on the test split's real images;
`classify` afterwards is a numpy matmul.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

SIDE = 16  # digits_multimodal image side (data/digits_multimodal/generate.py CANVAS).
POOL = 2  # Mean-pooling window: 16x16 -> 8x8 features.
NUM_CLASSES = 10
_STD_FLOOR = 0.1
_C = 1.0  # Inverse L2 strength of the logistic regression.
_FORMAT = 1  # Bumped when the features or the file change: older caches are refitted.


@dataclasses.dataclass(frozen=True)
class DigitClassifier:
  """Standardised pooled pixels -> linear softmax over the 10 digits."""
  mean: np.ndarray  # [features]
  scale: np.ndarray  # [features]
  weights: np.ndarray  # [features, classes]
  bias: np.ndarray  # [classes]
  held_out_accuracy: float  # On the test split's real images; NaN if not measured.
  dataset: str = "digits_multimodal"

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Class logits [N, 10] of images [N, 16, 16] (uint8 0..255, or float in [0, 1])."""
    return (features(images) - self.mean) / self.scale @ self.weights + self.bias

  def classify(self, images: np.ndarray) -> np.ndarray:
    """Predicted digits [N] int64 of images [N, 16, 16] (uint8 0..255, or float in [0, 1])."""
    return np.argmax(self.logits(images), axis=-1)

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Softmax class probabilities [N, 10] (e.g. p(intended digit) as an RL reward)."""
    z = self.logits(images)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)

  def save(self, path: str) -> None:
    """Writes the arrays to an .npz file (atomically: a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, mean=self.mean, scale=self.scale, weights=self.weights, bias=self.bias,
             held_out_accuracy=self.held_out_accuracy, dataset=self.dataset, format=_FORMAT)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "DigitClassifier | None":
    """Reads a classifier saved by `save`; None if it was written by another format."""
    with np.load(path) as f:
      if int(f["format"]) != _FORMAT:
        return None
      return cls(mean=f["mean"], scale=f["scale"], weights=f["weights"], bias=f["bias"],
                 held_out_accuracy=float(f["held_out_accuracy"]), dataset=str(f["dataset"]))


def features(images: np.ndarray) -> np.ndarray:
  """Images [N, 16, 16] (uint8 0..255 or float in [0, 1]) -> pooled pixels [N, 64] in [0, 1]."""
  images = np.asarray(images)
  if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
    raise ValueError(f"images.shape={images.shape} is not accepted: expected [N, {SIDE}, {SIDE}]")
  x = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else \
      np.clip(images.astype(np.float64), 0.0, 1.0)
  n, s = x.shape[0], SIDE // POOL
  return x.reshape(n, s, POOL, s, POOL).mean(axis=(2, 4)).reshape(n, s * s)


def fit(images: np.ndarray, labels: np.ndarray, *, dataset: str = "digits_multimodal",
        test_images: np.ndarray | None = None, test_labels: np.ndarray | None = None
        ) -> DigitClassifier:
  """Fits the classifier on images [N, 16, 16] / labels [N]; measures test accuracy if given."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  x = features(images)
  mean, scale = x.mean(0), x.std(0) + _STD_FLOOR
  model = LogisticRegression(C=_C, max_iter=1000).fit((x - mean) / scale, np.asarray(labels))
  weights = np.zeros((x.shape[1], NUM_CLASSES))
  bias = np.full((NUM_CLASSES,), -np.inf)  # A class absent from training is never predicted.
  weights[:, model.classes_] = model.coef_.T
  bias[model.classes_] = model.intercept_
  clf = DigitClassifier(mean=mean, scale=scale, weights=weights, bias=bias,
                        held_out_accuracy=float("nan"), dataset=dataset)
  if test_images is not None:
    accuracy = float(np.mean(clf.classify(test_images) == np.asarray(test_labels)))
    clf = dataclasses.replace(clf, held_out_accuracy=accuracy)
  return clf


def real_images(split: str, *, dataset: str = "digits_multimodal", data_dir: str | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 16, 16], labels [N]) of a split of the embedded dataset (built if needed)."""
  import data as data_lib  # pylint: disable=g-import-not-at-top
  from ernie5_jax.input_pipeline import multimodal  # pylint: disable=g-import-not-at-top
  source = data_lib.ensure_built(dataset, data_dir or multimodal.default_data_dir()
                                 ).as_data_source(split)
  records = [source[i] for i in range(len(source))]
  return (np.stack([r["image"] for r in records]),
          np.array([int(r["label"]) for r in records], np.int64))


def cache_path(dataset: str = "digits_multimodal", data_dir: str | None = None) -> str:
  """Where load_or_train caches the classifier of `dataset` ("name[/config]")."""
  from ernie5_jax.input_pipeline import multimodal  # pylint: disable=g-import-not-at-top
  root = data_dir or multimodal.default_data_dir()
  return os.path.join(root, "digit_classifier", dataset.replace("/", "__") + ".npz")


def load_or_train(dataset: str = "digits_multimodal", data_dir: str | None = None
                  ) -> DigitClassifier:
  """The cached classifier of `dataset`, fitted on its train split's real images on first use."""
  path = cache_path(dataset, data_dir)
  if os.path.exists(path):
    clf = DigitClassifier.load(path)
    if clf is not None:
      return clf
  train_x, train_y = real_images("train", dataset=dataset, data_dir=data_dir)
  test_x, test_y = real_images("test", dataset=dataset, data_dir=data_dir)
  clf = fit(train_x, train_y, dataset=dataset, test_images=test_x, test_labels=test_y)
  clf.save(path)
  return clf


_DEFAULT: dict[tuple[str, str | None], DigitClassifier] = {}


def classify(images: np.ndarray, *, dataset: str = "digits_multimodal",
             data_dir: str | None = None) -> np.ndarray:
  """Predicted digits [N] of images [N, 16, 16] with the cached classifier of `dataset`."""
  key = (dataset, data_dir)
  if key not in _DEFAULT:
    _DEFAULT[key] = load_or_train(dataset, data_dir)
  return _DEFAULT[key].classify(images)
