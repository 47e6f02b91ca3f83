"""ernie5_jax/aot/hlo.py: per-step collective and kernel counts from HLO text."""

import pytest

from ernie5_jax.aot import hlo

# A scanned stack: the all-gather and the Mosaic kernel run in a while body of 6 trips;
# one all-reduce outside (async start/done pair counted once).
HLO = """HloModule jit_train_step, entry_computation_layout={()->f32[]}

%body.1 (p: (s32[], bf16[4,128])) -> (s32[], bf16[4,128]) {
  %p = (s32[], bf16[4,128]{1,0}) parameter(0)
  %all-gather-start.2 = (bf16[2,128]{1,0}, bf16[4,128]{1,0}) all-gather-start(bf16[2,128]{1,0} %x), dimensions={0}
  %all-gather-done.2 = bf16[4,128]{1,0} all-gather-done(%all-gather-start.2)
  %custom-call.3 = bf16[4,128]{1,0} custom-call(%all-gather-done.2), custom_call_target="tpu_custom_call", backend_config="{}"
  ROOT %t = (s32[], bf16[4,128]{1,0}) tuple(%i, %custom-call.3)
}

%cond.1 (p: (s32[], bf16[4,128])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main.9 () -> f32[] {
  %while.4 = (s32[], bf16[4,128]{1,0}) while(%init), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"6"}}
  %all-reduce-start.5 = f32[256]{0} all-reduce-start(f32[256]{0} %g), to_apply=%add
  %all-reduce-done.5 = f32[256]{0} all-reduce-done(%all-reduce-start.5)
  ROOT %r = f32[] constant(0)
}
"""


def test_counts_are_weighted_by_trip_counts():
  s = hlo.summarize(HLO)
  assert s.collectives["all-gather"] == {"count": 6, "bytes": 6 * 4 * 128 * 2}
  assert s.collectives["all-reduce"] == {"count": 1, "bytes": 256 * 4}
  assert (s.mosaic_kernels, s.mosaic_calls) == (1, 6)


def test_text_without_entry_is_rejected():
  with pytest.raises(ValueError, match="no ENTRY computation"):
    hlo.summarize("HloModule m\n")


def test_trip_count_read_off_the_loop_condition():
  # Compiled TPU HLO carries no known_trip_count: the bound is the condition's constant.
  text = HLO.replace(', backend_config={"known_trip_count":{"n":"6"}}', "").replace(
      "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
      "  %n = s32[]{:T(128)} constant(3)\n  ROOT %lt = pred[] compare(%i, %n), direction=LT")
  s = hlo.summarize(text)
  assert s.collectives["all-gather"]["count"] == 3 and s.mosaic_calls == 3
