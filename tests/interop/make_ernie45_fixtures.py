"""Makes the tiny ERNIE 4.5 test checkpoints with `transformers`, and checks exports against it.

Runs in a side environment with torch (CI never installs it), outside the repository:

  python3 -m venv /tmp/side-venv
  /tmp/side-venv/bin/pip install torch transformers safetensors sentencepiece numpy
  /tmp/side-venv/bin/python tests/interop/make_ernie45_fixtures.py make [OUT_DIR]
  /tmp/side-venv/bin/python tests/interop/make_ernie45_fixtures.py check EXPORT_DIR REF.npz

`make` writes, under tests/interop/testdata/ (or OUT_DIR):
  ernie45_moe_tiny/    Ernie4_5_MoeForCausalLM (hidden 64, 3 layers: the first dense, then
                       MoE with 8 experts, top-2, 1 shared expert; vocab 256; tied
                       embeddings; a random e_score_correction_bias), save_pretrained as
                       safetensors, plus a SentencePiece tokenizer.model of 256 pieces;
  ernie45_dense_tiny/  Ernie4_5ForCausalLM (hidden 64, 2 layers, head_dim 32 != 64 / 4
                       heads, untied output head), save_pretrained as safetensors;
  ernie45_reference.npz  the token ids [2, 12] and each model's float32 logits (eager
                       attention), and the MoE model's chosen expert ids per MoE layer
                       [moe_layers, tokens, top_k] ("moe_expert_ids").
Weights are drawn from torch.manual_seed(0) with initializer_range 0.2, so that routing is
decided by the router and the bias, not by ties. Rerunning `make` (checked with
transformers 5.25.0, torch 2.13.0+cpu, sentencepiece 0.2.3) gives byte-identical weights,
configs and reference logits; tokenizer.model has the same pieces and scores and differs only
in the training-input path its trainer spec records when OUT_DIR differs.

`check EXPORT_DIR REF.npz` loads a directory written by `--mode=export --format=hf` with
transformers' AutoModelForCausalLM and compares its logits on REF.npz's "tokens" with
REF.npz's "logits" (what this codebase computed for the exported model); it prints the max
|difference| and exits 1 above 1e-4.
"""

import json
import os
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "testdata"
VOCAB = 256


def _tokenizer(path: pathlib.Path) -> None:
  """A 256-piece SentencePiece model trained on a few English sentences."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  text = path.parent / "corpus.txt"
  lines = [
      "the quick brown fox jumps over the lazy dog",
      "a tiny mixture of experts model reads text one token at a time",
      "experts are chosen by a router that scores every hidden state",
      "elastic training samples smaller sub models of the same weights",
      "import the weights then train them then export them back again",
  ] * 40
  text.write_text("\n".join(lines) + "\n")
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=VOCAB,
      model_type="bpe", character_coverage=1.0, pad_id=0, unk_id=3, bos_id=1, eos_id=2,
      hard_vocab_limit=True)
  text.unlink()
  path.with_suffix(".vocab").unlink()


def _logits(model, tokens):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens)).logits.float().numpy()


def make(out: pathlib.Path = OUT) -> None:
  """Writes the fixtures and the reference logits (module docstring) under `out`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(2, 12)).astype(np.int64)

  moe_cfg = transformers.Ernie4_5_MoeConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
      moe_k=2, moe_num_experts=8, moe_num_shared_experts=1, moe_layer_start_index=1,
      moe_layer_end_index=-1, moe_layer_interval=1, tie_word_embeddings=True,
      initializer_range=0.2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
      eos_token_id=2)
  moe = transformers.Ernie4_5_MoeForCausalLM(moe_cfg).eval()
  moe.config._attn_implementation = "eager"  # pylint: disable=protected-access
  with torch.no_grad():
    for layer in moe.model.layers[1:]:
      layer.mlp.gate.moe_statics.e_score_correction_bias.copy_(
          0.05 * torch.randn_like(layer.mlp.gate.moe_statics.e_score_correction_bias))
  routed = []
  hooks = [layer.mlp.gate.register_forward_hook(
      lambda _m, _i, out: routed.append(out[2].numpy().copy()))
           for layer in moe.model.layers[1:]]
  moe_logits = _logits(moe, tokens)
  for h in hooks:
    h.remove()
  moe_dir = out / "ernie45_moe_tiny"
  moe.save_pretrained(moe_dir, safe_serialization=True)
  _tokenizer(moe_dir / "tokenizer.model")

  dense_cfg = transformers.Ernie4_5Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
      initializer_range=0.2, max_position_embeddings=256)
  dense = transformers.Ernie4_5ForCausalLM(dense_cfg).eval()
  dense.config._attn_implementation = "eager"  # pylint: disable=protected-access
  dense_logits = _logits(dense, tokens)
  dense.save_pretrained(out / "ernie45_dense_tiny", safe_serialization=True)

  np.savez(out / "ernie45_reference.npz", tokens=tokens.astype(np.int32),
           moe_logits=moe_logits, dense_logits=dense_logits,
           moe_expert_ids=np.stack(routed).astype(np.int32))
  print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                    "files": sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                    if p.is_file())}, indent=1))


def check(export_dir: str, ref_path: str) -> int:
  """Loads export_dir with transformers; compares its logits with ref's (module docstring)."""
  import transformers  # pylint: disable=g-import-not-at-top
  ref = np.load(ref_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      export_dir, torch_dtype="float32", attn_implementation="eager").eval()
  logits = _logits(model, ref["tokens"].astype(np.int64))
  diff = float(np.max(np.abs(logits - ref["logits"])))
  print(json.dumps({"export": os.path.abspath(export_dir), "class": type(model).__name__,
                    "transformers": transformers.__version__, "max_abs_diff": diff}))
  return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
  if sys.argv[1:2] == ["make"] and len(sys.argv) <= 3:
    make(pathlib.Path(sys.argv[2]) if len(sys.argv) == 3 else OUT)
  elif sys.argv[1:2] == ["check"] and len(sys.argv) == 4:
    sys.exit(check(sys.argv[2], sys.argv[3]))
  else:
    sys.exit(__doc__)
