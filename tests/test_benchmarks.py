"""The benchmarks still run and still write what their readers expect.

They measure, they do not assert; these smoke runs use tiny sizes and check
the JSON's shape and the self-checks that hold on any host (aiokvm's C path
against itself in one guest run is ~1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.kvm
def test_exits_benchmark_writes_rows_with_paired_and_in_run_ratios(tmp_path):
    data = run("exits.py", "--n", "1000", "--repeat", "1", "--cpl", "0", "--only", "inline,unclaimed",
               tmp_path=tmp_path)
    rows = {r["path"]: r for r in data["rows"]}
    assert set(rows) == {"c", "unclaimed", "inline"}
    for row in rows.values():
        assert row["cpl"] == 0 and row["us_per_exit"] > 0 and row["ratio_to_c"] > 0
        assert row["statistic"] == "median-batch"
    assert rows["c"]["ratio_to_c"] == 1.0
    # Both of its ports are unclaimed: the in-run pair ratio is a self-check.
    assert 0.8 <= rows["unclaimed"]["ratio_in_run"] <= 1.25
    # Python costs something, and not an order of magnitude.
    assert 0.9 <= rows["inline"]["ratio_in_run"] <= 3.0
    assert rows["inline"]["delivered_writes"] == 1000
    bars = {b["bar"]: b for b in data["bars"]}
    assert bars["inline"]["target"] == 1.10
    assert bars["inline"]["met"] == (bars["inline"]["ratio_to_c"] <= 1.10)


def test_bridge_benchmark_writes_every_path_and_port_count(tmp_path):
    data = run("bridge.py", "--frames", "2000", "--repeat", "1", tmp_path=tmp_path)
    seen = {(r["ports"], r["path"]) for r in data["rows"]}
    assert seen == {(p, path) for p in (4, 16, 64) for path in ("dict", "known-unicast", "flood", "vlan-known")}
    assert all(r["decisions_per_s"] > 0 for r in data["rows"])
