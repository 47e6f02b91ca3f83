"""ERNIE 4.5 checkpoints in and out (ernie5_jax/interop/ernie45.py), against transformers.

The fixtures in testdata/ and their reference logits and routing were made by transformers
(make_ernie45_fixtures.py, run in a side environment with torch; CI has no torch).
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ernie5_jax import elastic_export, store
from ernie5_jax.interop import ernie45
from ernie5_jax.model import elastic, rope

DATA = pathlib.Path(__file__).resolve().parent / "testdata"
MOE, DENSE = DATA / "ernie45_moe_tiny", DATA / "ernie45_dense_tiny"
REF = np.load(DATA / "ernie45_reference.npz")


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens):
  batch, seq = tokens.shape  # [batch, seq]
  logits, aux = nnx.merge(graphdef, state)(
      tokens, rope.text_positions(batch, seq), jnp.ones((batch, seq), jnp.int32),
      jnp.zeros((batch, seq), jnp.int32))
  return logits, aux["expert_ids"]


def _forward(model):
  """(logits [batch, seq, vocab], expert ids [moe_layers, batch, seq, k]) on REF's tokens;
  one compile per model config."""
  logits, ids = _jit_forward(nnx.graphdef(model), nnx.state(model), jnp.asarray(REF["tokens"]))
  return np.asarray(logits), np.asarray(ids)


def _assert_same_state(a, b):
  for (path, x), (path_b, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b), strict=True):
    assert path == path_b
    np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()),
                                  err_msg=str(path))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """name -> (directory, config, model, logits, expert ids) of each imported fixture."""
  root = tmp_path_factory.mktemp("ernie45")
  out = {}
  for name, src in (("moe", MOE), ("dense", DENSE)):
    directory = ernie45.import_checkpoint(str(src), str(root / name))
    config, model = store.restore_model(directory)
    out[name] = (directory, config, model) + _forward(model)
  return out


def test_moe_import_matches_transformers_logits_and_routing(imported):
  _, config, _, logits, expert_ids = imported["moe"]
  assert np.max(np.abs(logits - REF["moe_logits"])) <= 1e-4
  # [moe_layers, batch, seq, k] -> transformers' [moe_layers, tokens, k]: the same experts in
  # the same order (top-k on score + e_score_correction_bias) for every token.
  np.testing.assert_array_equal(expert_ids.reshape(REF["moe_expert_ids"].shape),
                                REF["moe_expert_ids"])
  m = config.model
  assert (m.num_dense_layers, m.num_experts, m.top_k, m.num_shared_experts) == (1, 8, 2, 1)
  assert not m.embed_scale and m.rope_theta == 500000.0 and m.norm_eps == 1e-5


def test_dense_import_matches_transformers_logits(imported):
  _, config, _, logits, _ = imported["dense"]
  assert np.max(np.abs(logits - REF["dense_logits"])) <= 1e-4
  m = config.model  # 4 heads * head_dim 32 != d_model 64; an untied output head.
  assert (m.num_heads * m.head_dim, m.d_model, m.tie_embeddings) == (128, 64, False)
  assert m.num_dense_layers == m.num_layers == 2


def test_the_bias_and_the_rope_permutation_matter(imported):
  """The parity above is not vacuous: without the bias routing changes, without the
  permutation the logits do."""
  _, config, model, logits, expert_ids = imported["moe"]
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  bias_path = ("moe_layers", "layers", "ffn", "router", "bias")
  wq_path = ("moe_layers", "layers", "attn", "wq")
  inverse = np.argsort(ernie45.rope_permutation(config.model.head_dim))
  changed = dict(flat)
  changed[bias_path] = flat[bias_path].replace(jnp.zeros_like(flat[bias_path].get_value()))
  changed[wq_path] = flat[wq_path].replace(flat[wq_path].get_value()[..., inverse])
  new_logits, new_ids = _forward(nnx.merge(graphdef, nnx.from_flat_state(changed)))
  assert not np.array_equal(new_ids[:1], expert_ids[:1])  # Layer 1 sees the same input.
  assert np.max(np.abs(new_logits - logits)) > 1e-2


@pytest.mark.parametrize("name,src", [("moe", MOE), ("dense", DENSE)])
def test_export_reproduces_the_checkpoint_and_round_trips_exactly(imported, tmp_path, name,
                                                                  src):
  directory, config, model, _, _ = imported[name]
  out = ernie45.export_checkpoint(directory, str(tmp_path / "hf"))
  exported, original = load_file(f"{out}/model.safetensors"), load_file(
      f"{src}/model.safetensors")
  assert exported.keys() == original.keys()
  for key, value in original.items():  # Bit for bit, dtype included.
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert ernie45.model_config(hf).model.to_dict() == config.model.to_dict()
  back_dir = ernie45.import_checkpoint(out, str(tmp_path / "back"))
  _, back = store.restore_model(back_dir)
  _assert_same_state(nnx.state(model), nnx.state(back))
  assert (name == "moe") == (tmp_path / "hf" / "tokenizer.model").is_file()


@pytest.mark.parametrize("cut", [elastic.SubModel(depth=2, experts=8, top_k=2),
                                 elastic.SubModel(depth=3, experts=4, top_k=1)])
def test_submodel_export_equals_the_masked_family_member(imported, tmp_path, cut):
  """The HF export of a sub-model holds exactly the arrays of the orbax sub-model export,
  which computes what the full model computes under the sub-model's masks
  (tests/test_elastic_export.py)."""
  directory, config, model, _, _ = imported["moe"]
  out = ernie45.export_checkpoint(directory, str(tmp_path / "hf"), sub=cut)
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (hf["num_hidden_layers"], hf["moe_num_experts"], hf["moe_k"]) == (
      cut.depth, cut.experts, cut.top_k)
  _, sub_state = elastic_export.export_submodel(config, nnx.state(model), cut)
  _, back = store.restore_model(ernie45.import_checkpoint(out, str(tmp_path / "back")))
  _assert_same_state(sub_state, nnx.state(back))


def _edit_config(d, **changes):
  hf = json.loads((d / "config.json").read_text())
  hf.update(changes)
  (d / "config.json").write_text(json.dumps(hf))


def _edit_tensors(d, fn):
  tensors = load_file(d / "model.safetensors")
  fn(tensors)
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _pickle_only(d):
  (d / "model.safetensors").unlink()
  (d / "pytorch_model.bin").write_bytes(b"not to be unpickled")


@pytest.mark.parametrize("edit,message", [
    (lambda d: _edit_config(d, model_type="ernie4_5_moe_vl", vision_config={}),
     r"model_type='ernie4_5_moe_vl' is not accepted: the VL model's modality-isolated experts"),
    (lambda d: _edit_config(d, model_type="llama"), r"model_type='llama' is not accepted"),
    (lambda d: _edit_config(d, moe_magic=1), r"keys \['moe_magic'\] are not accepted"),
    (lambda d: _edit_config(d, use_bias=True), r"use_bias=True is not accepted: linear biases"),
    (lambda d: _edit_config(d, moe_layer_interval=2),
     r"MoE layer pattern \(moe_layer_start_index=1, moe_layer_end_index=2, "
     r"moe_layer_interval=2\) is not accepted"),
    (lambda d: _edit_config(d, moe_layer_end_index=1), r"MoE layer pattern"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     r"rope scaling .* is not accepted"),
    (lambda d: _edit_config(d, moe_k=9), r"config.model.top_k=9 is not accepted"),
    (lambda d: _edit_config(d, moe_gate_act="sigmoid"), r"moe_gate_act='sigmoid' is not"),
    (lambda d: _edit_config(d, moe_num_experts=[8, 8]), r"\['moe_num_experts'\] as "
                                                        r"per-modality lists"),
    (lambda d: _edit_config(d, quantization_config={"quant_method": "wint4"}),
     r"quantization_config is not accepted"),
    (lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.gate.weight")),
     r"model.layers.1.mlp.gate.weight: missing"),
    (lambda d: _edit_tensors(d, lambda t: t.update(extra=np.zeros(3, np.float32))),
     r"extra: not expected"),
    (lambda d: _edit_config(d, moe_intermediate_size=16),
     r"model.layers.1.mlp.experts.0.gate_proj.weight: shape \(32, 64\) != \(16, 64\)"),
    (_pickle_only, r"pytorch_model.bin is not accepted: pickle-based weights are never loaded"),
    (lambda d: (d / "config.json").unlink(), r"config.json does not exist"),
    (lambda d: (d / "config.json").write_text("{"), r"config.json is not accepted: not JSON"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x08\x00garbage"),
     r"model.safetensors is not accepted: not a readable safetensors file"),
])
def test_import_errors_name_the_cause_and_write_nothing(tmp_path, edit, message):
  src = tmp_path / "ckpt"
  shutil.copytree(MOE, src)
  edit(src)
  with pytest.raises(ernie45.HFCheckpointError, match=message):
    ernie45.import_checkpoint(str(src), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_mtp_tensors_skipped_absent_bias_zero_and_null_keys_read_as_transformers(tmp_path):
  src = tmp_path / "ckpt"
  shutil.copytree(MOE, src)
  bias = "model.layers.2.mlp.moe_statics.e_score_correction_bias"
  _edit_tensors(src, lambda t: (t.update({"mtp_emb_norm.0.weight": np.ones(64, np.float32),
                                         "lm_head.weight": t["model.embed_tokens.weight"]}),
                                t.pop(bias)))
  _edit_config(src, moe_layer_end_index=None, head_dim=None, moe_gate_act=None,
               moe_use_aux_free=True, use_moe=True)
  out = ernie45.import_checkpoint(str(src), str(tmp_path / "out"))
  report = json.loads(pathlib.Path(out, "import.json").read_text())
  assert report["skipped_tensors"] == ["lm_head.weight", "mtp_emb_norm.0.weight"]
  assert report["zero_tensors"] == [bias]
  config, model = store.restore_model(out)
  assert (config.model.num_dense_layers, config.model.head_dim) == (1, 16)
  layer_bias = dict(nnx.to_flat_state(nnx.state(model)))[
      ("moe_layers", "layers", "ffn", "router", "bias")].get_value()  # [moe_layers, experts]
  assert np.all(np.asarray(layer_bias[1]) == 0) and np.any(np.asarray(layer_bias[0]) != 0)


def test_export_refuses_models_without_an_ernie45_form(imported):
  config = imported["moe"][1]
  bad = config.copy_and_resolve_references()
  bad.model.embed_scale = True
  bad.model.audio_levels = 2
  with pytest.raises(ernie45.HFCheckpointError,
                     match=r"model.embed_scale=True .*; model.audio_levels=2"):
    ernie45.hf_config(bad)


def test_cli_import_error_is_one_line_with_status_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ernie5_jax.main", "--mode=import", f"--hf_checkpoint={tmp_path}",
       f"--workdir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: HFCheckpointError: {tmp_path}/config.json does not exist: expected the HF "
      "checkpoint's config.json")
  assert "Traceback" not in proc.stderr


def test_expert_reorder_by_load_is_exact_and_puts_the_busiest_first(imported):
  """The reorder the import's --calibration_text applies (elastic_export.permute_experts)."""
  _, config, model, logits, expert_ids = imported["moe"]
  count = lambda ids: np.stack([np.bincount(ids[l].ravel(), minlength=8) for l in range(2)])
  order = np.asarray(elastic_export.expert_order(count(expert_ids)))  # [moe_layers, experts]
  assert not np.array_equal(order, np.tile(np.arange(8), (2, 1)))  # A real permutation.
  graphdef, state = nnx.split(model)
  moved = nnx.merge(graphdef, elastic_export.permute_experts(config, state, order))
  new_logits, new_ids = _forward(moved)
  np.testing.assert_allclose(new_logits, logits, atol=1e-5)  # Summation order only (2e-6).
  rank = np.argsort(order, axis=-1)  # Old expert id -> its new position, per layer.
  np.testing.assert_array_equal(new_ids, np.stack([rank[l][expert_ids[l]] for l in range(2)]))
  assert np.all(np.diff(count(new_ids), axis=-1) <= 0)  # Busiest first: prefixes keep them.


def test_import_takes_the_tokenizer_and_a_calibration_text(imported, tmp_path, monkeypatch):
  from ernie5_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from ernie5_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  directory, config, _, _, _ = imported["moe"]
  assert config.data.text_model == os.path.join(directory, "tokenizer.model")
  assert config.model.router_param_dtype == "float32"
  text = config.copy_and_resolve_references()
  text.data.source = "tfds:stdlib_text"  # Text tokenized with the checkpoint's 256 pieces.
  input_pipeline.validate(text)
  text.model.vocab_size = 200
  with pytest.raises(ConfigError, match=r"config.model.vocab_size=200 is not accepted: "
                                        r"expected >= 256, the pieces of data.text_model"):
    input_pipeline.validate(text)
  text.data.text_model = str(tmp_path / "none.model")
  with pytest.raises(ConfigError, match=r"config.data.text_model=.* expected a SentencePiece"):
    input_pipeline.validate(text)
  seen = {}
  from ernie5_jax.input_pipeline import seqio_tasks  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(seqio_tasks, "make_text_pipeline", lambda source, **kw: seen.update(kw))
  text.model.vocab_size = 256
  text.data.text_model = config.data.text_model
  input_pipeline.create_dataset(text, process_index=0, process_count=1)
  assert seen["text_model"] == config.data.text_model  # The text source's tokenizer.
  calib = tmp_path / "calib.txt"
  calib.write_text("the router scores every hidden state\nexperts are chosen by a router\n")
  out = ernie45.import_checkpoint(str(MOE), str(tmp_path / "calibrated"),
                                  calibration_text=str(calib))
  order = json.loads(pathlib.Path(out, "import.json").read_text())["expert_order"]
  assert [sorted(row) for row in order] == [list(range(8))] * 2
  with pytest.raises(ernie45.HFCheckpointError, match=r"needs the checkpoint's tokenizer.model"):
    ernie45.import_checkpoint(str(DENSE), str(tmp_path / "x"), calibration_text=str(calib))


def test_bf16_checkpoints_stay_bf16_with_a_float32_router(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  src = tmp_path / "bf16"
  shutil.copytree(MOE, src)
  keep32 = ("mlp.gate.weight", "e_score_correction_bias")  # As transformers stores them.
  _edit_tensors(src, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()
                                         if not k.endswith(keep32)}))
  out = ernie45.import_checkpoint(str(src), str(tmp_path / "in"))
  config, model = store.restore_model(out)
  assert (config.model.param_dtype, config.model.router_param_dtype) == ("bfloat16", "float32")
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  assert flat[("embed", "table")].get_value().dtype == jnp.bfloat16
  assert flat[("moe_layers", "layers", "ffn", "router", "kernel")].get_value().dtype == jnp.float32
  exported = load_file(f"{ernie45.export_checkpoint(out, str(tmp_path / 'hf'))}/model.safetensors")
  for key, value in load_file(src / "model.safetensors").items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key


def test_generate_gives_an_imported_model_text_samples_in_its_vocabulary(imported, tmp_path,
                                                                          monkeypatch):
  from ernie5_jax.eval import samples  # pylint: disable=g-import-not-at-top
  _, config, model, _, _ = imported["moe"]
  monkeypatch.setattr(samples, "decode_tokens_per_sec", lambda *a, **k: 1.0)  # Its own test.
  report = samples.generate_text_samples(config, model, str(tmp_path), text_tokens=1)
  assert [t["prompt"] for t in report["text"]] == list(samples.TEXT_PROMPTS)
  assert report["tokenizer"] == config.data.text_model
  assert (tmp_path / "text.txt").read_text().count("->") == len(samples.TEXT_PROMPTS)
