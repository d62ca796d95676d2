"""PNG plots of a results file: one figure per (mode, dtype) with three panels, one line or bar per impl.

Left: ``effective_gbps`` (the floor's bytes over each implementation's median time) against V at fixed N;
middle: the same against N at fixed V; right: extra peak memory at that (N, V). Effective rather than achieved
GB/s (``gbps``, each implementation's own modelled bytes) so that higher is faster on every line: an
implementation that moves 6x the bytes can show a high ``gbps`` and still be slow. The dashed line is the
floor measured in the same run (a sum for the forward, sum + copy for forward + backward): the ceiling.
N and V are held at ``shapes.PLOT_N`` / ``PLOT_V`` when the rows have them, else at the largest present.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.providers import NAMES
from benchmarks.shapes import PLOT_N, PLOT_V


def _fixed(rows: list[dict], key: str, preferred: int) -> int:
    values = {r[key] for r in rows}
    return preferred if preferred in values else max(values)


def _floor_gbps(row: dict) -> float:
    return row["floor_bytes"] / row["floor_ms"] / 1e6


def _line_panel(ax, rows: list[dict], axis: str, fixed_key: str, fixed: int) -> None:
    rows = sorted((r for r in rows if r[fixed_key] == fixed), key=lambda r: r[axis])
    for impl in (n for n in NAMES if any(r["impl"] == n for r in rows)):
        points = [(r[axis], r["effective_gbps"]) for r in rows if r["impl"] == impl]
        ax.plot(*zip(*points, strict=True), marker="o", label=impl)
    floor = sorted({(r[axis], _floor_gbps(r)) for r in rows})
    ax.plot(*zip(*floor, strict=True), "k--", label="floor (measured)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(axis)
    ax.set_ylabel("effective GB/s (floor bytes / time)")
    ax.set_title(f"GB/s vs {axis} ({fixed_key} = {fixed})")
    ax.grid(alpha=0.3)


def _memory_panel(ax, rows: list[dict], N: int, V: int) -> None:
    bars = [(r["impl"], r["peak_extra_mb"]) for r in rows if r["N"] == N and r["V"] == V]
    bars = [(impl, mb) for impl, mb in bars if mb is not None]
    ax.set_title(f"extra peak memory (N = {N}, V = {V})")
    if not bars:
        ax.text(0.5, 0.5, "not measured on this device\n(no CPU allocator statistics)", ha="center", va="center")
        ax.set_axis_off()
        return
    bars.sort(key=lambda b: NAMES.index(b[0]))
    ax.bar([b[0] for b in bars], [b[1] for b in bars])
    ax.set_ylabel("MB")
    ax.tick_params(axis="x", rotation=45)


def plot_all(rows: list[dict], out: Path, slug: str) -> str:
    """Write ``<out>/<slug>-<mode>-<dtype>.png`` for every (mode, dtype) with timed rows; returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in rows if r.get("status") == "ok"]
    written = []
    for mode, dtype in sorted({(r["mode"], r["dtype"]) for r in ok}):
        group = [r for r in ok if r["mode"] == mode and r["dtype"] == dtype]
        N, V = _fixed(group, "N", PLOT_N), _fixed(group, "V", PLOT_V)
        fig, (ax_v, ax_n, ax_mem) = plt.subplots(1, 3, figsize=(18, 5))
        _line_panel(ax_v, group, "V", "N", N)
        _line_panel(ax_n, group, "N", "V", V)
        _memory_panel(ax_mem, group, N, V)
        ax_v.legend(fontsize="small")
        fig.suptitle(f"{group[0]['device']}: {mode}, {dtype}")
        fig.tight_layout()
        path = out / f"{slug}-{mode}-{dtype}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return "plots: " + ", ".join(str(p) for p in written) if written else "plots: no timed rows to plot"


def main(argv=None) -> int:
    """``python -m benchmarks.plots RESULTS.json ...``: draw the plots of results files written elsewhere (a GPU
    session's sweep is run with ``--no-plots``; its JSON is plotted where it is committed)."""
    import json
    import sys

    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m benchmarks.plots RESULTS.json ...")
        return 2
    for path in paths:
        rows = json.loads(path.read_text())["rows"]
        if any("effective_gbps" not in r or "mode" not in r for r in rows if r.get("status") == "ok"):
            print(f"{path}: not a logits-sweep file (python -m benchmarks.run); the tuning and fused-linear sweeps' "
                  "files are tables, with no plots")  # fmt: skip
            return 2
        print(plot_all(rows, path.parent, path.stem))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
