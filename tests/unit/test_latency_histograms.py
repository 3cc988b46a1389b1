"""The C loop's latency histograms use hdrhistogram's own bucket layout."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aiokvm.kvm import ffi, lib
from aiokvm.metrics import HIST_MAX_NS, LATENCIES, LatencyHistograms


def _bound():
    ctx = ffi.new("struct aiokvm_vcpu *")
    return ctx, LatencyHistograms(ctx)


CTX, HISTOGRAMS = _bound()
LAYOUT = HISTOGRAMS._new_histogram()


@given(st.integers(min_value=0, max_value=HIST_MAX_NS))
def test_c_bucket_index_is_hdrhistograms(value):
    index = lib.aiokvm_hist_index(ffi.addressof(CTX.hist[0]), value)
    assert index == LAYOUT._counts_index_for(value)
    # ...and the bucket's value is value to three significant figures
    assert LAYOUT.get_value_from_index(index) == LAYOUT.get_lowest_equivalent_value(value)


def test_recorded_values_come_back_as_percentiles_sums_and_maxima():
    ctx, hists = _bound()
    handler = ffi.addressof(ctx.hist[LATENCIES.index("handler")])
    values = [500 + 7 * i for i in range(1000)] + [2_000_000]
    for v in values:
        lib.aiokvm_hist_record(handler, v)
    summary = hists.summary()
    h = summary["handler"]
    assert h["count"] == len(values)
    assert h["max_us"] == 2000.0
    assert abs(h["mean_us"] - sum(values) / len(values) / 1000) < 1e-9
    assert abs(h["p50_us"] - (500 + 7 * 500) / 1000) < 0.01
    assert summary["exit_to_handler"] == {"count": 0}


def test_a_value_beyond_the_top_bucket_is_counted_not_lost():
    ctx, hists = _bound()
    handler = ffi.addressof(ctx.hist[1])
    lib.aiokvm_hist_record(handler, 1 << 62)
    assert ctx.hist[1].clamped == 1
    assert hists.summary()["handler"]["count"] == 1
