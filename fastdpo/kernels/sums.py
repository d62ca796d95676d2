"""Triton kernel: per-row sums by a balanced binary tree of float64 adds, in one launch.

``pairwise_sums(x [R, L]) -> [R]`` gives the bits of ``fastdpo.sequences.pairwise_sums``'s PyTorch tree: row r is
zero-padded to W = 2^ceil(log2 L) and halved W -> W/2 -> ... -> 1 by adding neighbours (x[2i] + x[2i+1]) in
float64, then cast to ``x.dtype``. Why a kernel: the PyTorch tree is log2(W) + 3 launches (13 for a 1024-token
row: cast, pad, 10 levels, cast), each a few microseconds of host time, which at small sizes costs more than the
log-prob kernel itself.

A program holds ``CHUNK`` = min(W, MAX_CHUNK) values and halves them ``log2(CHUNK)`` times (``tl.reshape`` to
``[CHUNK / 2, 2]``, then a sum over the pair: one add, so the order is the tree's; ``tl.split`` into even and
odd values and an add would say the same, but compiles to 250 registers and spills at 1024 values). One exception
to "the same bits": under Triton's interpreter a sum over a pair starts from +0, so a sum of only -0 values is +0
there (the PyTorch tree gives -0); the values are equal.

Rows longer than MAX_CHUNK write float64 chunk sums, and a second launch runs the same tree over them: a balanced
tree over W values is the tree over its aligned MAX_CHUNK-wide subtrees, so the bits do not change. A row's bits
depend on its values alone, never on R: batch invariant, as the per-sequence sums must be.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdpo.kernels.logps import device_guard

# Values a program reduces: 4096 float64 over 4 warps take 72-80 registers a thread, no spills (sm_90, Triton 3.6
# and 3.9); a DPO sequence of up to 4096 tokens is one launch.
MAX_CHUNK = 4096
NUM_WARPS = 4


@triton.jit
def _pairwise_sums_kernel(
    x_ptr, out_ptr, L, stride_x_r, stride_x_l, stride_out_r, CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr
):  # fmt: skip
    """out[r, c] = the tree sum of x[r, c * CHUNK : (c + 1) * CHUNK] (zeros past L), in out's dtype."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    acc = tl.load(x_ptr + r * stride_x_r + offs.to(tl.int64) * stride_x_l, mask=offs < L, other=0.0).to(tl.float64)
    for _ in tl.static_range(LOG2_CHUNK):  # unrolled: each level has its own shape
        acc = tl.sum(tl.reshape(acc, (acc.shape[0] // 2, 2)), axis=1)  # x[2i] + x[2i + 1]
    tl.store(out_ptr + r * stride_out_r + c + tl.arange(0, 1), acc.to(out_ptr.dtype.element_ty))


def _launch(x: torch.Tensor, out: torch.Tensor, chunk: int, n_chunks: int = 1) -> None:
    """out[:, :n_chunks] = the chunks' tree sums; every chunk of the padded width, all-padding ones (0) included."""
    R, L = x.shape
    with device_guard(x):
        _pairwise_sums_kernel[(R, n_chunks)](
            x, out, L, x.stride(0), x.stride(1), out.stride(0), CHUNK=chunk, LOG2_CHUNK=chunk.bit_length() - 1,
            num_warps=NUM_WARPS,
        )  # fmt: skip


def pairwise_sums(x: torch.Tensor) -> torch.Tensor:
    """``[R, L]`` float32/float64 -> ``[R]`` in x's dtype (see the module docstring); any strides."""
    R, L = x.shape
    out = torch.empty(R, dtype=x.dtype, device=x.device)
    if R == 0:
        return out
    width = 1 << max(L - 1, 0).bit_length()
    if width <= MAX_CHUNK:
        _launch(x, out, width)
        return out
    partial = torch.empty(R, width // MAX_CHUNK, dtype=torch.float64, device=x.device)
    _launch(x, partial, MAX_CHUNK, partial.shape[1])
    _launch(partial, out, partial.shape[1])
    return out
