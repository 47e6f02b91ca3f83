"""--mode=compile's engine (ernie5_jax/aot): the tiny model compiled for a 4-chip TPU v5p slice
by libtpu's real compiler, with the Pallas backends under fsdp x expert and data x tensor
meshes; an oversized config fails with the named error. (The CUDA lowering of the sharded
step runs on 8 host devices: tests/multidevice/cases.py.)
"""

import pytest

from ernie5_jax import config as config_lib
from ernie5_jax.aot import chips
from ernie5_jax.aot import compile as aot

TOPOLOGY = "v5p:2x2x1"


def _config(**mesh):
  """d_model 256 (2 heads of 128, Mosaic's lane width), 1 dense + 1 MoE layer, seq 128."""
  config = config_lib.default_config()
  config.model.update(vocab_size=256, d_model=256, num_heads=2, num_kv_heads=2, head_dim=128,
                      rope_sections=(32, 16, 16), num_layers=2, num_dense_layers=1,
                      num_experts=8, num_shared_experts=1, expert_hidden=128,
                      dense_hidden=256, top_k=2, audio_levels=1)
  config.objective.update(mtp_depth=0, audio_level_weights=())
  config.data.update(seq_len=128, global_batch_size=8)
  config.mesh.update(mesh)
  return config


@pytest.fixture(scope="module", params=[dict(fsdp=2, expert=2), dict(tensor=2)],
                ids=["fsdp_x_expert", "data_x_tensor"])
def report(request):
  return aot.compile_for_topology(_config(**request.param), TOPOLOGY)


@pytest.mark.slow
def test_tpu_compile_uses_mosaic_kernels_and_reports_memory(report):
  train, decode = report["programs"]
  assert (train["program"], decode["program"]) == ("train_step", "decode_step")
  assert report["platform"] == "tpu" and report["devices"] == 4
  # Attention forward + dq + dkv (2 layers) and the grouped matmul's 3 gmm + 3 backward gmm
  # + 3 tgmm: all Mosaic, none interpreted.
  assert train["kernels"]["mosaic_kernels"] == 15, train["kernels"]
  assert decode["kernels"]["mosaic_kernels"] >= 3, decode["kernels"]
  for p in (train, decode):
    m = p["memory"]
    assert m["arguments"] > 0 and m["temporaries"] > 0 and p["fits"]
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
    assert p["xla_flops"] > 0 and 0 < p["mfu_bound"] <= 1
  # XLA's FLOPs are the model's (model/flops.py) within a few tens of percent (each layer is
  # its own one-layer stack here, so no loop body is counted once for several layers).
  assert 0.8 < train["xla_flops"] / train["model_flops"] < 2.0
  mesh = report["mesh"]
  if mesh["expert"] == 2:  # Dropless expert parallelism: the ragged exchange, on TPU.
    assert train["collectives"]["ragged-all-to-all"]["count"] >= 2
    assert train["collectives"]["all-gather"]["bytes"] > 0  # fsdp: weights gathered per use
  else:  # data x tensor: gradients all-reduced, no token exchange.
    assert "all-to-all" not in train["collectives"]
    assert train["collectives"]["all-reduce"]["count"] > 0
  text = aot.format_report(report)
  assert "HBM per chip" in text and "fits" in text and "mosaic_kernels 15" in text


@pytest.mark.slow
def test_oversized_config_fails_naming_the_fields_to_change():
  config = _config(tensor=2)
  config.model.vocab_size = 2**23  # 8M x 256 f32 embedding + Adam moments: > 16 GiB
  with pytest.raises(aot.DoesNotFitError, match=r"train_step .*TPU v5e.*16 GiB.*"
                     r"config\.data\.global_batch_size.*config\.model\.remat.*config\.mesh\.fsdp"):
    aot.compile_for_topology(config, "v5e:2x2", programs=("train_step",))


def test_topology_names_are_checked():
  assert chips.parse_topology("v5p:4x4x4").num_devices == 64
  assert chips.parse_topology("h100:16").chip.platform == "cuda"
  for bad in ("v9:2x2", "v5p", "h100:2x2", "v5p:0x2"):
    with pytest.raises(config_lib.ConfigError, match=r"--topology=.* is not accepted: expected "
                       r"'<chip>:<shape>' with chip one of"):
      chips.parse_topology(bad)
  config = _config(expert=8)  # 8 expert shards on 4 chips
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.data=-1 cannot fill 4 devices"):
    aot.compile_for_topology(config, TOPOLOGY)
