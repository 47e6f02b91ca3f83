"""Generation with the model's KV cache: text, next-scale images, next-codec audio.

  dec = CachedDecoder(model)                                   # decode.py: jitted steps
  ids = loops.generate_text(dec, layout, prompts, max_new_tokens=32)
  codes = loops.generate_images(dec, layout, captions)         # per scale [N, s, s]
  clips = loops.generate_audio(dec, layout, captions, frames=20)  # [N, frames, K]

sampling.py (greedy / temperature / top-p within an id range), decode.py (jitted steps of
the Decoder's own forward pass through its KV cache, model/kv_cache.py), loops.py (the
decoding loop per modality, fed as input_pipeline/sequence.py lays out training
documents; prompts from input_pipeline/prompts.py), media.py (PNG / WAV). The job that
writes samples from a checkpoint (--mode=generate) is eval/samples.py.
"""

from ernie5_jax.generate.decode import CachedDecoder, StepInputs, StepOutput
from ernie5_jax.generate.sampling import GREEDY, Sampling, sample
