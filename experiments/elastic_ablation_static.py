"""Static (non-elastic) arm of the elastic ablation: see experiments/elastic_ablation.py."""

import os
import runpy

_ELASTIC = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "elastic_ablation.py"))


def get_config(arg: str = "digits_multimodal"):
  """Returns the elastic arm's config with elastic training off (same data, steps, budget)."""
  config = _ELASTIC["get_config"](arg)
  config.elastic.enabled = False
  return config
