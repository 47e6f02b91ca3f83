"""ERNIE-5-style MoE variant S, B or L on a Cloud TPU v5p slice (multi-host), bf16 + remat.

On every TPU VM worker of the slice, the same command (one process per host):

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd ernie5_jax && \
    python -m ernie5_jax.main --config=experiments/pod_tpu_v5p.py:L \
      --workdir=gs://$BUCKET/ernie5_L"

config.distributed.initialize = "always": jax.distributed.initialize() finds the other
workers from the TPU metadata; the mesh spans every chip (SLICE_CHIPS: v5p-16 for S,
v5p-64 for B, v5p-128 for L; mesh.data = -1 takes whatever the slice adds). Each host reads
its rows of the global batch; orbax writes the sharded checkpoint from all hosts into
--workdir (use a bucket every worker can reach). A resumed run may use another slice size:
the checkpoint is restored onto the new mesh. data.source defaults to the embedded
multimodal data (built on each host on first use); point it at a TFDS corpus with
--config.data.source=tfds:NAME --config.data.data_dir=gs://... (text; same vocabulary).
Compile it for the slice from any CPU host first (per-chip HBM, collectives, roofline):

  python -m ernie5_jax.main --mode=compile --config=experiments/pod_tpu_v5p.py:L \
    --topology=v5p:4x4x4 --workdir=workdirs/compile_L
"""

from ernie5_jax import config as config_lib
from ernie5_jax.model.decoder import apply_variant

# Chips (devices) of the slice each variant is laid out for; mesh sizes below multiply to it.
SLICE_CHIPS = {"S": 8, "B": 32, "L": 64}
# The slice as a --topology of --mode=compile (ernie5_jax/aot), which compiles the step for it.
TOPOLOGY = {"S": "v5p:2x2x2", "B": "v5p:2x4x4", "L": "v5p:4x4x4"}
_LAYOUT = {  # variant -> (mesh sizes, global batch, seq_len)
    "S": (dict(data=-1, fsdp=1, expert=4, tensor=1), 64, 2048),
    "B": (dict(data=-1, fsdp=2, expert=8, tensor=1), 128, 4096),
    "L": (dict(data=-1, fsdp=4, expert=8, tensor=1), 256, 4096),
}


def get_config(arg: str = "B"):
  """Returns variant `arg` ("S", "B" or "L") laid out for a v5p slice of SLICE_CHIPS[arg] chips."""
  if arg not in _LAYOUT:
    raise ValueError(f"pod_tpu_v5p.py:{arg} is not accepted: expected one of {sorted(_LAYOUT)}")
  mesh, batch, seq = _LAYOUT[arg]
  config = config_lib.default_config()
  apply_variant(config.model, arg)
  config.model.update(dtype="bfloat16", param_dtype="float32", remat=arg != "S")
  config.mesh.update(mesh)
  # Dropless, as ERNIE 5.0: on TPU the tokens travel by ragged all-to-all (every variant
  # compiles and fits its slice: benchmarks/results/pod_compile.json).
  config.mesh.expert_capacity_factor = 0.0
  config.distributed.initialize = "always"
  config.data.update(source="digits_multimodal", global_batch_size=batch, seq_len=seq)
  # pylint: disable-next=g-import-not-at-top
  from ernie5_jax.input_pipeline.multimodal import sync_vocabulary
  sync_vocabulary(config)  # The model's vocabulary and audio codec are the data's.
  config.optimizer.update(learning_rate=1e-3, warmup_steps=2_000)
  config.train.update(num_steps=100_000, log_every=100, checkpoint_every=1_000)
  return config
