"""Fit the image and audio codebooks on a dataset's train split; save and load them by path.

Assets live in `<data_dir>/tokenizers/<dataset>/<image version>+<audio version>/`
(npz codebooks + json with "version", spec, and what they were fit on). Fitting
is deterministic given the seed and takes seconds on the digits dataset.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from ernie5_jax.input_pipeline.tokenizers import audio as audio_lib
from ernie5_jax.input_pipeline.tokenizers import image as image_lib
from ernie5_jax.input_pipeline.tokenizers import text as text_lib


@dataclasses.dataclass
class Tokenizers:
  """The three modality tokenizers used together by the unified sequence."""
  text: text_lib.TextTokenizer
  image: image_lib.ImageTokenizer
  audio: audio_lib.AudioTokenizer


def read_arrays(source, limit: int = 0) -> dict[str, np.ndarray]:
  """Reads images [N, H, W], frames [N * F, H, W] in [0, 1] and audio [N, L] in [-1, 1]."""
  n = len(source) if not limit else min(limit, len(source))
  records = [source[i] for i in range(n)]
  images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
  videos = np.stack([r["video"] for r in records]).astype(np.float32) / 255.0
  audio = np.stack([r["audio"] for r in records]).astype(np.float32) / 32768.0
  return {"images": images, "frames": videos.reshape(-1, *videos.shape[2:]), "audio": audio}


def fit_tokenizers(source, out_dir: str, *, image_spec=None, audio_spec=None, seed: int = 0,
                   description: str = "") -> dict:
  """Fits image (on images + video frames) and audio codebooks on a train source; saves them."""
  image_spec = image_spec or image_lib.ImageTokenizerSpec()
  audio_spec = audio_spec or audio_lib.AudioTokenizerSpec()
  start = time.perf_counter()
  arrays = read_arrays(source)
  pictures = np.concatenate([arrays["images"], arrays["frames"]])
  image_tok = image_lib.ImageTokenizer.fit(pictures, image_spec, seed=seed)
  audio_tok = audio_lib.AudioTokenizer.fit(arrays["audio"], audio_spec, seed=seed)
  fit = {"fit_on": description, "num_records": len(source), "seed": seed}
  image_tok.save(out_dir, fit)
  audio_tok.save(out_dir, fit)
  return {"seconds": time.perf_counter() - start, "dir": out_dir}


def asset_dir(data_dir: str, dataset: str) -> str:
  """Directory of the tokenizer assets fit on `dataset` (a TFDS name, '/' allowed)."""
  version = f"{image_lib.VERSION}+{audio_lib.VERSION}"
  return os.path.join(data_dir, "tokenizers", dataset.replace("/", "_"), version)


def load_tokenizers(directory: str, text_model: str = text_lib.DEFAULT_MODEL) -> Tokenizers:
  """Loads the tokenizers saved under directory (and the text model by path)."""
  return Tokenizers(text=text_lib.text_tokenizer(text_model),
                    image=image_lib.ImageTokenizer.load(directory),
                    audio=audio_lib.AudioTokenizer.load(directory))


def ensure_tokenizers(data_dir: str, dataset: str = "digits_multimodal", *, seed: int = 0,
                      text_model: str = text_lib.DEFAULT_MODEL) -> Tokenizers:
  """Loads the tokenizers fit on dataset's train split, fitting (and building) them if missing."""
  directory = asset_dir(data_dir, dataset)
  done = os.path.join(directory, "audio_tokenizer.json")
  if not os.path.exists(done):
    import data as data_lib
    b = data_lib.ensure_built(dataset, data_dir)
    tmp = directory + f".tmp{os.getpid()}"
    fit_tokenizers(b.as_data_source("train"), tmp, seed=seed, description=f"{dataset}:train")
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    try:
      os.rename(tmp, directory)  # Atomic: a concurrent fitter's result is equally valid.
    except OSError:
      if not os.path.exists(done):
        raise
  return load_tokenizers(directory, text_model)
