"""The figure each benchmark is about, as PNG or SVG (matplotlib, imported
only when a plot is asked for: ``aiokvm run`` never pays for it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def check_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in (".png", ".svg"):
        raise ConfigError(f"--plot {path}: give a .png or .svg file name")
    return out


def add_output_options(parser) -> None:
    """``--json FILE`` and ``--plot FILE.png|svg``, which every benchmark takes."""
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--plot", metavar="FILE.png|svg", help="draw this benchmark's figure")


def parse_with_outputs(parser, argv):
    """``parser.parse_args(argv)``, with a bad ``--plot`` name refused before anything is measured."""
    args = parser.parse_args(argv)
    if args.plot:
        check_path(args.plot)
    return args


def bars(path: str, labels: list[str], values: list[float], *, title: str, xlabel: str,
         note: str = "") -> None:
    """Horizontal bars, one per row, largest at the bottom."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.6))
    ax.barh(labels, values, color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:,.3g}", va="center", fontsize=8)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="#555555")
    fig.tight_layout()
    fig.savefig(check_path(path))
    plt.close(fig)


def stacked_split(path: str, labels: list[str], splits: list[dict], *, title: str) -> None:
    """One bar per path: the vCPU's guest/kernel/user/wait fractions."""
    plt = _pyplot()
    keys = ("guest", "kernel", "user", "wait")
    colors = ("#55a868", "#c44e52", "#dd8452", "#8c8c8c")
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.6))
    left = [0.0] * len(labels)
    for key, color in zip(keys, colors, strict=True):
        widths = [float((split or {}).get(key) or 0.0) for split in splits]
        ax.barh(labels, widths, left=left, color=color, label=key)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the vCPU thread's wall time")
    ax.set_title(title)
    ax.legend(ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8)
    fig.tight_layout()
    fig.savefig(check_path(path))
    plt.close(fig)


def by_benchmark(name: str, rows: list[dict], path: str) -> None:
    """The figure of benchmark ``name`` from its JSON rows."""
    if name == "exits":
        chosen = [r for r in rows if r.get("us_per_exit") is not None]
        bars(path, [f"{r['label']} ({r['loop']}, CPL {r['cpl']})" if r["loop"] != "-" else
                    f"{r['label']} (CPL {r['cpl']})" for r in chosen],
             [r["us_per_exit"] for r in chosen], title="Cost of one exit, by path", xlabel="µs per exit")
    elif name == "disk":
        chosen = [r for r in rows if r.get("mb_s")]
        bars(path, [r["key"] for r in chosen], [r["mb_s"] for r in chosen], title="Disk reads, by path",
             xlabel="MB/s")
    elif name == "net":
        chosen = [r for r in rows if r.get("frames_per_s")]
        bars(path, [f"{r['path']} {r['size']} B" for r in chosen], [r["frames_per_s"] for r in chosen],
             title="VM to VM, by path", xlabel="frames/s")
    elif name == "boot":
        chosen = [r for r in rows if r.get("median_ms")]
        bars(path, [r["path"] for r in chosen], [r["median_ms"] for r in chosen], title="Boot to exit of hello",
             xlabel="ms (median)")
    elif name == "bridge":
        bars(path, [f"{r['path']}, {r['ports']} ports" for r in rows], [r["decisions_per_s"] for r in rows],
             title="Bridge forwarding decisions, one core", xlabel="decisions/s")
    else:
        raise ConfigError(f"no figure for {name}")
