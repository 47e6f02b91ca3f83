"""The 1T-A32 variant (~1.0e12 parameters, ~3.2e10 active) on a TPU v5p-2048 slice (1024 chips).

On every TPU VM worker (one process per host, 256 hosts):

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd ernie5_jax && \
    python -m ernie5_jax.main --config=experiments/ultra_1t.py --workdir=gs://$BUCKET/ernie5_1t"

Layout: 384 routed experts split over expert = 64 (6 per chip); every other weight split
over fsdp x expert = 1024 ways on its embed dimension (ZeRO-3), experts' embed over
fsdp = 16; the batch (2048 x 4096 tokens) over all 1024 chips. float32 master weights and
AdamW moments, bfloat16 compute, every block rematerialised, expert all-to-all buffers
capped at 1.25x the balanced load (assignments past it are dropped; aux-loss-free
balancing keeps the loads near the mean; the dropless exchange's worst-case receive buffer,
64 shards x 8192 tokens x top-8 rows of 7168, would be ~60 GB per buffer). Per-chip HBM
from the compiler: benchmarks/pod_compile.py (95 GiB of HBM per v5p chip).
"""

from ernie5_jax import config as config_lib
from ernie5_jax.model.decoder import apply_variant

SLICE_CHIPS = 1024
TOPOLOGY = "v5p:8x8x16"  # --mode=compile's --topology for the slice (ernie5_jax/aot).


def get_config():
  """Returns 1T-A32 laid out for SLICE_CHIPS chips."""
  config = config_lib.default_config()
  apply_variant(config.model, "1T-A32")
  config.model.update(dtype="bfloat16", param_dtype="float32", remat=True)
  config.mesh.update(data=-1, fsdp=16, expert=64, tensor=1, expert_capacity_factor=1.25)
  config.distributed.initialize = "always"
  config.data.update(source="digits_multimodal", global_batch_size=2048, seq_len=4096)
  # pylint: disable-next=g-import-not-at-top
  from ernie5_jax.input_pipeline.multimodal import sync_vocabulary
  sync_vocabulary(config)  # The model's vocabulary and audio codec are the data's.
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2_000)
  config.train.update(num_steps=200_000, log_every=100, checkpoint_every=500)
  return config
