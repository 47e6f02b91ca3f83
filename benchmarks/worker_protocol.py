"""The line protocol of compare_frameworks.py's workers (stdlib only: the torch side imports it).

One command per stdin line, one JSON reply per stdout line:
  train N                  N train steps, seconds
  decode B NEW             one greedy generation of NEW tokens after B prompts, seconds
  matmul                   the framework's f32 [1024, 1024] matmul rate, FLOP/s
  logits PATH_IN PATH_OUT  float32 logits of PATH_IN's token ids written to PATH_OUT
  quit
"""

from __future__ import annotations

import json
import sys


def serve(worker, **info) -> None:
  """Announces readiness (with `info`), then answers commands until quit or end of input."""
  print(json.dumps({"ready": True, **info}), flush=True)
  for line in sys.stdin:
    cmd, *rest = line.split()
    if cmd == "quit":
      break
    if cmd == "train":
      reply = {"seconds": worker.train(int(rest[0]))}
    elif cmd == "decode":
      reply = {"seconds": worker.decode(int(rest[0]), int(rest[1]))}
    elif cmd == "matmul":
      reply = {"flops_per_sec": worker.matmul()}
    elif cmd == "logits":
      worker.logits(rest[0], rest[1])
      reply = {"ok": True}
    else:
      reply = {"error": f"unknown command {cmd!r}"}
    print(json.dumps(reply), flush=True)
