"""Generation with a fixed-size KV cache: text, next-scale images, next-codec audio.

  dec = CachedDecoder(model)                                   # decode.py: jitted steps
  ids = tasks.generate_text(dec, layout, prompts, max_new_tokens=32)
  codes = tasks.generate_images(dec, layout, captions)         # per scale [N, s, s]
  clips = tasks.generate_audio(dec, layout, captions, frames=20)  # [N, frames, K]
  python -m ernie5_jax.main --mode=generate --checkpoint=DIR --workdir=OUT   # run.py

sampling.py (greedy / temperature / top-p within an id range), decode.py (jitted steps
of the Decoder's own forward pass through its KV cache, model/kv_cache.py), tasks.py (prompts and steps laid out as input_pipeline/sequence.py
lays out training documents), media.py (PNG / WAV), run.py (samples from a checkpoint,
digit accuracy, decode tokens/s).
"""

from ernie5_jax.generate.decode import CachedDecoder, StepInputs, StepOutput
from ernie5_jax.generate.sampling import GREEDY, Sampling, sample
