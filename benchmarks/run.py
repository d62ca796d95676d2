"""Sweep the log-prob implementations over sizes; print a table; write JSON, CSV and PNG plots.

    python -m benchmarks.run --quick          # small sizes, any machine (CPU: eager and fastdpo's PyTorch path)
    python -m benchmarks.run                  # the full sweep of benchmarks/shapes.py, on a GPU

For each size the floor is measured first, on the same device (``timing.measure_floor``); then each available
implementation, in each mode, is checked against the float64 reference on a slice and, only if it passes,
timed and its peak memory taken. Rows go to ``<out>/<device-slug>.json`` and ``.csv`` after every size, merged
into what an earlier run left there (a row is replaced when impl, mode, N, V and dtype match), so a sweep
split over several commands builds one file. Columns are described in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

from benchmarks import plots, providers, shapes, timing
from benchmarks.traffic import MODES, bytes_moved

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROW_KEY = ("impl", "mode", "N", "V", "dtype")
TABLE_COLUMNS = ("impl", "mode", "N", "V", "dtype", "ms_p50", "gbps", "floor_fraction", "peak_extra_mb", "status")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes that a CPU sweeps in under a minute")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON, CSV and PNG files")
    p.add_argument("--impl", nargs="+", choices=providers.NAMES, help="implementations to run (default: all available)")
    p.add_argument("--N", nargs="+", type=int, help="scored tokens per call (default: the sweep's)")
    p.add_argument("--V", nargs="+", type=int, help="vocabulary sizes (default: the sweep's)")
    p.add_argument("--dtype", nargs="+", choices=list(shapes.DTYPES), help="logits dtypes (default: the sweep's)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--fresh", action="store_true", help="replace the results file instead of merging into it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--budget-s", type=float, help="start no new size after this many seconds (a GPU lease is short): "
                   "sizes run in shapes.priority order, the headline size (N 8192, V 128256, bf16) first")  # fmt: skip
    return p.parse_args(argv)


def within_budget(sizes: list, budget_s: float | None):
    """``sizes`` one by one until ``budget_s`` seconds have passed since the first (all of them without a budget);
    says how many were left out."""
    start = time.monotonic()
    for done, size in enumerate(sizes):
        if budget_s is not None and time.monotonic() - start > budget_s:
            print(f"budget of {budget_s:.0f} s spent: {len(sizes) - done} sizes not run")
            return
        yield size


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD's sha, whether tracked files other than the results differ from it). Outside a git checkout (the GPU
    machine gets the working tree without .git): ``FASTDPO_GIT_COMMIT`` from the environment, set by whoever
    launches the run, with cleanliness unknown (None); else (None, None). The results folder is left out:
    rerunning a sweep rewrites its own results file."""
    fallback = os.environ.get("FASTDPO_GIT_COMMIT") or None, None

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True, timeout=30, check=False
        )

    try:
        head = git("rev-parse", "HEAD")
        results = RESULTS_DIR.relative_to(RESULTS_DIR.parent.parent).as_posix()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", f":(top,exclude){results}")
    except (OSError, subprocess.SubprocessError):
        return fallback
    if head.returncode:
        return fallback
    return head.stdout.strip(), bool(dirty.stdout.strip())


def device_slug(name: str, device: torch.device) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}"


class _Counter:
    """Stand-in for tqdm when it is not installed: prints one line per case."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def set_postfix_str(self, text: str) -> None:
        self.text = text

    def update(self, n: int = 1) -> None:
        self.n += n
        print(f"[{self.n}/{self.total}] {self.text}", flush=True)

    def close(self) -> None:
        pass


def progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, unit="case", dynamic_ncols=True)


def base_row(provider, mode, size, floor) -> dict:
    """The keys of a case that do not depend on how its measurement went."""
    S, T = size.layout()
    row = {"impl": provider.name, "mode": mode, "N": size.N, "V": size.V, "dtype": size.dtype, "S": S, "T": T}
    row |= {"floor_bytes": bytes_moved("floor", mode, size.N, size.V, size.torch_dtype), "floor_ms": floor.ms(mode)}
    return row | {"floor_read_gbps": floor.read_gbps, "floor_copy_gbps": floor.copy_gbps, "note": provider.note}


def measure_case(provider, mode, size, inputs, floor, device) -> dict:
    """One row: check accuracy, then (only if it passed) time the call and take its peak memory."""
    row = base_row(provider, mode, size, floor)
    floor_bytes = row["floor_bytes"]
    try:
        err, grad_err = providers.check_accuracy(provider, mode, *inputs)
    except providers.AccuracyError as exc:
        return row | {"status": "failed", "note": f"accuracy check failed, not timed: {exc}"}

    def call():
        return providers.run(provider, mode, *inputs)

    t = timing.bench(call, device)
    nbytes = bytes_moved(provider.name, mode, size.N, size.V, size.torch_dtype)
    return row | {
        "status": "ok", "ms_p50": t.p50, "ms_p20": t.p20, "ms_p80": t.p80, "reps": t.reps,
        "bytes": nbytes, "gbps": nbytes / t.p50 / 1e6, "effective_gbps": floor_bytes / t.p50 / 1e6,
        "floor_fraction": floor.ms(mode) / t.p50, "peak_extra_mb": timing.peak_extra_mb(call, device),
        "err_logps": err, "err_grad": grad_err,
    }  # fmt: skip


def guarded_case(*args) -> dict:
    """``measure_case``, with out-of-memory and any other error (an implementation's own input checks included)
    turned into a row, memory released after."""
    provider, mode, size, _inputs, floor = args[:5]
    try:
        return measure_case(*args)
    except torch.cuda.OutOfMemoryError:
        outcome = {"status": "oom", "note": "out of memory"}
    except Exception as exc:  # one broken implementation must not end the sweep; its row says why
        outcome = {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
    finally:
        release_memory()
    return base_row(provider, mode, size, floor) | outcome


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_atomically(path: Path, text: str) -> None:
    """A file interrupted mid-write (the sweep's time limit) is never left half written: write, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(
    rows: list[dict], unavailable: dict, out: Path, slug: str, fresh: bool, key: tuple[str, ...] = ROW_KEY
) -> list[dict]:
    """Merge ``rows`` into ``<out>/<slug>.json`` (unless ``fresh``; a row replaces the one with the same ``key``
    values), write it and the CSV; return all rows."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug}.json"
    merged, was_unavailable = {}, {}
    if path.exists() and not fresh:
        earlier = json.loads(path.read_text())
        merged = {tuple(r[k] for k in key): r for r in earlier["rows"]}
        was_unavailable = earlier.get("unavailable", {})
    merged |= {tuple(r[k] for k in key): r for r in rows}
    all_rows = list(merged.values())
    # what an earlier run could not run stays noted, unless this one ran it
    ran = {r.get("impl") for r in rows}
    unavailable = {k: v for k, v in was_unavailable.items() if k not in ran} | unavailable
    write_atomically(path, json.dumps({"rows": all_rows, "unavailable": unavailable}, indent=1) + "\n")
    fields = list(dict.fromkeys(k for r in all_rows for k in r))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(all_rows)
    write_atomically(out / f"{slug}.csv", table.getvalue())
    return all_rows


def write_record(out: Path, prefix: str, device: torch.device, module: str, argv: list[str], fields: dict) -> Path:
    """``<out>/<prefix>-<device>.json``: ``fields`` with the device, versions, commit and command of the run (the
    one-record results of ``benchmarks.precision`` and ``benchmarks.host_time``)."""
    record = run_metadata(device, module, argv) | fields
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{prefix}-{device_slug(record['device'], device)}.json"
    write_atomically(path, json.dumps(record, indent=1) + "\n")
    return path


def run_metadata(device: torch.device, module: str, argv: list[str]) -> dict:
    """What every results row or record carries about its run: the device's name, the torch and Triton versions,
    the commit (``git_commit``) and the command (``python -m <module> <argv>``)."""
    commit, dirty = git_commit()
    return {"device": timing.device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "git_commit": commit, "git_dirty": dirty,
            "command": shlex.join(["python", "-m", module, *argv])}  # fmt: skip


def format_table(rows: list[dict], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    def cell(value):
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [columns] + [tuple(cell(r.get(c)) for c in columns) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def table_order(rows: list[dict]) -> list[dict]:
    """Rows grouped by size in the order they were measured, the implementations in ``providers.NAMES`` order."""
    first = {}
    for r in rows:
        first.setdefault((r["N"], r["V"], r["dtype"]), len(first))
    return sorted(rows, key=lambda r: (first[(r["N"], r["V"], r["dtype"])], providers.NAMES.index(r["impl"])))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        timing.keep_freed_memory()
    torch.manual_seed(0)
    sizes = shapes.priority(shapes.sweep(args.quick, args.N, args.V, args.dtype))
    everything = providers.get_providers(device, args.impl)
    chosen = [everything[name] for name in providers.RUN_ORDER if name in everything]
    unavailable = {p.name: p.unavailable for p in chosen if p.unavailable}
    runnable = [p for p in chosen if not p.unavailable]
    for name, reason in unavailable.items():
        print(f"skipping {name}: {reason}")
    if not runnable:
        print("no implementation can run here: nothing measured")
        return 0

    common = run_metadata(device, "benchmarks.run", argv)
    slug = device_slug(common["device"], device)
    try:
        rows, all_rows = sweep(args, sizes, runnable, unavailable, device, slug, common)
    finally:
        providers.shutdown()
    print(format_table(table_order(rows)))
    for row in rows:
        if row["status"] in ("failed", "error"):
            print(f"{row['impl']} {row['mode']} N={row['N']} V={row['V']}: {row['status']}: {row['note']}")
    print(f"results: {args.out / (slug + '.json')} and .csv ({len(all_rows)} rows)")
    if not args.no_plots:
        print(plots.plot_all(all_rows, args.out, slug))
    return 1 if any(r["status"] in ("failed", "error") for r in rows) else 0


def sweep(args, sizes, runnable, unavailable, device, slug, common) -> tuple[list[dict], list[dict]]:
    """Measure every (size, provider, mode), writing the results file after each; returns (this run's rows, all
    rows of the file)."""
    rows, all_rows, bar = [], [], progress(len(sizes) * len(runnable) * len(args.mode))
    for size in within_budget(sizes, args.budget_s):
        try:
            floor = timing.measure_floor(size.N * size.V, size.torch_dtype, device)
            inputs = shapes.make_inputs(size, device)
        except torch.cuda.OutOfMemoryError:  # this size does not fit beside what is allocated: the next may
            print(f"N={size.N} V={size.V} {size.dtype}: out of memory for the inputs or the floor, size skipped")
            release_memory()
            continue
        for provider in runnable:
            for mode in args.mode:
                bar.set_postfix_str(f"{provider.name} {mode} N={size.N} V={size.V} {size.dtype}")
                rows.append(guarded_case(provider, mode, size, inputs, floor, device) | common)
                # after every case: a sweep interrupted at its time limit keeps all it measured
                all_rows = write_results(rows, unavailable, args.out, slug, args.fresh)
                if provider.clobbers_logits:
                    inputs[0].normal_(std=shapes.LOGIT_SCALE)
                bar.update()
        del inputs
    bar.close()
    return rows, all_rows


if __name__ == "__main__":
    sys.exit(main())
