"""Sub-model export (ernie5_jax/elastic_export.py): the export computes what the masked
full model computes, loads back as a normal Decoder, and --mode=export writes it."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ernie5_jax import config as config_lib
from ernie5_jax import elastic_export
from ernie5_jax import store
from ernie5_jax.model import elastic
from ernie5_jax.model.rope import text_positions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ, VOCAB = 2, 8, 64
S = elastic.SubModel


def tiny_config(scan_layers=True):
  """3 layers (1 dense + 2 MoE), 4 experts, top-2, one MTP module and audio heads."""
  config = config_lib.default_config()
  config.model.update(dict(
      vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
      rope_sections=(2, 1, 1), num_dense_layers=1, dense_hidden=48, num_experts=4,
      num_shared_experts=1, expert_hidden=16, top_k=2, scan_layers=scan_layers,
      audio_levels=2, audio_codebook_size=8, audio_head_hidden=16))
  config.objective.audio_level_weights = (1.0,)
  config.elastic.enabled = True
  config_lib.validate(config)
  return config


def random_state(config, seed=0):
  """nnx.State of config's Decoder from numpy, router bias and loss EMA included."""
  graphdef, state = nnx.split(elastic_export.abstract_model(config))
  rng = np.random.default_rng(seed)
  return graphdef, jax.tree.map(
      lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), state)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, SEQ)), jnp.int32)
  return (tokens, text_positions(BATCH, SEQ), jnp.ones((BATCH, SEQ), jnp.int32),
          jnp.zeros((BATCH, SEQ), jnp.int32))


def _full(scan_layers, batch):
  """The full model's config and state, and its masked forward (one compile)."""
  config = tiny_config(scan_layers=scan_layers)
  graphdef, state = random_state(config)
  masked = jax.jit(lambda s, m: nnx.merge(graphdef, s)(*batch, elastic=m))
  return config, state, masked


@pytest.fixture(scope="module")
def full(batch):
  return _full(True, batch)


def _forward(config, state, batch):
  return nnx.jit(lambda m, b: m(*b))(elastic_export.build_model(config, state), batch)


# Each exported shape compiles once (~5 s here): S(2, 3, 1) cuts every axis, S(3, 2, 2)
# only the width; test_written_export... runs S(2, 2, 1).
@pytest.mark.parametrize("scan_layers,subs", [(True, [S(2, 3, 1), S(3, 2, 2)]),
                                              (False, [S(2, 3, 1)])],
                         ids=["scanned", "unrolled"])
def test_export_equals_the_masked_full_model(scan_layers, subs, full, batch):
  config, state, masked = full if scan_layers else _full(False, batch)
  for sub in subs:
    sub_config, sub_state = elastic_export.export_submodel(config, state, sub)
    m = sub_config.model
    assert (m.num_layers, m.num_experts, m.top_k) == (sub.depth, sub.experts, sub.top_k)
    assert m.num_dense_layers == 1 and not sub_config.elastic.enabled
    config_lib.validate(sub_config)
    n_params = sum(int(x.size) for x in jax.tree.leaves(sub_state.filter(nnx.Param)))
    assert n_params == elastic_export.param_counts(config, sub)["total"]

    logits, aux = _forward(sub_config, sub_state, batch)
    want, want_aux = masked(state, elastic.masks_for(config, sub))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=1e-5,
                               err_msg=str(sub))
    kept_moe = [i - 1 for i in elastic.kept_layers(config, sub) if i >= 1]
    np.testing.assert_allclose(
        np.asarray(aux["expert_load"]),
        np.asarray(want_aux["expert_load"])[kept_moe, :sub.experts], err_msg=str(sub))
    for name in ("load_balance_loss", "z_loss"):
      np.testing.assert_allclose(float(aux[name]), float(want_aux[name]), rtol=1e-5,
                                 err_msg=f"{sub} {name}")


def test_export_slices_the_right_arrays(full):
  config, state, _ = full
  _, sub_state = elastic_export.export_submodel(config, state, S(2, 3, 2))
  flat, sub = dict(nnx.to_flat_state(state)), dict(nnx.to_flat_state(sub_state))
  get = lambda d, *p: np.asarray(d[p].get_value())
  # Kept layers (0, 2): the dense layer and MoE layer 1 (of 0, 1).
  np.testing.assert_array_equal(get(sub, "moe_layers", "layers", "attn", "wq"),
                                get(flat, "moe_layers", "layers", "attn", "wq")[1:])
  np.testing.assert_array_equal(get(sub, "moe_layers", "layers", "ffn", "experts", "w_down"),
                                get(flat, "moe_layers", "layers", "ffn", "experts",
                                    "w_down")[1:, :3])
  np.testing.assert_array_equal(get(sub, "moe_layers", "layers", "ffn", "router", "kernel"),
                                get(flat, "moe_layers", "layers", "ffn", "router",
                                    "kernel")[1:, :, :3])
  # Reduced width: trained without the bias in selection, so exported without it; a
  # depth-only sub-model keeps it.
  assert not get(sub, "moe_layers", "layers", "ffn", "router", "bias").any()
  _, deep = elastic_export.export_submodel(config, state, S(2, 4, 2))
  np.testing.assert_array_equal(
      get(dict(nnx.to_flat_state(deep)), "moe_layers", "layers", "ffn", "router", "bias"),
      get(flat, "moe_layers", "layers", "ffn", "router", "bias")[1:])
  for path in (("embed", "table"), ("loss_ema",), ("dense_layers", "layers", "ffn", "w_up")):
    np.testing.assert_array_equal(get(sub, *path), get(flat, *path))
  with pytest.raises(config_lib.ConfigError, match=r"top_k=3 is not accepted"):
    elastic_export.export_submodel(config, state, S(3, 4, 3))


def test_paper_export_keeps_the_experts_of_highest_load(full, batch):
  config, state, masked = full
  model = elastic_export.build_model(config, state)
  load = elastic_export.measure_load(model, [dict(zip(
      ("tokens", "positions", "segment_ids", "group_ids"), batch))])  # [moe_layers, E]
  order = np.asarray(elastic_export.expert_order(load))
  np.testing.assert_array_equal(np.sort(np.asarray(load), -1)[:, ::-1],
                                np.take_along_axis(np.asarray(load), order, -1))
  order = np.array([[2, 0, 3, 1], [1, 3, 0, 2]])  # each layer its own order
  permuted = elastic_export.permute_experts(config, state, order)
  # The permuted full model is the same function (router, bias and experts moved together).
  full_sub = elastic.masks_for(config, elastic.full_submodel(config))
  np.testing.assert_allclose(np.asarray(masked(permuted, full_sub)[0]),
                             np.asarray(masked(state, full_sub)[0]), atol=1e-5, rtol=1e-5)
  # The export keeps each layer's first experts of the order, and equals the masked model.
  sub = S(3, 2, 2)
  sub_config, sub_state = elastic_export.export_submodel(config, state, sub, order=order)
  w_down = np.asarray(dict(nnx.to_flat_state(sub_state))[
      ("moe_layers", "layers", "ffn", "experts", "w_down")].get_value())
  flat = dict(nnx.to_flat_state(state))
  want = np.asarray(flat[("moe_layers", "layers", "ffn", "experts", "w_down")].get_value())
  for layer in range(2):
    np.testing.assert_array_equal(w_down[layer], want[layer, order[layer, :2]])
  logits, _ = _forward(sub_config, sub_state, batch)
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(masked(permuted, elastic.masks_for(config, sub))[0]),
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match=r"order.shape=\(4,\) is not accepted: expected \(2, 4\)"):
    elastic_export.permute_experts(config, state, order[0])


def test_written_export_restores_as_a_normal_decoder(full, batch, tmp_path):
  config, state, masked = full
  sub = S(2, 2, 1)
  sub_config, sub_state = elastic_export.export_submodel(config, state, sub)
  out = elastic_export.write_submodel(str(tmp_path / "export"), sub_config, sub_state, sub=sub,
                                      kept_layers=(0, 2))
  assert json.load(open(os.path.join(out, "submodel.json")))["kept_layers"] == [0, 2]
  loaded_config, model = store.restore_model(out)
  assert loaded_config.model.num_layers == 2 and loaded_config.model.num_experts == 2
  assert loaded_config.model.top_k == 1 and not loaded_config.elastic.enabled
  logits, _ = nnx.jit(lambda m, b: m(*b))(model, batch)
  want, _ = masked(state, elastic.masks_for(config, sub))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-5, rtol=1e-5)
  with pytest.raises(FileExistsError, match="already holds a model/"):
    elastic_export.write_submodel(out, sub_config, sub_state)


def test_a_path_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(store.CheckpointNotFoundError, match=r"holds no checkpoint: "
                     r"expected a training workdir"):
    elastic_export.export_checkpoint(str(tmp_path), S(2, 2, 1), str(tmp_path / "out"))
  with pytest.raises(store.CheckpointNotFoundError, match="does not exist"):
    elastic_export.export_checkpoint(str(tmp_path / "missing"), S(2, 2, 1),
                                     str(tmp_path / "out"))


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ernie5_jax.main", "--mode=export", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_export(tmp_path):
  """--mode=export on a training workdir (checkpoints/<step>/model + config.json)."""
  config = tiny_config()
  _, state = random_state(config, seed=3)
  workdir = tmp_path / "run"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(workdir / "checkpoints" / "7" / "model"), state)
  store.save_config(config, str(workdir))

  proc = _cli(f"--checkpoint={workdir}", "--submodel=2,3,1", f"--workdir={tmp_path / 'sub'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  meta = json.load(open(tmp_path / "sub" / "submodel.json"))
  assert (meta["depth"], meta["experts"], meta["top_k"]) == (2, 3, 1)
  assert meta["source"].endswith("checkpoints/7/model (step 7)")
  sub_config = store.load_config(str(tmp_path / "sub"))
  assert (sub_config.model.num_layers, sub_config.model.num_experts) == (2, 3)

  proc = _cli(f"--checkpoint={tmp_path / 'empty'}", "--submodel=2,3,1",
              f"--workdir={tmp_path / 'x'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "error: CheckpointNotFoundError: checkpoint path" in proc.stderr
  proc = _cli(f"--checkpoint={workdir}", "--submodel=3,4,3", f"--workdir={tmp_path / 'x'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "error: ConfigError: SubModel(depth=3,experts=4,top_k=3): top_k=3 is not accepted" \
      in proc.stderr
  proc = _cli(f"--checkpoint={workdir}", f"--workdir={tmp_path / 'x'}")
  assert proc.returncode == 2 and "--mode=export needs --checkpoint=PATH" in proc.stderr
