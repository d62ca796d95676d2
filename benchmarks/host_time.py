"""Host time before each fastdpo kernel launch: how long the Python side of a call keeps the GPU waiting.

    python -m benchmarks.host_time [--out DIR]

A GPU call that is timed alone (``benchmarks.run``: L2 flushed, then the call, between CUDA events) waits for the
host from the call's start to its first kernel launch, and from the start of the backward to the backward kernel;
at small sizes that host time, not the memory traffic, is what a row measures. This measures it on the CPU with the
launchers replaced by stubs that only allocate their outputs, so it counts fastdpo's own work (validation, layout,
autograd, dispatch) and no kernel: the median of ``REPS`` calls, one thread. On a GPU every launch also costs the
CUDA driver a few microseconds, which this does not see. Run it without ``TRITON_INTERPRET=1``: with it the
figures come out 3-4x higher (the interpreted sums kernel runs after each stubbed launch; why it slows the
measured part was not investigated). Writes
``<out>/host-time-<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fastdpo
from benchmarks.run import RESULTS_DIR, write_record
from fastdpo._logps_outputs import LogpsForward
from fastdpo.ops import logps as logps_op

REPS, WARMUP = 2000, 100
N, T, V = 2, 64, 128  # tiny: the stubs do no work, the shapes only have to be valid


class _Stub:
    """Stands in for the launchers of ``fastdpo.kernels.logps``: outputs allocated, the time of the call noted."""

    launched_at = 0.0

    @classmethod
    def logps_fwd(cls, logits, labels, *, shift, stats=(), **_):
        cls.launched_at = time.perf_counter()
        rows = (logits.shape[0], logits.shape[1] - int(shift))
        stats_out = torch.zeros((4, *rows)) if stats else None
        return LogpsForward(torch.zeros(rows), torch.zeros((2, *rows)), stats_out, None, None)

    @classmethod
    def logps_bwd(cls, logits, *_, **__):
        cls.launched_at = time.perf_counter()
        return torch.empty_like(logits)


def _median_us(prepare, timed) -> float:
    """Median microseconds from the start of ``timed(prepare())`` to its stubbed launch."""
    samples = []
    for i in range(WARMUP + REPS):
        arg = prepare()
        start = time.perf_counter()
        timed(arg)
        if i >= WARMUP:
            samples.append(_Stub.launched_at - start)
    return statistics.median(samples) * 1e6


def measure() -> dict[str, float]:
    torch.manual_seed(0)
    logits, labels = torch.randn(N, T, V), torch.randint(0, V, (N, T))
    ref_c, ref_r = torch.randn(N // 2), torch.randn(N // 2)
    x = logits.clone().requires_grad_()
    none = lambda: None  # noqa: E731
    return {
        "sequence_logps fwd": _median_us(none, lambda _: fastdpo.sequence_logps(logits, labels)),
        "dpo_loss fwd": _median_us(none, lambda _: fastdpo.dpo_loss(logits, labels, ref_c, ref_r)),
        "dpo_loss fwd, return_metrics": _median_us(
            none, lambda _: fastdpo.dpo_loss(logits, labels, ref_c, ref_r, return_metrics=True)
        ),
        "sequence_logps bwd": _median_us(lambda: fastdpo.sequence_logps(x, labels).sum(),
                                         lambda out: torch.autograd.grad(out, x)),  # fmt: skip
        "dpo_loss bwd": _median_us(lambda: fastdpo.dpo_loss(x, labels, ref_c, ref_r).loss,
                                   lambda out: torch.autograd.grad(out, x)),  # fmt: skip
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_time", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    real = logps_op.impl_for
    logps_op.impl_for = lambda logits: _Stub
    try:
        us = measure()
    finally:
        logps_op.impl_for = real
    for name, value in us.items():
        print(f"{name:32s} {value:7.1f} us before the kernel")
    path = write_record(args.out, "host-time", torch.device("cpu"), "benchmarks.host_time", argv,
                        {"reps": REPS, "host_us_before_kernel": us})  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
