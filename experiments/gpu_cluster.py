"""ERNIE-5-style MoE variant B or L on a GPU cluster: nodes of 8 GPUs, one process per GPU.

SLURM (one task per GPU; SLURM_NTASKS > 1 makes config.distributed.initialize="auto" call
jax.distributed.initialize, which reads the coordinator, process count and id from SLURM):

  srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 \
    python -m ernie5_jax.main --config=experiments/gpu_cluster.py:L --workdir=/shared/ernie5_L

Without SLURM, start one process per node (it sees its 8 GPUs) with the coordinator named:

  python -m ernie5_jax.main --config=experiments/gpu_cluster.py:L --workdir=/shared/ernie5_L \
    --config.distributed.coordinator_address=node0:1234 \
    --config.distributed.num_processes=4 --config.distributed.process_id=$NODE_RANK

Mesh: expert = 8 inside a node (the token all-to-all stays on NVLink), data = -1 across
nodes (gradients all-reduced over the network); GPUS sets the device count the layout
is planned for (--mode=compile --topology=h100:N lowers the step for it; per-device HBM:
benchmarks/pod_compile.py). --workdir must be a filesystem every
process sees (orbax writes one checkpoint from all of them).
"""

from ernie5_jax import config as config_lib
from ernie5_jax.model.decoder import apply_variant

GPUS = {"B": 16, "L": 32}  # Devices each variant's layout is planned for (2 and 4 nodes).
TOPOLOGY = {v: f"h100:{n}" for v, n in GPUS.items()}  # --mode=compile lowers for these.
_LAYOUT = {  # variant -> (mesh sizes, global batch, seq_len)
    "B": (dict(data=-1, fsdp=1, expert=8, tensor=1), 64, 4096),
    "L": (dict(data=-1, fsdp=1, expert=8, tensor=1), 128, 4096),
}


def get_config(arg: str = "L"):
  """Returns variant `arg` ("B" or "L") laid out for nodes of 8 GPUs (GPUS[arg] in all)."""
  if arg not in _LAYOUT:
    raise ValueError(f"gpu_cluster.py:{arg} is not accepted: expected one of {sorted(_LAYOUT)}")
  mesh, batch, seq = _LAYOUT[arg]
  config = config_lib.default_config()
  apply_variant(config.model, arg)
  config.model.update(dtype="bfloat16", param_dtype="float32", remat=True)
  config.mesh.update(mesh)
  # Dropless, as ERNIE 5.0: tokens travel by ragged all-to-all on GPUs.
  config.mesh.expert_capacity_factor = 0.0
  config.data.update(source="digits_multimodal", global_batch_size=batch, seq_len=seq)
  # pylint: disable-next=g-import-not-at-top
  from ernie5_jax.input_pipeline.multimodal import sync_vocabulary
  sync_vocabulary(config)  # The model's vocabulary and audio codec are the data's.
  config.optimizer.update(learning_rate=1e-3, warmup_steps=2_000)
  config.train.update(num_steps=100_000, log_every=100, checkpoint_every=1_000)
  return config
