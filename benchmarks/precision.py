"""Sequence log-prob error of the fused-linear implementations against float64, on bf16 hidden states and head.

    python -m benchmarks.precision            # D 2048, V 151936, 256-token sequences; ~1 min on a 2-core CPU

The issue's precision target: keeping each logit tile in float32 (the matmul's accumulator) puts a 256-token
sequence's log-prob within 0.05 nats of float64 truth; rounding the tile to bf16 first (TRL 1.16's fused LM
head, and any loop that runs ``lm_head`` in bf16) was measured by TRL at about 0.4 nats. This is arithmetic, not
timing: the same rounding happens on a CPU as on a GPU (only the summation order differs), so the CPU figures
stand. Truth is the same bf16 values in float64. Writes ``results/precision-<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import fastdpo
from benchmarks.providers import _needs
from benchmarks.run import RESULTS_DIR, write_record


def _trl():
    from trl.kernels import ChunkedLogProbFunction

    def fn(hidden, weight, targets):  # TRL's add_fused_lm_head call: 32768-wide vocab chunks, bf16 tiles
        return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ())[0]

    return fn


def implementations(device):
    impls = {
        "fastdpo-fused (float32 tiles)": lambda h, w, y: fastdpo.fused_linear_token_logps(h, w, y).log_probs,
        "lm_head in bf16, then float32 log_softmax": lambda h, w, y: (h @ w.t())
        .float()
        .log_softmax(-1)
        .gather(-1, y[:, None])
        .squeeze(1),
    }
    trl, why = _needs("trl", device, False, _trl)
    if trl is not None:
        impls["TRL 1.16 ChunkedLogProbFunction (bf16 tiles)"] = trl
    return impls, why


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n")[0])
    p.add_argument("--D", type=int, default=2048)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--T", type=int, default=256, help="tokens per sequence")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--logit-std", type=float, nargs="+", default=[4.0, 16.0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    impls, trl_missing = implementations(device)
    rows = []
    for std in args.logit_std:
        weight = (torch.randn(args.V, args.D, device=device) * (std / args.D**0.5)).to(torch.bfloat16)
        errors = {name: [] for name in impls}
        for _ in range(args.sequences):
            hidden = torch.randn(args.T, args.D, device=device).to(torch.bfloat16)
            targets = torch.randint(0, args.V, (args.T,), device=device)
            truth = (hidden.double() @ weight.double().t()).log_softmax(-1).gather(-1, targets[:, None]).sum()
            with torch.no_grad():
                for name, fn in impls.items():
                    errors[name].append(abs(float(fn(hidden, weight, targets).double().sum() - truth)))
        for name, errs in errors.items():
            rows.append({"impl": name, "logit_std": std, "T": args.T, "D": args.D, "V": args.V,
                         "mean_abs_error_nats": statistics.mean(errs), "max_abs_error_nats": max(errs),
                         "sequences": args.sequences})  # fmt: skip
            print(f"logit std {std:>5}: {name:<45} mean |error| {statistics.mean(errs):.2e} nats, max {max(errs):.2e}")
    path = write_record(args.out, "precision", device, "benchmarks.precision", argv,
                        {"rows": rows, "unavailable": {"trl": trl_missing} if trl_missing else {}})  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
