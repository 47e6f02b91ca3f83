"""The elastic-vs-static comparison of two family reports (ernie5_jax/eval/ablation.py)."""

import json

import pytest

from ernie5_jax.eval import ablation


def _row(sub, full, losses, tokens):
  return {"submodel": dict(zip(("depth", "experts", "top_k"), sub)), "full": full,
          "total_params": 100, "active_params_per_token": 50, "loss": losses,
          "tokens": tokens, "decode_tokens_per_sec": 10.0}


def _report(full_losses, sub_losses):
  tokens = {"text": 30, "image": 10}
  return {"submodels": [_row((3, 8, 2), True, full_losses, tokens),
                        _row((2, 8, 2), False, sub_losses, tokens)]}


def test_compare_token_weighted_cost_and_wins(tmp_path):
  elastic = _report({"text": 2.02, "image": 4.0}, {"text": 2.5, "image": 4.2})
  static = _report({"text": 2.0, "image": 4.0}, {"text": 3.0, "image": 4.4})
  path = tmp_path / "family_report.json"
  path.write_text(json.dumps(elastic))
  result = ablation.compare(ablation.load_report(str(tmp_path)), static)
  # Token-weighted means: elastic (30*2.02 + 10*4) / 40 = 2.515, static 2.5.
  assert result["full_model_loss_cost"] == pytest.approx(0.015 / 2.5)
  assert result["submodels_beating_truncation"] == 1 and result["submodels"] == 1
  table = ablation.markdown(result)
  assert "| 3,8,2 (full) |" in table and "2.020 / 2.000" in table


def test_compare_rejects_different_families():
  elastic = _report({"text": 2.0}, {"text": 2.5})
  static = {"submodels": elastic["submodels"][:1]}
  with pytest.raises(ValueError, match=r"\(2, 8, 2\).*same config.elastic"):
    ablation.compare(elastic, static)


def test_load_report_missing(tmp_path):
  with pytest.raises(ValueError, match="--mode=eval"):
    ablation.load_report(str(tmp_path))
