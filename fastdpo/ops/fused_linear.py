"""Autograd op: per-token label log-probs of ``hidden @ weight.T (+ bias)``, tile by tile; the ``[R, V]``
logits are never materialised.

``fused_linear_logps(hidden [R, D], weight [V, D], bias [V] or None, targets [R], options)`` returns
``(logp [R], entropy [R] or None, stats [len(STATS), R] or None)``, float32, 0 on rows whose target is
``ignore_index``; gradients flow to hidden, weight and bias. Like the logits op it is a pair of
``torch.library`` custom ops (``fastdpo::fused_linear_logps`` and its ``_backward``) with fake implementations
and a registered autograd formula: one opaque node under ``torch.compile(fullgraph=True)``.

Rows whose target is ``ignore_index`` are neither projected nor read: the M scored rows are gathered
``tile_rows`` at a time (``tile_elements // V``, a multiple of the GEMM height), and each tile goes through the
logits kernels of ``fastdpo.kernels.logps`` (or the chunked PyTorch path), which apply the logit transform f
(logit scale, softcapping, temperature) on the fly:

    forward   x = h_tile @ W.T (+ b), kept in float32 (the matmul's accumulator: rounding x to bf16 before the
              log-sum-exp costs ~0.4 nats on a 256-token sequence), then one sweep: lse pair, label logit,
              optional statistics. Saved for backward: the lse pair, O(M).
    backward  recompute x; dx = dz f'(x) written by the backward kernel in the matmul dtype;
              dH_tile = dx @ W, dW += dx.T @ h_tile (float32 accumulator across tiles), db += sum_rows dx.

FLOPs: 2 M D V forward, 6 M D V backward (8 M D V in all; see ``benchmarks/NOTES.md`` for the alternatives).
Extra memory: one float32 tile plus one tile of the matmul dtype (6 bytes per element in bf16), a float32
``[V, D]`` dW accumulator when there is more than one tile, and O(M) per-token vectors: independent of the
number of sequences and of their length.

A ZeRO-3 partitioned weight (DeepSpeed) is gathered for the forward and again for the backward, as TRL does.
"""

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from fastdpo._logps_outputs import STATS, LogpsForward
from fastdpo.ops.logps import impl_for, kernel_kw, no_double_backward, stats_mask, stats_of

TILE_ROW_MULTIPLE = 16  # tensor-core friendly GEMM heights
# The forward GEMM always runs on blocks of exactly this many rows (the last one zero-padded): a GEMM library picks
# its algorithm, and with it the order of the sums over D, from the shape, so a row scored among 37 others would
# not get the bits it gets among 500 (measured on CPU). CUDA: 256 rows is 256 FLOP per byte of W, about H100's
# bf16 ridge (989 TFLOP/s / 3.35 TB/s); CPU: 64 rows keep the float32 block at 64 V.
CUDA_GEMM_ROWS = 256
CPU_GEMM_ROWS = 64
# Logits per tile. CUDA: 2^26 (256 MB float32 + 128 MB bf16 gradient tile): at V = 128256 that is 512 rows, a
# GEMM of 512 x D x V (0.5 TFLOP at D = 4096) per tile, long enough to hide the launches between tiles.
# CPU: 2^22, the chunked path's working set.
CUDA_TILE_ELEMENTS = 1 << 26
CPU_TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class FusedLinearOptions:
    ignore_index: int = -100
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    stats: tuple = ()  # names from fastdpo._logps_outputs.STATS
    tile_elements: Optional[int] = None  # None: CUDA_TILE_ELEMENTS on CUDA, CPU_TILE_ELEMENTS elsewhere

    def with_stats(self, stats: tuple) -> "FusedLinearOptions":
        """These options asking for ``stats`` (not ``dataclasses.replace``: torch 2.6's Dynamo cannot trace it)."""
        return FusedLinearOptions(ignore_index=self.ignore_index, temperature=self.temperature,
                                  logit_scale=self.logit_scale, softcap=self.softcap, stats=stats,
                                  tile_elements=self.tile_elements)  # fmt: skip


def tile_rows(V: int, device: torch.device, tile_elements: Optional[int]) -> tuple[int, int]:
    """(scored rows per tile, rows per forward GEMM). The GEMM height is the device's (``CUDA_GEMM_ROWS``), or the
    tile's when a tile is smaller; the tile is ``tile_elements // V`` rows rounded down to a multiple of the GEMM
    height, at least one GEMM. Both depend on V and the device, never on the number of scored rows."""
    cuda = device.type == "cuda"
    if tile_elements is None:
        tile_elements = CUDA_TILE_ELEMENTS if cuda else CPU_TILE_ELEMENTS
    rows = tile_elements // max(V, 1)
    rows = max(TILE_ROW_MULTIPLE, rows - rows % TILE_ROW_MULTIPLE)
    gemm = min(rows, CUDA_GEMM_ROWS if cuda else CPU_GEMM_ROWS)
    return rows - rows % gemm, gemm


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul's input dtype: autocast's when it is on (as ``nn.Linear`` would run), else the promoted one."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _has_fp32_out_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """cuBLAS bf16/fp16 GEMMs with a float32 output (``torch.mm(..., out_dtype=)``, CUDA, torch >= 2.8)."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and hasattr(torch.ops.aten.mm, "dtype")


class _Projection:
    """The LM head in the matmul dtype, and its float32 products without rounding to that dtype."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype, gemm_rows: int):
        self.dtype = dtype
        self.gemm_rows = gemm_rows
        self.weight = weight.to(dtype)  # no copy unless autocast or mixed dtypes ask for one
        self.bias = None if bias is None else bias.float()
        self.fp32_out = _has_fp32_out_mm(weight.device, dtype)
        # Without a float32-output GEMM (CPU), multiply float32 copies: bf16 x bf16 products are exact in float32,
        # so this is the same math as the tensor-core GEMM with its float32 accumulator.
        self.weight32 = self.weight if self.fp32_out or dtype == torch.float32 else self.weight.float()

    def grad_hidden(self, dx: torch.Tensor) -> torch.Tensor:
        """dH = dx @ W, ``[rows, D]`` in the matmul dtype (one GEMM over V: float32 accumulation inside)."""
        return torch.mm(dx, self.weight) if self.fp32_out else (dx.float() @ self.weight32).to(self.dtype)

    def grad_weight(self, dx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """dx.T @ h, ``[V, D]`` float32."""
        if self.fp32_out:
            return torch.mm(dx.t(), h, out_dtype=torch.float32)
        return dx.t().float() @ h.float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """x = h @ W.T (+ b), ``[rows, V]`` float32, by GEMMs of exactly ``gemm_rows`` rows (the last block
        zero-padded), so that each row's bits depend on that row alone."""
        n, G = h.shape[0], self.gemm_rows
        padded = -(-n // G) * G
        h = torch.nn.functional.pad(h, (0, 0, 0, padded - n)) if padded != n else h
        if not self.fp32_out:
            h = h.float()
        x = torch.empty(padded, self.weight.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, padded, G):
            block = slice(start, start + G)
            if self.fp32_out:
                torch.mm(h[block], self.weight.t(), out_dtype=torch.float32, out=x[block])
            else:
                torch.mm(h[block], self.weight32.t(), out=x[block])
        x = x[:n]
        return x if self.bias is None else x.add_(self.bias)

    def addmm32_(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` for a float32 ``acc``, the product never rounded to the matmul dtype."""
        if self.fp32_out:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.addmm_(a.float(), b.float())


def gathered_lm_head(*params: Optional[Tensor]):
    """Context in which ZeRO-3 partitioned parameters hold their full data (DeepSpeed), else a null context."""
    partitioned = {id(p): p for p in params if p is not None and hasattr(p, "ds_id")}
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # only reachable when DeepSpeed created the parameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    to_gather = [p for p in partitioned.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
    return deepspeed.zero.GatheredParameters(to_gather) if to_gather else contextlib.nullcontext()


def _scored_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Indices of the rows to project (one host sync: the count of scored rows sizes the tiles)."""
    return (targets != ignore_index).nonzero().squeeze(1)


def _tiles(M: int, rows_per_tile: int):
    for start in range(0, M, rows_per_tile):
        yield slice(start, min(start + rows_per_tile, M))


@torch.library.custom_op("fastdpo::fused_linear_logps", mutates_args=())
def _fused_linear_logps_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    stats: int,
    tile_elements: Optional[int],
    matmul_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp [R], lse [2, R], entropy [R] or empty, stats [len(STATS), R] or empty), float32."""
    R, V = hidden.shape[0], weight.shape[0]
    names = stats_of(stats)
    rows = dict(dtype=torch.float32, device=hidden.device)
    logp, lse = torch.zeros(R, **rows), torch.zeros(2, R, **rows)
    stats_out = torch.zeros(len(STATS), R, **rows) if names else torch.empty(0, **rows)
    scored = _scored_rows(targets, ignore_index)
    per_tile, gemm_rows = tile_rows(V, hidden.device, tile_elements)
    # Autocast off inside: it would recast the float32-output GEMMs and round the tiles to bf16.
    with gathered_lm_head(weight, bias), torch.autocast(hidden.device.type, enabled=False):
        proj = _Projection(weight, bias, matmul_dtype, gemm_rows)
        for tile in _tiles(scored.numel(), per_tile):
            idx = scored[tile]
            x = proj.logits(hidden.index_select(0, idx).to(proj.dtype))
            out: LogpsForward = impl_for(x).logps_fwd(
                x.unsqueeze(1), targets.index_select(0, idx).unsqueeze(1), stats=names,
                **kernel_kw(False, ignore_index, temperature, logit_scale, softcap),
            )  # fmt: skip
            logp.index_copy_(0, idx, out.logp.squeeze(1))
            lse.index_copy_(1, idx, out.lse.squeeze(2))
            if names:
                stats_out.index_copy_(1, idx, out.stats.squeeze(2))
    entropy = stats_out[STATS.index("entropy")].clone() if "entropy" in names else torch.empty(0, **rows)
    return logp, lse, entropy, stats_out


@_fused_linear_logps_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, temperature, logit_scale, softcap, stats, tile_elements,
      matmul_dtype):  # fmt: skip
    R = hidden.shape[0]
    new = lambda *shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(R), new(2, R), new(R) if stats & 1 else new(0), new(len(STATS), R) if stats else new(0)


@torch.library.custom_op("fastdpo::fused_linear_logps_backward", mutates_args=())
def _fused_linear_logps_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    tile_elements: Optional[int],
    matmul_dtype: torch.dtype,
    needs_grad: List[bool],  # typing.List: torch 2.6's schema inference knows no list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) in the inputs' dtypes; an empty tensor for each one not needed."""
    need_h, need_w, need_b = needs_grad
    V = weight.shape[0]
    scored = _scored_rows(targets, ignore_index)
    per_tile, gemm_rows = tile_rows(V, hidden.device, tile_elements)
    n_tiles = -(-scored.numel() // per_tile)
    with gathered_lm_head(weight, bias), torch.autocast(hidden.device.type, enabled=False):
        proj = _Projection(weight, bias, matmul_dtype, gemm_rows)
        grad_h = torch.zeros_like(hidden) if need_h else None
        # One tile: dW is a single GEMM (float32 accumulation inside it). Several: sum them in float32.
        grad_w32 = None
        if need_w and n_tiles > 1:
            grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b32 = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
        for tile in _tiles(scored.numel(), per_tile):
            idx = scored[tile]
            h = hidden.index_select(0, idx).to(proj.dtype)
            x = proj.logits(h)
            dx = torch.empty(x.shape, dtype=proj.dtype, device=x.device)
            impl_for(x).logps_bwd(
                x.unsqueeze(1),
                targets.index_select(0, idx).unsqueeze(1),
                lse.index_select(1, idx).unsqueeze(2),
                None if grad_logp is None else grad_logp.index_select(0, idx).float().unsqueeze(1),
                entropy=None if grad_entropy is None else entropy.index_select(0, idx).unsqueeze(1),
                grad_entropy=None if grad_entropy is None else grad_entropy.index_select(0, idx).float().unsqueeze(1),
                out=dx.unsqueeze(1),
                **kernel_kw(False, ignore_index, temperature, logit_scale, softcap),
            )  # fmt: skip
            del x
            if need_h:
                grad_h.index_copy_(0, idx, proj.grad_hidden(dx).to(hidden.dtype))
            if need_w:
                if grad_w32 is None:
                    grad_w32 = proj.grad_weight(dx, h)
                else:
                    proj.addmm32_(grad_w32, dx.t(), h)
            if need_b:
                grad_b32 += dx.sum(0, dtype=torch.float32)
    if need_w and grad_w32 is None:  # no scored row
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    empty = hidden.new_empty
    return (grad_h if need_h else empty(0), grad_w32.to(weight.dtype) if need_w else empty(0),
            grad_b32.to(bias.dtype) if need_b else empty(0))  # fmt: skip


@_fused_linear_logps_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, ignore_index, temperature, logit_scale,
      softcap, tile_elements, matmul_dtype, needs_grad):  # fmt: skip
    need_h, need_w, need_b = needs_grad
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b else hidden.new_empty(0))  # fmt: skip


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, temperature, logit_scale, softcap, stats, tiles, dtype = inputs
    _logp, lse, entropy, stats_out = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if stats & 1 else None)
    ctx.args = (ignore_index, temperature, logit_scale, softcap, tiles, dtype)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, stats_out)


def _backward(ctx, grad_logp, _grad_lse, grad_entropy, _grad_stats):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    if entropy is None:  # the entropy output is an empty placeholder: any gradient for it is meaningless
        grad_entropy = None
    needs = list(ctx.needs_input_grad[:3])
    if (grad_logp is None and grad_entropy is None) or not any(needs):
        return (None,) * 11
    needs[2] = needs[2] and bias is not None
    grad_h, grad_w, grad_b = _fused_linear_logps_backward_op(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *ctx.args, needs
    )
    return (grad_h if needs[0] else None, grad_w if needs[1] else None, grad_b if needs[2] else None) + (None,) * 8


_fused_linear_logps_op.register_autograd(_backward, setup_context=_setup_context)
_fused_linear_logps_backward_op.register_autograd(no_double_backward)


def fused_linear_logps(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, options: FusedLinearOptions
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(logp [R], entropy [R] or None, stats [len(STATS), R] or None); arguments are assumed validated. The
    matmul dtype is fixed here, where the caller's autocast state is visible (the backward runs outside it)."""
    o = options
    mask = stats_mask(o.stats)
    logp, _lse, entropy, stats = _fused_linear_logps_op(
        hidden, weight, bias, targets, o.ignore_index, o.temperature, o.logit_scale, o.softcap, mask,
        o.tile_elements, compute_dtype(hidden, weight),
    )  # fmt: skip
    return logp, entropy if mask & 1 else None, stats if mask else None
