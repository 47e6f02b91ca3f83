"""The PyTorch side of benchmarks/compare_frameworks.py: `transformers`' ERNIE 4.5 MoE model.

Runs in a side environment with torch + transformers (never a CI dependency):

  python3 -m venv /tmp/side-venv
  /tmp/side-venv/bin/pip install torch transformers safetensors numpy

compare_frameworks.py starts it as a worker; it is not meant to be run by hand. It loads
the Hugging Face checkpoint the driver exported from the JAX model's initial weights
(interop/ernie45.py: the same function, checked on the driver's logits), then answers
the commands of benchmarks/worker_protocol.py (train: forward, backward, clip 1.0, AdamW;
decode: greedy `generate`; matmul: best of 10).

--mode=eager runs the model as is; --mode=compile wraps it in torch.compile (default
mode; the optimizer step stays eager). Decode uses generate's static KV cache.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch
import transformers

import worker_protocol  # benchmarks/ (this script's directory): the driver's line protocol

# The repository's host allocator setting (stdlib only): applied to both frameworks alike.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ernie5_jax import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position


def matmul_rate(n: int = 1024, iters: int = 10) -> float:
  """Best f32 [n, n] x [n, n] matmul rate over `iters` calls, FLOP/s."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


class Worker:
  """One model, its optimizer and the staged batches."""

  def __init__(self, hf_dir: str, batches: str, mode: str, lr: float):
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    self.model.config.output_router_logits = False  # no auxiliary loss: JAX's is off too
    self.tokens = torch.from_numpy(np.load(batches)["tokens"]).long()  # [n, batch, seq]
    self.prompts = torch.from_numpy(np.load(batches)["prompts"]).long()  # [rows, prompt_len]
    self.forward = torch.compile(self.model) if mode == "compile" else self.model
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95),
                                       eps=1e-8, weight_decay=0.1)
    self.step = 0

  def train(self, steps: int) -> float:
    """Seconds of `steps` optimizer steps on the staged batches (cycled)."""
    self.model.train()
    start = time.perf_counter()
    for _ in range(steps):
      ids = self.tokens[self.step % len(self.tokens)]
      self.step += 1
      loss = self.forward(input_ids=ids, labels=ids).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.optimizer.step()
      self.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start

  @torch.no_grad()
  def decode(self, rows: int, new_tokens: int) -> float:
    """Seconds of one greedy generate of new_tokens after the first `rows` prompts."""
    self.model.eval()
    ids = self.prompts[:rows]
    start = time.perf_counter()
    out = self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, cache_implementation="static",
                              pad_token_id=0)
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return seconds

  def matmul(self) -> float:
    """Best f32 [1024, 1024] matmul rate, FLOP/s."""
    return matmul_rate()

  @torch.no_grad()
  def logits(self, path_in: str, path_out: str) -> None:
    """Writes the float32 logits of PATH_IN's token ids to PATH_OUT."""
    self.model.eval()
    ids = torch.from_numpy(np.load(path_in)["tokens"]).long()
    np.savez(path_out, logits=self.model(input_ids=ids).logits.float().numpy())


def main() -> None:
  """Serves the driver's commands (module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hf_dir", required=True)
  parser.add_argument("--batches", required=True, help="npz with tokens [n, batch, seq], prompts")
  parser.add_argument("--mode", choices=("eager", "compile"), default="eager")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--lr", type=float, default=3e-4)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  worker = Worker(args.hf_dir, args.batches, args.mode, args.lr)
  info = {"torch": torch.__version__, "transformers": transformers.__version__,
          "threads": torch.get_num_threads(), **host_memory.info()}
  worker_protocol.serve(worker, **info)

if __name__ == "__main__":
  main()
