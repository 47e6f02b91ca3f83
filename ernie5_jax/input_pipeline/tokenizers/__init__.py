"""Tokenizers of the unified sequence: text (SentencePiece / seqio), image and video
(multi-scale residual quantizer), audio (residual-VQ codec); assets carry a version."""

from ernie5_jax.input_pipeline.tokenizers.audio import AudioTokenizer, AudioTokenizerSpec
from ernie5_jax.input_pipeline.tokenizers.fit import (Tokenizers, asset_dir, ensure_tokenizers,
                                                      fit_tokenizers, load_tokenizers)
from ernie5_jax.input_pipeline.tokenizers.image import ImageTokenizer, ImageTokenizerSpec
from ernie5_jax.input_pipeline.tokenizers.text import (DEFAULT_MODEL, TextTokenizer,
                                                       seqio_vocabulary, text_tokenizer)
