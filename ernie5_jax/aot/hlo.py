"""What a compiled program does per step, read off its HLO text: collectives and kernels.

Ops inside a while loop (the scanned layer stack) run once per iteration: every count
and byte figure here is weighted by the trip counts on the path from the entry
computation, so the figures are per step, not per HLO line. A trip count is XLA's
`known_trip_count` where the backend config carries it, else read off the loop condition
(`ROOT compare(i, constant(N)), direction=LT`, a scan's counter from 0), else 1.
A collective's bytes are its largest result buffer (the gathered, reduced or exchanged
array; async `-start` ops return (operand, result) tuples).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
MOSAIC_TARGET = "tpu_custom_call"  # A Mosaic (Pallas TPU) kernel in compiled TPU HLO.
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
          "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r"known_trip_count[^0-9]*(\d+)")
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\][^=]*constant\((\d+)\)")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass
class HloSummary:
  """Per-step counts of one compiled module (module doc)."""
  collectives: dict[str, dict[str, float]]  # kind -> {"count": n, "bytes": b}
  mosaic_kernels: int  # Mosaic custom calls in the HLO (each line once)
  mosaic_calls: int  # the same, per step (trip-count weighted)


def _array_bytes(type_text: str) -> int:
  """Largest array in an HLO result type, in bytes (0 for tokens and scalars of unknown type)."""
  sizes = [math.prod(int(d) for d in dims.split(",") if d) * _BYTES[dtype]
           for dtype, dims in _ARRAY.findall(type_text) if dtype in _BYTES]
  return max(sizes, default=0)


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """({computation name: its instruction lines}, the ENTRY computation's name or None)."""
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      bodies[current] = []
      if header.group(1):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def summarize(hlo_text: str) -> HloSummary:
  """Collectives by kind (count and bytes per step) and Mosaic kernels of a compiled module."""
  bodies, entry = computations(hlo_text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text: expected compiled.as_text()")

  def trip_count(line: str) -> int:
    known = _TRIP.search(line)
    if known:
      return int(known.group(1))
    condition = _CONDITION.search(line)
    lines = bodies.get(condition.group(1), []) if condition else []
    constants = dict(m.groups() for m in map(_CONSTANT.match, lines) if m)
    for cond_line in lines:
      if "ROOT" in cond_line and "compare(" in cond_line and "direction=LT" in cond_line:
        operands = re.findall(r"%([\w.\-]+)", cond_line.split("compare(", 1)[1].split(")")[0])
        bounds = [int(constants[o]) for o in operands if o in constants]
        if len(bounds) == 1:
          return bounds[0]
    return 1

  totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  mosaic = {"lines": 0, "calls": 0}
  static_seen: set[tuple[str, int]] = set()

  def visit(name: str, weight: int, depth: int = 0) -> None:
    if depth > 64 or name not in bodies:
      return
    for i, line in enumerate(bodies[name]):
      instr = _INSTR.match(line)
      if not instr:
        continue
      type_text, op = instr.group(1), instr.group(2)
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind in COLLECTIVES:
        totals[kind]["count"] += weight
        totals[kind]["bytes"] += weight * _array_bytes(type_text)
      if op == "custom-call" and MOSAIC_TARGET in line:
        mosaic["calls"] += weight
        if (name, i) not in static_seen:
          static_seen.add((name, i))
          mosaic["lines"] += 1
      inner = weight * trip_count(line) if op == "while" else weight
      callees = _CALLEE.findall(line)
      for group in _BRANCHES.findall(line):
        callees += [c.strip().lstrip("%") for c in group.split(",")]
      for callee in callees:
        visit(callee, inner, depth + 1)

  visit(entry, 1)
  return HloSummary(collectives=dict(totals), mosaic_kernels=mosaic["lines"],
                    mosaic_calls=mosaic["calls"])


def count_lowered_kernels(mlir_text: str) -> dict[str, int]:
  """Kernel custom calls in lowered StableHLO (each line once): {"triton": n, "mosaic": m}."""
  return {"triton": len(re.findall(r"__gpu\$xla\.gpu\.triton", mlir_text)),
          "mosaic": len(re.findall(MOSAIC_TARGET, mlir_text))}


def count_lowered_collectives(mlir_text: str) -> dict[str, int]:
  """Collective ops in lowered StableHLO, each line once (no trip counts before compiling)."""
  counts = {}
  for kind in COLLECTIVES:
    op = kind.replace("-", "_")
    n = len(re.findall(rf"stablehlo\.{op}\b", mlir_text))
    if n:
      counts[kind] = n
  ragged = len(re.findall(r"custom_call @ragged_all_to_all", mlir_text))  # not a stablehlo op
  if ragged:
    counts["ragged-all-to-all"] = ragged
  return counts
