"""Launch configuration for the log-prob kernels, as small pure functions.

No autotuning by default: multi-config ``triton.autotune`` fails under ``TRITON_INTERPRET=1`` on a CPU-only
machine, and one heuristic keeps the launch free of benchmarking side effects. The values below are first
choices from the arithmetic in the comments; the benchmark issue replaces them with measured ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

# One loop iteration loads BLOCK_V logits per program. Backward: 4096 fp32 values over 8 warps is 16 live values
# per thread, enough independent loads in flight to stream HBM, few enough registers that nothing spills
# (see `python -m fastdpo.kernels.compile_check`). Larger rows simply take more iterations.
MAX_BLOCK_V_BWD = 4096
# Forward: one block size with or without the optional statistics (entropy, log sum p^2, mean, top-1), because
# BLOCK_V and num_warps fix the order of the block sums and so the bits of the log-sum-exp: a reference scored
# by ``sequence_logps`` (no statistics) must equal the policy scored by ``dpo_loss(return_metrics=True)`` bit for
# bit. With the statistics each value carries four more running terms; at 4096 that spilled 8 bytes on sm_80,
# at 2048 it does not.
MAX_BLOCK_V_FWD = 2048
# Below this block size 4 warps already cover the block with >= 8 values per thread.
WIDE_BLOCK_V = 2048


@dataclass(frozen=True)
class LogpsConfig:
    """Block size over the vocabulary and warps per program for one launch."""

    block_v: int
    num_warps: int


def logps_config(V: int, block_v: int | None = None, *, backward: bool = False) -> LogpsConfig:
    """Pick ``BLOCK_V`` and ``num_warps`` for rows of ``V`` logits. A function of V alone, never of the number of
    rows: that is what makes a row's log-prob the same bits in any batch.

    ``block_v`` overrides the block size (a power of two); tests use it to force several blocks per row.
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V_BWD if backward else MAX_BLOCK_V_FWD)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    num_warps = 8 if block_v >= WIDE_BLOCK_V else 4
    return LogpsConfig(block_v=block_v, num_warps=num_warps)
