"""``aiokvm bench compare A.json B.json``: two runs of one benchmark, row by row.

In the spirit of Firecracker's A/B tool: the rows of both runs are matched
by what they measured (path, size, CPL, ...), and each shows A's figure,
B's, and B/A; the last column says whether B is better, counting "lower is
better" figures (µs per exit, boot ms) the right way round.  Rows only one
run has are listed apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

#: benchmark -> (fields that name a row, the figure, True if higher is better)
FIGURES = {
    "exits": (("label", "loop", "cpl", "vcpus"), "us_per_exit", False),
    "disk": (("key",), "mb_s", True),
    "net": (("path", "size"), "frames_per_s", True),
    "boot": (("path",), "median_ms", False),
    "bridge": (("ports", "path"), "decisions_per_s", True),
    "demo": (("section", "path"), "value", None),  # a demo row says which way is better itself
}


def load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (write one with --json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a benchmark's JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("benchmark") not in FIGURES or not isinstance(data.get("rows"), list):
        raise ConfigError(f"{path}: not the JSON of an aiokvm benchmark (no known \"benchmark\" and \"rows\")")
    return data


def compare(a: dict, b: dict) -> list[dict]:
    if a["benchmark"] != b["benchmark"]:
        raise ConfigError(f"cannot compare a {a['benchmark']} run with a {b['benchmark']} run")
    keys, figure, higher_better = FIGURES[a["benchmark"]]

    def index(data: dict) -> dict:
        return {tuple(row.get(k) for k in keys): row for row in data["rows"]}

    rows_a, rows_b = index(a), index(b)
    out = []
    for key in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        ra, rb = rows_a.get(key), rows_b.get(key)
        va = ra.get(figure) if ra else None
        vb = rb.get(figure) if rb else None
        better = higher_better if higher_better is not None else (ra or rb or {}).get("higher_is_better", True)
        ratio = vb / va if va and vb is not None else None
        verdict = None
        if ratio is not None:
            verdict = "same" if abs(ratio - 1) < 0.02 else ("better" if (ratio > 1) == better else "worse")
        out.append({"row": " ".join(str(k) for k in key if k not in (None, "-")), "a": va, "b": vb,
                    "b_over_a": ratio, "verdict": verdict, "figure": figure})
    return out


def print_comparison(path_a: str, path_b: str) -> int:
    from rich.console import Console
    from rich.table import Table

    a, b = load(path_a), load(path_b)
    rows = compare(a, b)
    figure = rows[0]["figure"] if rows else "figure"
    table = Table(title=f"{a['benchmark']}: B = {path_b} against A = {path_a} ({figure})")
    for name, justify in (("row", "left"), ("A", "right"), ("B", "right"), ("B/A", "right"), ("", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        fmt = lambda v: "-" if v is None else f"{v:,.4g}"  # noqa: E731
        table.add_row(row["row"], fmt(row["a"]), fmt(row["b"]),
                      "-" if row["b_over_a"] is None else f"{row['b_over_a']:.3f}", row["verdict"] or "only one run")
    Console().print(table)
    return 0
