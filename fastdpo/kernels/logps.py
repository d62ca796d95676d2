"""Triton kernels: per-token log-probabilities of labels, read straight from strided logits.

Maths, per scored row r = (n, t) with label y = labels[n, t + SHIFT] and z = logits[n, t, :] / temperature:

    lse[r]  = m + log l,  m = max_v z[v],  l = sum_v exp(z[v] - m)    (online, one read of the row in
              BLOCK_V chunks: m' = max(m, max_b z); l' = l e^(m - m') + sum_b e^(z - m'))
    logp[r] = (z[y] - m) - log l
    dlogits[n, t, v] = g[r] / temperature * (1[v = y] - exp((z[v] - m) - log l))

The log-sum-exp is kept as the pair (m, log l), not rounded to one float: z - m is exact for the logits that
carry the probability mass, so log-probs and softmax keep full float32 precision however large the logits
(rounding m + log l to float32 at |z| ~ 1e4 would cost 5e-4 relative in every softmax value).

Rows whose label is ``ignore_index`` (and, with SHIFT=1, the last position of each sequence, which has no
next token) are unscored: logp = 0, lse = 0, gradient 0, and the forward does not read them.

The shift of the Hugging Face convention (logits[:, t] scores labels[:, t + 1]) is done by indexing, so a
sliced or narrowed logits view is read in place. All offsets are int64: N * T * V passes 2^31 at
realistic sizes (16k tokens x 152k vocab).

Bytes per scored row: forward reads V logits (+ one label, writes 8 bytes); backward reads V logits and
writes V gradients (unscored rows: writes V zeros only). Reference: ``fastdpo.reference.sequence_logps``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fastdpo.kernels.heuristics import logps_config

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _online_lse_update(m_i, l_i, z):
    """One step of the online log-sum-exp over a block ``z``; -inf blocks (masked vocab) leave (m, l) as is."""
    m_new = tl.maximum(m_i, tl.max(z, axis=0))
    # Shift by 0 while every logit seen so far is -inf, so no (-inf) - (-inf) = nan appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
    return m_new, l_i


@triton.jit
def _label_of_row(labels_ptr, n, t_label, stride_labels_n, stride_labels_t, T, V, ignore_index):
    """Label of a logits row, whether it is scored, and whether it is a valid vocabulary id."""
    has_next = t_label < T
    label = tl.load(labels_ptr + n * stride_labels_n + t_label * stride_labels_t, mask=has_next, other=ignore_index)
    label = label.to(tl.int64)
    scored = has_next & (label != ignore_index)
    in_vocab = (label >= 0) & (label < V)
    return label, scored, in_vocab


@triton.jit
def _logps_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    stride_logits_n,
    stride_logits_t,
    stride_labels_n,
    stride_labels_t,
    T,
    T_rows,
    n_rows,
    V,
    ignore_index,
    inv_temperature,
    SHIFT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // T_rows
    t = row - n * T_rows
    label, scored, in_vocab = _label_of_row(
        labels_ptr, n, t + SHIFT, stride_labels_n, stride_labels_t, T, V, ignore_index
    )
    if not scored:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(lse_ptr + n_rows + row, 0.0)
        return

    row_ptr = logits_ptr + n * stride_logits_n + t * stride_logits_t
    offs_v = tl.arange(0, BLOCK_V)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        mask_v = start + offs_v < V
        z = tl.load(row_ptr + start + offs_v, mask=mask_v, other=float("-inf")).to(tl.float32) * inv_temperature
        m_i, l_i = _online_lse_update(m_i, l_i, z)
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    log_l = tl.log(l_i)

    # One extra element read; an out-of-vocabulary label is never dereferenced and yields nan, not garbage.
    z_label = tl.load(row_ptr + label, mask=in_vocab, other=float("nan")).to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, (z_label - m_i) - log_l)
    tl.store(lse_ptr + row, m_i)
    tl.store(lse_ptr + n_rows + row, log_l)


@triton.jit
def _logps_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    grad_logp_ptr,
    grad_logits_ptr,
    stride_logits_n,
    stride_logits_t,
    stride_labels_n,
    stride_labels_t,
    stride_grad_logp_n,
    stride_grad_logp_t,
    stride_grad_n,
    stride_grad_t,
    T,
    T_rows,
    n_rows,
    V,
    ignore_index,
    inv_temperature,
    SHIFT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # over all N * T logits rows, so every gradient row is written
    n = row // T
    t = row - n * T
    label, scored, in_vocab = _label_of_row(
        labels_ptr, n, t + SHIFT, stride_labels_n, stride_labels_t, T, V, ignore_index
    )
    g = tl.load(grad_logp_ptr + n * stride_grad_logp_n + t * stride_grad_logp_t, mask=scored, other=0.0)
    m_i = tl.load(lse_ptr + n * T_rows + t, mask=scored, other=0.0)
    log_l = tl.load(lse_ptr + n_rows + n * T_rows + t, mask=scored, other=0.0)
    coef = g.to(tl.float32) * inv_temperature

    row_ptr = logits_ptr + n * stride_logits_n + t * stride_logits_t
    grad_row_ptr = grad_logits_ptr + n * stride_grad_n + t * stride_grad_t
    offs_v = tl.arange(0, BLOCK_V)
    v_read = tl.where(scored, V, 0)  # unscored rows read nothing (fully masked loads) and write zeros
    for start in range(0, V, BLOCK_V):
        offs = start + offs_v
        mask_v = offs < V
        z = tl.load(row_ptr + offs, mask=offs < v_read, other=0.0).to(tl.float32) * inv_temperature
        p = tl.exp((z - m_i) - log_l)
        dz = coef * (tl.where(offs == label, 1.0, 0.0) - p)
        dz = tl.where(scored, dz, 0.0)
        tl.store(grad_row_ptr + offs, dz.to(grad_logits_ptr.dtype.element_ty), mask=mask_v)


def _device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (multi-GPU processes)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_launch_args(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 3 or logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"logits must be a 3-D (N, T, V) tensor of {SUPPORTED_DTYPES}, got shape {tuple(logits.shape)} "
            f"and dtype {logits.dtype}"
        )
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must be unit-stride in the vocab dimension, got strides {logits.stride()}")
    if labels.shape != logits.shape[:2] or labels.device != logits.device:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:2])} on {logits.device}, "
            f"got {tuple(labels.shape)} on {labels.device}"
        )


def logps_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    ignore_index: int,
    temperature: float,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and log-sum-exps.

    logits ``[N, T, V]`` (unit stride in V), labels ``[N, T]`` -> logp ``[N, T - shift]`` and
    lse ``[2, N, T - shift]`` (row max and log of the rescaled sum; ``lse.sum(0)`` is the log-sum-exp),
    float32, 0 on unscored rows.
    """
    _check_launch_args(logits, labels)
    N, T, V = logits.shape
    T_rows = T - int(shift)
    logp = torch.empty((N, T_rows), dtype=torch.float32, device=logits.device)
    lse = torch.empty((2, N, T_rows), dtype=torch.float32, device=logits.device)
    if N * T_rows == 0:
        return logp, lse
    cfg = logps_config(V, block_v)
    with _device_guard(logits):
        _logps_fwd_kernel[(N * T_rows,)](
            logits, labels, logp, lse,
            logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            T, T_rows, N * T_rows, V, ignore_index, 1.0 / temperature,
            SHIFT=int(shift), BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )  # fmt: skip
    return logp, lse


def logps_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    shift: bool,
    ignore_index: int,
    temperature: float,
    inplace: bool = False,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_logp * logp)`` with respect to logits, ``[N, T, V]`` in the logits' dtype.

    ``grad_logp`` is ``[N, T - shift]`` with any strides (the backward of ``.sum(1)`` hands in a stride-0
    expand). With ``inplace=True`` the gradient overwrites ``logits`` (same storage and strides): each program
    reads a block of its row before writing that block, and rows are disjoint.
    """
    _check_launch_args(logits, labels)
    N, T, V = logits.shape
    grad = logits if inplace else torch.empty((N, T, V), dtype=logits.dtype, device=logits.device)
    if N * T == 0:
        return grad
    cfg = logps_config(V, block_v)
    with _device_guard(logits):
        _logps_bwd_kernel[(N * T,)](
            logits, labels, lse, grad_logp, grad,
            logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            grad_logp.stride(0), grad_logp.stride(1), grad.stride(0), grad.stride(1),
            T, T - int(shift), N * (T - int(shift)), V, ignore_index, 1.0 / temperature,
            SHIFT=int(shift), BLOCK_V=cfg.block_v, num_warps=cfg.num_warps,
        )  # fmt: skip
    return grad
