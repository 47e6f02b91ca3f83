"""ERNIE 4.5 text checkpoints (Hugging Face safetensors) in and out of this codebase's Decoder.

`import_checkpoint(hf_dir, out_dir)` (`--mode=import`) reads config.json + the safetensors
shards of an `Ernie4_5ForCausalLM` (dense) or `Ernie4_5_MoeForCausalLM` checkpoint and
writes the model store's layout (orbax model/ + config.json, store.save_model), which
`--mode=eval/generate/export/rl` and `train.init_from` take as they are.
`export_hf(config, state, out_dir)` (`--mode=export --format=hf`) writes the inverse, for
the full model or an elastic sub-model, loadable by transformers' ERNIE 4.5 classes.

What differs between the two implementations and how the mapping makes them compute the
same function (measured against transformers: tests/interop/test_ernie45.py):
- embedding: ERNIE 4.5 has no sqrt(d_model) multiplier -> config.model.embed_scale=False;
- RoPE pairing: ERNIE 4.5 rotates interleaved pairs (x[2i], x[2i+1]) by frequency i, this
  model (x[i], x[i + head_dim/2]) (model/rope.py). Permuting the head_dim columns of wq and
  wk to [0, 2, 4, ..., 1, 3, 5, ...] is exact: q.k is a sum over the same products;
- `mlp.moe_statics.e_score_correction_bias` selects experts only (softmax scores + bias,
  weights renormalised without it): the RouterBias of model/router.py, same semantics;
- text positions (t = h = w) make Uni-RoPE 1-D RoPE whatever rope_sections says; the import
  gives all pairs to t: rope_sections = (head_dim // 2, 0, 0);
- dense layers first, then MoE layers: moe_layer_start_index -> num_dense_layers; any other
  pattern (interval > 1, MoE layers not reaching the last layer) is rejected by name.
The multi-token-prediction tensors some checkpoints carry (`mtp_*`) are not imported: this
model's MTP module (model/heads.py) is a dense block with its own output norm, ERNIE 4.5's
an MoE block sharing the final norm. They are listed in import.json as skipped.

Reading is lazy (safe_open, one tensor at a time); each parameter is placed straight into
its sharding on config.mesh by jax.make_array_from_callback from an abstract model (no
random init), so host memory stays near one tensor plus the parameters' shards. Pickle
weights (pytorch_model.bin, *.pt) are never opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ernie5_jax import config as config_lib
from ernie5_jax import sharding
from ernie5_jax import elastic_export
from ernie5_jax import store
from ernie5_jax.elastic_export import abstract_model
from ernie5_jax.model import elastic, rope

HF_CONFIG = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
IMPORT_REPORT = "import.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
ARCHITECTURES = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}
# config.json keys that do not change the forward pass (read and ignored).
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
    "torch_dtype", "transformers_version", "use_cache", "max_position_embeddings",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "moe_norm_min",
    "auto_map", "use_flash_attention", "num_nextn_predict_layers", "num_mtp_layers",
    "multi_token_pred_lambda", "moe_use_aux_free", "moe_capacity", "moe_gate",
    "use_rmsnorm", "tokenizer_class", "_name_or_path", "return_dict", "output_attentions",
    "output_hidden_states", "use_moe", "num_max_dispatch_tokens_per_rank"})
_MAPPED_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "tie_word_embeddings", "use_bias", "rope_theta", "rope_parameters", "rope_scaling",
    "moe_intermediate_size", "moe_k", "moe_num_experts", "moe_num_shared_experts",
    "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_gate_act",
    "quantization_config"})
_SKIPPED_PREFIXES = ("mtp_", "model.mtp_")  # MTP tensors: not imported (module docstring).
_MAX_LISTED = 5


class HFCheckpointError(ValueError):
  """An HF checkpoint, or a model to export as one, is not accepted (names file/field/tensor)."""


# --- config -------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """config.json of an HF checkpoint directory, as a dict."""
  if not os.path.isdir(hf_dir):
    raise HFCheckpointError(f"--hf_checkpoint={hf_dir!r} is not accepted: expected a directory "
                            f"holding {HF_CONFIG} and *.safetensors (an HF checkpoint)")
  path = os.path.join(hf_dir, HF_CONFIG)
  if not os.path.isfile(path):
    raise HFCheckpointError(f"{path} does not exist: expected the HF checkpoint's {HF_CONFIG}")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise HFCheckpointError(f"{path} is not accepted: not JSON ({e})") from e


def _hf_get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
  value = hf.get(key, default)
  if value is None and default is None:
    raise HFCheckpointError(f"{HF_CONFIG} has no {key!r}: expected an ERNIE 4.5 text config")
  return value


def model_config(hf: dict[str, Any], *, param_dtype: str = "float32"
                 ) -> ml_collections.ConfigDict:
  """The experiment config (default_config + the model's fields) of an ERNIE 4.5 config.json."""
  kind = hf.get("model_type")
  if kind == "ernie4_5_moe_vl" or kind == "ernie4_5_vl_moe" or "vision_config" in hf:
    raise HFCheckpointError(
        f"{HF_CONFIG} model_type={kind!r} is not accepted: the VL model's modality-isolated "
        "experts and vision tower have no counterpart here; expected 'ernie4_5' or "
        "'ernie4_5_moe' (the text models)")
  if kind not in ARCHITECTURES:
    raise HFCheckpointError(f"{HF_CONFIG} model_type={kind!r} is not accepted: expected one "
                            f"of {tuple(ARCHITECTURES)} (ERNIE 4.5 text models)")
  unknown = sorted(set(hf) - _IGNORED_KEYS - _MAPPED_KEYS)
  if unknown:
    raise HFCheckpointError(f"{HF_CONFIG} keys {unknown} are not accepted: unknown to the "
                            "ERNIE 4.5 import (ernie5_jax/interop/ernie45.py)")
  if hf.get("hidden_act", "silu") != "silu":
    raise HFCheckpointError(f"{HF_CONFIG} hidden_act={hf['hidden_act']!r} is not accepted: "
                            "expected 'silu' (SwiGLU)")
  if hf.get("use_bias"):
    raise HFCheckpointError(f"{HF_CONFIG} use_bias=True is not accepted: linear biases are "
                            "not supported (every released ERNIE 4.5 text model has none)")
  if hf.get("quantization_config"):
    raise HFCheckpointError(f"{HF_CONFIG} quantization_config is not accepted: quantized "
                            "checkpoints are not supported (expected bf16 / f32 weights)")
  if hf.get("moe_gate_act") not in (None, "softmax"):
    raise HFCheckpointError(f"{HF_CONFIG} moe_gate_act={hf['moe_gate_act']!r} is not "
                            "accepted: expected 'softmax' (or absent)")
  lists = sorted(k for k in ("moe_num_experts", "moe_intermediate_size", "moe_k")
                 if isinstance(hf.get(k), (list, tuple)))
  if lists:
    raise HFCheckpointError(f"{HF_CONFIG} {lists} as per-modality lists are not accepted: "
                            "that is the VL model's layout (expected ints)")
  rope = dict(hf.get("rope_parameters") or {})
  if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
    raise HFCheckpointError(f"{HF_CONFIG} rope scaling {hf.get('rope_scaling') or rope} is "
                            "not accepted: expected plain RoPE (rope_type 'default')")
  theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
  layers, d = _hf_get(hf, "num_hidden_layers"), _hf_get(hf, "hidden_size")
  heads = _hf_get(hf, "num_attention_heads")
  head_dim = hf.get("head_dim") or d // heads
  moe = kind == "ernie4_5_moe"
  num_dense = _dense_prefix(hf, layers) if moe else layers
  config = config_lib.default_config()
  config.model.update(
      vocab_size=_hf_get(hf, "vocab_size"), d_model=d, num_layers=layers, num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
      rope_theta=float(theta), rope_sections=(head_dim // 2, 0, 0), num_dense_layers=num_dense,
      dense_hidden=_hf_get(hf, "intermediate_size"),
      num_experts=_hf_get(hf, "moe_num_experts") if moe else 1,
      num_shared_experts=(hf.get("moe_num_shared_experts") or 0) if moe else 0,
      expert_hidden=_hf_get(hf, "moe_intermediate_size") if moe else 1,
      top_k=_hf_get(hf, "moe_k") if moe else 1, router_score="softmax",
      norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), embed_scale=False,
      dtype=param_dtype, param_dtype=param_dtype, router_param_dtype="float32",
      audio_levels=1)
  config.objective.update(mtp_depth=0, audio_level_weights=())
  config.data.num_modalities = 1  # Text only (the synthetic source's count).
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise HFCheckpointError(f"{HF_CONFIG} maps to an invalid model config: {e}") from e
  return config


def _dense_prefix(hf: dict[str, Any], layers: int) -> int:
  """Layers before the first MoE layer; raises unless MoE layers are start..last, interval 1."""
  start = hf.get("moe_layer_start_index")  # transformers' defaults for absent / null keys.
  start = 1 if start is None else start
  end = hf.get("moe_layer_end_index")
  end = layers - 1 if end in (None, -1) else end
  interval = hf.get("moe_layer_interval") or 1
  if isinstance(start, (list, tuple)) or isinstance(end, (list, tuple)):
    raise HFCheckpointError(f"{HF_CONFIG} moe_layer_start_index={start!r} / "
                            f"moe_layer_end_index={end!r} is not accepted: per-modality "
                            "lists are the VL model's (expected ints)")
  if interval != 1 or end != layers - 1 or not 0 <= start <= layers:
    raise HFCheckpointError(
        f"{HF_CONFIG} MoE layer pattern (moe_layer_start_index={start}, moe_layer_end_index="
        f"{end}, moe_layer_interval={interval}) is not accepted: expected dense layers first, "
        f"then MoE layers start..{layers - 1} (interval 1), the layout of model.num_dense_layers")
  return start


def hf_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The ERNIE 4.5 config.json of a model config (raises if it has no ERNIE 4.5 form)."""
  m = config.model
  problems = []
  if m.embed_scale:
    problems.append("model.embed_scale=True (ERNIE 4.5 has no sqrt(d_model) multiplier)")
  if m.audio_levels > 1:
    problems.append(f"model.audio_levels={m.audio_levels} (audio heads have no HF form)")
  if config.objective.mtp_depth:
    problems.append(f"objective.mtp_depth={config.objective.mtp_depth} (this model's MTP "
                    "modules differ from ERNIE 4.5's)")
  if m.num_dense_layers < m.num_layers and m.router_score != "softmax":
    problems.append(f"model.router_score={m.router_score!r} (ERNIE 4.5 routes by softmax)")
  if problems:
    raise HFCheckpointError("the model is not accepted for --format=hf: " + "; ".join(problems))
  moe = m.num_dense_layers < m.num_layers
  out = {"architectures": [ARCHITECTURES["ernie4_5_moe" if moe else "ernie4_5"]],
         "model_type": "ernie4_5_moe" if moe else "ernie4_5",
         "vocab_size": m.vocab_size, "hidden_size": m.d_model,
         "intermediate_size": m.dense_hidden, "num_hidden_layers": m.num_layers,
         "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
         "head_dim": m.head_dim, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
         "tie_word_embeddings": bool(m.tie_embeddings), "use_bias": False,
         "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
         "dtype": m.param_dtype}
  if moe:
    out.update(moe_intermediate_size=m.expert_hidden, moe_k=m.top_k,
               moe_num_experts=m.num_experts, moe_num_shared_experts=m.num_shared_experts,
               moe_layer_start_index=m.num_dense_layers, moe_layer_end_index=m.num_layers - 1,
               moe_layer_interval=1)
  return out


# --- the tensor table ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor <-> the item `index` (layer, expert) of one variable of the Decoder."""
  hf_name: str
  path: tuple[Any, ...]  # nnx flat-state path of the variable
  index: tuple[int, ...]  # leading indices of the item inside the variable
  kind: str  # the layout change (to_ours / to_hf)
  fp32: bool = False  # Kept in float32 in HF checkpoints (router gate and bias).
  optional: bool = False  # May be absent (moe_use_aux_free false): imported as zeros.


def rope_permutation(head_dim: int) -> np.ndarray:
  """Column order [0, 2, ..., 1, 3, ...]: interleaved RoPE pairs -> rotate-half pairs."""
  return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def to_ours(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """An HF tensor as the item of `shape` of our variable (Entry.kind says how)."""
  if kind == "copy":
    return x
  if kind == "linear":  # HF [out, in] -> [in, out]
    return x.T
  if kind in ("heads", "heads_rope"):  # [heads * head_dim, embed] -> [embed, heads, head_dim]
    y = x.T.reshape(shape)
    return y[..., rope_permutation(shape[-1])] if kind == "heads_rope" else y
  if kind == "out":  # [embed, heads * head_dim] -> [heads, head_dim, embed]
    return x.T.reshape(shape)
  if kind == "bias_row":  # [1, experts] -> [experts]
    return x.reshape(shape)
  raise ValueError(f"kind={kind!r} is not accepted")


def to_hf(kind: str, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of to_ours: our item as the HF tensor of `shape`."""
  if kind == "copy":
    return y
  if kind == "linear":
    return y.T
  if kind in ("heads", "heads_rope"):
    if kind == "heads_rope":
      y = y[..., np.argsort(rope_permutation(y.shape[-1]))]
    return y.reshape(y.shape[0], -1).T
  if kind == "out":
    return y.reshape(-1, y.shape[-1]).T
  if kind == "bias_row":
    return y.reshape(shape)
  raise ValueError(f"kind={kind!r} is not accepted")


def tensor_table(config: ml_collections.ConfigDict) -> list[Entry]:
  """Every HF tensor of config's model with the variable item it maps to, in HF order."""
  m = config.model
  scanned = bool(m.scan_layers)
  entries = [Entry("model.embed_tokens.weight", ("embed", "table"), (), "copy")]

  def layer(i: int, rest: tuple[str, ...], index: tuple[int, ...] = ()) -> tuple[Any, ...]:
    stack, j = ("dense_layers", i) if i < m.num_dense_layers else (
        "moe_layers", i - m.num_dense_layers)
    if scanned:
      return (stack, "layers") + rest, (j,) + index
    return (stack, "layers", j) + rest, index

  for i in range(m.num_layers):
    pre = f"model.layers.{i}."
    add = lambda name, rest, kind, index=(), fp32=False, optional=False: entries.append(
        Entry(pre + name, *layer(i, rest, index), kind, fp32, optional))
    add("input_layernorm.weight", ("attn_norm", "scale"), "copy")
    add("self_attn.q_proj.weight", ("attn", "wq"), "heads_rope")
    add("self_attn.k_proj.weight", ("attn", "wk"), "heads_rope")
    add("self_attn.v_proj.weight", ("attn", "wv"), "heads")
    add("self_attn.o_proj.weight", ("attn", "wo"), "out")
    add("post_attention_layernorm.weight", ("ffn_norm", "scale"), "copy")
    if i < m.num_dense_layers:
      for w in ("gate", "up", "down"):
        add(f"mlp.{w}_proj.weight", ("ffn", f"w_{w}"), "linear")
      continue
    add("mlp.gate.weight", ("ffn", "router", "kernel"), "linear", fp32=True)
    add("mlp.moe_statics.e_score_correction_bias", ("ffn", "router", "bias"), "bias_row",
        fp32=True, optional=True)
    for e in range(m.num_experts):
      for w in ("gate", "up", "down"):
        add(f"mlp.experts.{e}.{w}_proj.weight", ("ffn", "experts", f"w_{w}"), "linear", (e,))
    if m.num_shared_experts:
      for w in ("gate", "up", "down"):
        add(f"mlp.shared_experts.{w}_proj.weight", ("ffn", "shared", f"w_{w}"), "linear")
  entries.append(Entry("model.norm.weight", ("final_norm", "scale"), (), "copy"))
  if not m.tie_embeddings:
    entries.append(Entry("lm_head.weight", ("head", "kernel"), (), "linear"))
  return entries


# --- import -------------------------------------------------------------------------------

def weight_files(hf_dir: str) -> list[str]:
  """The safetensors files of hf_dir (its index's shards, else every *.safetensors)."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(hf_dir, n))]
    if missing:
      raise HFCheckpointError(f"{index} names shards {missing} that are not in {hf_dir}")
    return [os.path.join(hf_dir, n) for n in names]
  files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
  if files:
    return [os.path.join(hf_dir, n) for n in files]
  pickles = sorted(n for n in os.listdir(hf_dir) if n.endswith(PICKLE_SUFFIXES))
  if pickles:
    raise HFCheckpointError(
        f"{os.path.join(hf_dir, pickles[0])} is not accepted: pickle-based weights are never "
        "loaded (unpickling runs code); expected *.safetensors (convert with "
        "transformers' save_pretrained(..., safe_serialization=True))")
  raise HFCheckpointError(f"{hf_dir} holds no *.safetensors: expected an HF checkpoint")


def tensor_headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
  """name -> (file, shape, safetensors dtype) from the files' headers (no tensor is read)."""
  out = {}
  for path in files:
    try:
      with safe_open(path, framework="numpy") as f:
        for name in f.keys():
          s = f.get_slice(name)
          out[name] = (path, tuple(s.get_shape()), s.get_dtype())
    except Exception as e:  # safetensors' own error type: a corrupt or truncated header.
      raise HFCheckpointError(f"{path} is not accepted: not a readable safetensors file "
                              f"({type(e).__name__}: {e})") from e
  return out


def check_tensors(config: ml_collections.ConfigDict, table: list[Entry],
                  headers: dict[str, tuple[str, tuple[int, ...], str]]) -> list[str]:
  """Raises HFCheckpointError on missing, extra or mis-shaped tensors; returns the skipped."""
  abstract = dict(nnx.to_flat_state(nnx.state(abstract_model(config))))
  wanted = {e.hf_name: e for e in table}
  # MTP tensors (module docstring) and a tied model's stored copy of the embedding.
  skipped = sorted(n for n in headers if n not in wanted and (
      n.startswith(_SKIPPED_PREFIXES) or (n == "lm_head.weight" and config.model.tie_embeddings)))
  problems = [f"{n}: missing" for n, e in wanted.items() if n not in headers and not e.optional]
  problems += [f"{n}: not expected (shape {headers[n][1]})" for n in sorted(headers)
               if n not in wanted and n not in skipped]
  for name, e in wanted.items():
    if name not in headers:
      continue
    item = abstract[e.path].shape[len(e.index):]
    expect = to_hf(e.kind, np.zeros(item, np.int8), headers[name][1]).shape
    if headers[name][1] != expect:
      problems.append(f"{name}: shape {headers[name][1]} != {expect} expected from "
                      f"{HF_CONFIG}")
  if problems:
    more = f" ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise HFCheckpointError(f"the checkpoint's tensors do not match its {HF_CONFIG} "
                            f"({len(problems)} problems; nothing was written): "
                            + "; ".join(problems[:_MAX_LISTED]) + more)
  return skipped


def load_state(config: ml_collections.ConfigDict, table: list[Entry],
               headers: dict[str, tuple[str, tuple[int, ...], str]],
               layout: sharding.Layout | None = None) -> nnx.State:
  """The Decoder state of config read from the checkpoint, each array placed in its sharding.

  Every device shard is built by a callback that reads only the HF tensors of its items
  (lazily, one at a time) and casts them to the variable's dtype.
  """
  layout = layout or sharding.make_layout(config)
  abstract = nnx.state(abstract_model(config))
  shardings = dict(nnx.to_flat_state(sharding.tree_shardings(abstract, layout)))
  by_path: dict[tuple, dict[tuple[int, ...], Entry]] = {}
  for e in table:
    by_path.setdefault(e.path, {})[e.index] = e
  leaves = []
  with contextlib.ExitStack() as stack:
    handles = {}

    def read(name: str) -> np.ndarray:
      path = headers[name][0]
      if path not in handles:
        handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
      return handles[path].get_tensor(name)

    for path, var in nnx.to_flat_state(abstract):
      target = shardings[path].get_value()
      dtype = np.dtype(var.dtype)
      items = by_path.get(path)
      if items is None:  # Not in HF checkpoints (the loss EMA): its initial zeros.
        array = jax.device_put(np.zeros(var.shape, dtype), target)
      else:
        lead = len(next(iter(items)))
        item_shape = tuple(var.shape[lead:])

        def shard(index, items=items, lead=lead, item_shape=item_shape, var=var, dtype=dtype):
          ranges = [range(*s.indices(n)) for s, n in zip(index[:lead], var.shape[:lead])]
          out = None
          for pos in itertools.product(*ranges):
            e = items[pos]
            if e.hf_name in headers:
              x = to_ours(e.kind, read(e.hf_name), item_shape)[tuple(index[lead:])]
            else:  # An optional tensor the checkpoint lacks (check_tensors): zeros.
              x = np.zeros(item_shape, dtype)[tuple(index[lead:])]
            if out is None:
              out = np.empty(tuple(len(r) for r in ranges) + x.shape, dtype)
            out[tuple(p - r.start for p, r in zip(pos, ranges))] = x.astype(dtype)
          return out

        array = jax.make_array_from_callback(var.shape, target, shard)
      leaves.append((path, var.replace(array)))
  return nnx.from_flat_state(leaves)


def checkpoint_dtype(headers: dict[str, tuple[str, tuple[int, ...], str]]) -> str:
  """"bfloat16" or "float32": the dtype of the token embedding (float16 widens to float32)."""
  dtype = headers.get("model.embed_tokens.weight", (None, None, "F32"))[2]
  return "bfloat16" if dtype == "BF16" else "float32"


def import_checkpoint(hf_dir: str, out_dir: str, *, param_dtype: str | None = None,
                      calibration_text: str | None = None) -> str:
  """Imports an ERNIE 4.5 HF checkpoint into out_dir (model/ + config.json); returns out_dir.

  param_dtype: the stored parameters' dtype (default: the checkpoint's, bf16 stays bf16).
  calibration_text: a text file; its tokens (the checkpoint's tokenizer.model) measure each
    MoE layer's expert loads and the experts are stored most-loaded first
    (elastic_export.permute_experts: router, bias and expert weights together).
  Everything is checked (config keys, tensor names and shapes) before anything is written.
  """
  start = time.perf_counter()
  if os.path.exists(os.path.join(out_dir, store.MODEL_ITEM)):
    raise FileExistsError(f"--workdir={out_dir!r} already holds a {store.MODEL_ITEM}/: expected "
                          "a new or empty directory")
  hf = read_hf_config(hf_dir)
  files = weight_files(hf_dir)
  headers = tensor_headers(files)
  if param_dtype is not None and param_dtype not in config_lib.DTYPES:
    raise HFCheckpointError(f"param_dtype={param_dtype!r} is not accepted: expected one of "
                            f"{config_lib.DTYPES}")
  config = model_config(hf, param_dtype=param_dtype or checkpoint_dtype(headers))
  table = tensor_table(config)
  skipped = check_tensors(config, table, headers)
  zeros = [e.hf_name for e in table if e.hf_name not in headers]  # Optional, absent.
  tokens = None
  if calibration_text is not None:
    tokens = calibration_tokens(calibration_text, os.path.join(hf_dir, TOKENIZER))
  state = load_state(config, table, headers)
  order = None
  if tokens is not None and config.model.num_dense_layers < config.model.num_layers:
    rows, seq = tokens.shape  # Text: positions t = h = w, one segment per row.
    batch = {"tokens": jnp.asarray(tokens), "positions": rope.text_positions(rows, seq),
             "segment_ids": jnp.ones((rows, seq), jnp.int32),
             "group_ids": jnp.zeros((rows, seq), jnp.int32)}
    model = nnx.merge(nnx.graphdef(abstract_model(config)), state)
    order = np.asarray(elastic_export.expert_order(elastic_export.measure_load(model, [batch])))
    state = elastic_export.permute_experts(config, state, order)
  store.ensure_writable(out_dir)
  tokenizer = os.path.join(hf_dir, TOKENIZER)
  if os.path.isfile(tokenizer):  # The text sources' vocabulary (config.data.text_model).
    config.data.text_model = os.path.join(os.path.abspath(out_dir), TOKENIZER)
    shutil.copyfile(tokenizer, config.data.text_model)
  store.save_model(out_dir, config, state)
  report = {"source": os.path.abspath(hf_dir), "model_type": hf["model_type"],
            "files": [os.path.basename(f) for f in files], "tensors": len(table),
            "skipped_tensors": skipped, "zero_tensors": zeros,
            "param_dtype": config.model.param_dtype,
            "expert_order": None if order is None else order.tolist(),
            "seconds": round(time.perf_counter() - start, 3)}
  with open(os.path.join(out_dir, IMPORT_REPORT), "w") as f:
    json.dump(report, f, indent=2)
  logging.info("Imported %s (%d tensors) into %s.", hf_dir, len(table), out_dir)
  return out_dir


# --- expert order (elastic_export.permute_experts) ---------------------------------------

def calibration_tokens(text_path: str, tokenizer: str, *, rows: int = 8,
                       seq_len: int = 128) -> np.ndarray:
  """Token ids [rows, seq_len] of a text file's lines, encoded and concatenated (wrapping)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(tokenizer):
    raise HFCheckpointError(f"expert reordering needs the checkpoint's {TOKENIZER} to encode "
                            f"{text_path!r}; {tokenizer} does not exist")
  if not os.path.isfile(text_path):
    raise HFCheckpointError(f"--calibration_text={text_path!r} is not accepted: expected a "
                            "text file")
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  with open(text_path) as f:
    ids = [i for line in f for i in sp.encode(line.strip()) if line.strip()]
  if not ids:
    raise HFCheckpointError(f"--calibration_text={text_path!r} holds no text")
  return np.resize(np.asarray(ids, np.int32), (rows, seq_len))


# --- export -------------------------------------------------------------------------------

def export_hf(config: ml_collections.ConfigDict, model_state: nnx.State, out_dir: str, *,
              max_shard_bytes: int = 4 << 30, tokenizer: str | None = None) -> str:
  """Writes model_state (of config's Decoder) as an ERNIE 4.5 HF checkpoint; returns out_dir.

  out_dir gets config.json and model.safetensors (or model-0000i-of-0000n.safetensors +
  model.safetensors.index.json past max_shard_bytes), plus `tokenizer` if given. The router
  gate and bias are float32, the rest model.param_dtype, as transformers keeps them.
  """
  hf = hf_config(config)
  if os.path.exists(os.path.join(out_dir, HF_CONFIG)):
    raise FileExistsError(f"--workdir={out_dir!r} already holds a {HF_CONFIG}: expected a new "
                          "or empty directory")
  store.ensure_writable(out_dir)
  flat = dict(nnx.to_flat_state(model_state))
  dtype = np.dtype(config.model.param_dtype)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for e in tensor_table(config):
    if e.path not in flat:
      raise HFCheckpointError(f"model state has no variable {'/'.join(map(str, e.path))}: "
                              "expected the state of config's Decoder")
    value = flat[e.path]
    value = value.get_value() if isinstance(value, nnx.Variable) else value
    item = np.asarray(jax.device_get(value[e.index] if e.index else value))  # One item.
    shape = (1, item.shape[-1]) if e.kind == "bias_row" else None
    x = np.ascontiguousarray(to_hf(e.kind, item, shape).astype(
        np.float32 if e.fp32 else dtype))
    if size and size + x.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][e.hf_name] = x
    size += x.nbytes
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, tensors in zip(names, shards):
    save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
  if len(shards) > 1:
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": sum(x.nbytes for s in shards for x in s.values())},
                 "weight_map": {n: name for name, s in zip(names, shards) for n in s}}, f,
                indent=2)
  with open(os.path.join(out_dir, HF_CONFIG), "w") as f:
    json.dump(hf, f, indent=2)
  if tokenizer and os.path.isfile(tokenizer):
    shutil.copyfile(tokenizer, os.path.join(out_dir, TOKENIZER))
  return out_dir


def export_checkpoint(path: str, out_dir: str, *, sub: elastic.SubModel | None = None) -> str:
  """The model at `path` (anything store.restore_model takes), or its elastic sub-model `sub`,
  written by export_hf to out_dir with its tokenizer (config.data.text_model) if it has one."""
  location = store.locate(path)
  config, model = store.restore_model(location)
  hf_config(config)  # An unexportable model fails before anything is computed.
  state = nnx.state(model)
  if sub is not None:
    config, state = elastic_export.export_submodel(config, state, sub)
  return export_hf(config, state, out_dir, tokenizer=config.data.get("text_model") or None)
