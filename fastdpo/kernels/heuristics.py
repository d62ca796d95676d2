"""Launch configuration for the log-prob kernels, as small pure functions.

No autotuning by default: multi-config ``triton.autotune`` fails under ``TRITON_INTERPRET=1`` on a CPU-only
machine, and one heuristic keeps the launch free of benchmarking side effects. The values below are first
choices from the arithmetic in the comments; the benchmark issue replaces them with measured ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
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
# The forward folds each row's log-sum-exp chunk by chunk, in chunk order. Like BLOCK_V, the chunk is a function of
# V alone, since it fixes the order of the sums and so the bits. Whether a row's chunks run in one program or in
# one program each (their statistics then folded by a second, row-sized launch) follows the number of rows and
# leaves the bits alone. 16 blocks of 2048: V 32000 is one chunk, 128256 four, 151936 five, 256000 eight.
FWD_CHUNK_BLOCKS = 16
# The backward has nothing to fold: a split row is just each program writing its own columns (same bits).
BWD_CHUNK_BLOCKS = 8
# Split rows across programs when there are fewer than this many rows per SM: with 8 warps a program, 4 programs
# are half an SM's 64 warps, about as few as still keep enough loads in flight to stream HBM (N 256 rows on
# 132 SMs is 2 per SM: a quarter of the warps). A first choice by that arithmetic, to be replaced by measurement.
SPLIT_BELOW_ROWS_PER_SM = 4
# Software pipelining of the loop over a row's blocks (``tl.range(..., num_stages=)``): with 3 stages the next two
# blocks are already loading (cp.async into shared memory, 2 x BLOCK_V x 2 bytes = 8 KB a program in bf16) while
# this one is reduced, instead of one block in flight between reductions. Triton pipelines such a loop only when
# the loop asks for it: the launch's num_stages leaves loads that feed no dot alone (at any launch value the PTX
# had no cp.async). 3 is Triton's own default depth; by the arithmetic in benchmarks/NOTES.md one block in flight
# per program is at the edge of what an H200 needs, so a deeper pipeline is the first choice, to be confirmed by
# the tuning sweep.
PIPELINE_STAGES = 3


@dataclass(frozen=True)
class LogpsConfig:
    """Block size over the vocabulary, warps per program, the vocabulary chunk one program takes when a row is
    split across programs (forward: also the unit the log-sum-exp is folded in), and the software-pipelining depth
    of the loop over blocks (1: none)."""

    block_v: int
    num_warps: int
    chunk_v: int
    num_stages: int


def logps_config(
    V: int, block_v: int | None = None, *, backward: bool = False, chunk_v: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> LogpsConfig:  # fmt: skip
    """Pick ``BLOCK_V``, ``num_warps``, the chunk and the pipelining depth for rows of ``V`` logits. A function of
    V alone, never of the number of rows: that is what makes a row's log-prob the same bits in any batch.

    The keywords override the choice (tests force several blocks and chunks per row; the tuning sweep tries
    variants): ``block_v`` a power of two, ``chunk_v`` a multiple of it, ``num_stages`` >= 1.
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), MAX_BLOCK_V_BWD if backward else MAX_BLOCK_V_FWD)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if chunk_v is None:
        chunk_v = block_v * (BWD_CHUNK_BLOCKS if backward else FWD_CHUNK_BLOCKS)
    if chunk_v <= 0 or chunk_v % block_v:
        raise ValueError(f"chunk_v must be a positive multiple of block_v = {block_v}, got {chunk_v}")
    if num_warps is None:
        num_warps = 8 if block_v >= WIDE_BLOCK_V else 4
    if num_stages is None:
        num_stages = PIPELINE_STAGES
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1 (1: no pipelining), got {num_stages}")
    return LogpsConfig(block_v=block_v, num_warps=num_warps, chunk_v=chunk_v, num_stages=num_stages)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_rows(n_programs: int, device: torch.device, split: bool | None = None) -> bool:
    """Whether to give each chunk of a row its own program: when ``n_programs`` (rows, times 2 with reference
    logits) leave the GPU's SMs short of work. Never on the CPU (the interpreter runs programs one by one);
    ``split`` overrides."""
    if split is not None:
        return split
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return n_programs < SPLIT_BELOW_ROWS_PER_SM * _multiprocessor_count(index)
