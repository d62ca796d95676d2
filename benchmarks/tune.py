"""Time launch variants of fastdpo's log-prob kernels against the bandwidth floor: the tuning sweep.

    python -m benchmarks.tune                      # GPU: N 8192 and 256 at V 128256 and 256000, bf16
    python -m benchmarks.tune --quick              # CPU smoke run (the interpreter: proves the harness, not speed)

Each kernel is timed alone, as fastdpo launches it: ``fwd`` is ``kernels.logps.logps_fwd`` (one read of the
logits), ``bwd`` is ``kernels.logps.logps_bwd`` (one read, one write). A variant changes one knob from the
default of ``kernels.heuristics`` (``default`` is that choice): the block over the vocabulary, warps, software
pipelining stages, and whether a row is split into chunks across programs (``split``; the forward's chunk also
fixes the order of its sums, so a forward chunk variant changes the bits, never the accuracy). Every variant's
outputs are compared with the default's before it is timed (``max_rel_diff``; a variant above 1e-5 is
``failed``). Floor: the bytes of one read (``fwd``) or one read + one write (``bwd``) at the bandwidth a plain
``sum`` and ``copy_`` reach on buffers of the same size, measured in the same run (``timing.measure_floor``).

Rows (``<out>/tune-<device>.json`` and ``.csv``, merged on kernel, variant, N, V, dtype): ``ms_p50/p20/p80``,
``gbps`` (the floor's bytes over ``ms_p50``), ``floor_ms``, ``floor_fraction``, ``max_rel_diff``, the versions,
the commit and the command. ``benchmarks/NOTES.md`` logs what was tried, predicted and measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels on CPU tensors: the interpreter, chosen before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import run, shapes, timing  # noqa: E402
from fastdpo._testing import relative_error  # noqa: E402
from fastdpo.kernels import logps  # noqa: E402
from fastdpo.kernels.heuristics import logps_config  # noqa: E402

KERNELS = ("fwd", "bwd")
ROW_KEY = ("kernel", "variant", "N", "V", "dtype")
TABLE_COLUMNS = ("kernel", "variant", "N", "V", "ms_p50", "gbps", "floor_fraction", "max_rel_diff", "status")
MAX_REL_DIFF = 1e-5


def variants(kernel: str, V: int) -> dict[str, dict]:
    """Name -> launcher keywords: the default, then one knob changed at a time."""
    cfg = logps_config(V, backward=kernel == "bwd")
    out = {"default": {}}
    for block in (cfg.block_v // 2, cfg.block_v * 2):  # warps and chunk held at the default's
        out[f"block_v={block}"] = {"block_v": block, "num_warps": cfg.num_warps, "chunk_v": max(cfg.chunk_v, block)}
    for warps in {4, 8, 16} - {cfg.num_warps}:
        out[f"num_warps={warps}"] = {"num_warps": warps}
    for stages in (1, 2, 4):
        out[f"num_stages={stages}"] = {"num_stages": stages}
    out["split=False"] = {"split": False}
    for blocks in (4, 8, 16, 32):
        out[f"split,chunk={blocks}x{cfg.block_v}"] = {"split": True, "chunk_v": blocks * cfg.block_v}
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one small size and two variants (CPU smoke run)")
    p.add_argument("--N", nargs="+", type=int, default=[8192, 256])
    p.add_argument("--V", nargs="+", type=int, default=[128256, 256000])
    p.add_argument("--dtype", nargs="+", choices=list(shapes.DTYPES), default=["bfloat16"])
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--variant", nargs="+", help="variant names to run (default: all of `variants`)")
    p.add_argument("--out", type=Path, default=run.RESULTS_DIR)
    p.add_argument("--budget-s", type=float, help="start no new size after this many seconds")
    return p.parse_args(argv)


def _launchers(kernel, logits, labels, grad_logp, lse):
    common = {"shift": False, "ignore_index": -100, "temperature": 1.0}
    if kernel == "fwd":
        return lambda kw: logps.logps_fwd(logits, labels, **common, **kw).logp
    return lambda kw: logps.logps_bwd(logits, labels, lse, grad_logp, **common, **kw)


def tune_size(size: shapes.Size, kernels, names, device, quick: bool):
    """The rows of one size, one variant at a time."""
    logits, labels, _ = shapes.make_inputs(size, device)
    logits, labels = logits.reshape(size.N, 1, size.V), labels.reshape(size.N, 1)
    grad_logp = torch.randn(size.N, 1, device=device)
    lse = logps.logps_fwd(logits, labels, shift=False, ignore_index=-100, temperature=1.0).lse
    floor = timing.measure_floor(logits.numel(), logits.dtype, device)
    for kernel in kernels:
        launch = _launchers(kernel, logits, labels, grad_logp, lse)
        expected = launch({})
        floor_ms = floor.read_ms if kernel == "fwd" else floor.copy_ms
        floor_bytes = floor.nbytes * (1 if kernel == "fwd" else 2)
        chosen = variants(kernel, size.V)
        for name in names or (list(chosen)[:2] if quick else chosen):
            if name not in chosen:
                continue
            kw = chosen[name]
            row = {"kernel": kernel, "variant": name, "N": size.N, "V": size.V, "dtype": size.dtype,
                   "floor_ms": floor_ms, "floor_bytes": floor_bytes}  # fmt: skip
            try:
                diff = relative_error(launch(kw), expected)[0]
                row["max_rel_diff"] = diff
                if not diff <= MAX_REL_DIFF:
                    yield row | {"status": "failed", "note": f"differs from the default by {diff:.2e}"}
                    continue
                t = timing.bench(lambda kw=kw, launch=launch: launch(kw), device)
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile or run is a row, not the end
                yield row | {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
                continue
            yield row | {"status": "ok", "ms_p50": t.p50, "ms_p20": t.p20, "ms_p80": t.p80, "reps": t.reps,
                         "gbps": floor_bytes / t.p50 / 1e6, "floor_fraction": floor_ms / t.p50}  # fmt: skip


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.N, args.V = [16], [1000]
    torch.manual_seed(0)
    meta = run.run_metadata(device, "benchmarks.tune", argv)
    # V outer: with the defaults, the headline size first, then the split case at the same V (N 256)
    sizes = [shapes.Size(N, V, dt) for V in args.V for N in args.N for dt in args.dtype]
    rows, start = [], time.monotonic()
    for size in run.within_budget(sizes, args.budget_s):
        print(f"N {size.N} V {size.V} {size.dtype} ({time.monotonic() - start:.0f} s)", flush=True)
        for row in tune_size(size, args.kernel, args.variant, device, args.quick):
            rows.append(row | meta)  # written after every variant: an interrupted sweep keeps what it measured
            run.write_results(rows, {}, args.out, "tune-" + run.device_slug(meta["device"], device), fresh=False,
                              key=ROW_KEY)  # fmt: skip
    print(run.format_table(rows, TABLE_COLUMNS))
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
