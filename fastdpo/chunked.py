"""PyTorch path for the log-prob op: the same maths as ``fastdpo.kernels.logps``, chunked over rows.

Used when Triton cannot run (CPU without ``TRITON_INTERPRET=1``, no Triton installed, float64 logits). It keeps
the kernels' memory behaviour: the float32 working copy is at most ``CHUNK_ELEMENTS`` logits, never N x T x V,
and the gradient is written chunk by chunk into one buffer of the logits' dtype (or into the logits).
Math runs in float32, or float64 for float64 logits (which is what makes ``gradcheck`` possible here).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# 4M logits per chunk: a 16 MB float32 working set (32 MB in float64), small next to any real logits
# tensor and large enough that per-chunk Python overhead stays negligible.
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(N: int, T: int, V: int) -> Iterator[tuple[slice, slice]]:
    """(sequence slice, position slice) blocks of at most ~CHUNK_ELEMENTS logits."""
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    t_step = min(T, rows)
    n_step = max(1, rows // max(T, 1))
    for n0 in range(0, N, n_step):
        for t0 in range(0, T, t_step):
            yield slice(n0, n0 + n_step), slice(t0, t0 + t_step)


def _row_labels(labels: torch.Tensor, shift: bool, T: int, ignore_index: int) -> torch.Tensor:
    """Label of every logits row ``[N, T]``; with shift, row t gets labels[:, t + 1] and the last row is unscored."""
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)[:, :T]


def logps_fwd(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, ignore_index: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``fastdpo.kernels.logps.logps_fwd``; float64 outputs for float64 logits."""
    N, T, V = logits.shape
    T_rows = T - int(shift)
    out_dtype = _compute_dtype(logits.dtype)
    logp = torch.zeros((N, T_rows), dtype=out_dtype, device=logits.device)
    lse = torch.zeros((2, N, T_rows), dtype=out_dtype, device=logits.device)  # (row max, log rescaled sum)
    row_labels = _row_labels(labels, shift, T, ignore_index)[:, :T_rows]
    for ns, ts in _chunks(N, T_rows, V):
        y = row_labels[ns, ts]
        scored = y != ignore_index
        z = logits[ns, ts].to(out_dtype) / temperature
        row_max = z.amax(-1)
        row_max = torch.where(row_max == -torch.inf, 0.0, row_max)  # an all -inf row keeps max 0, as in the kernel
        in_vocab = (y >= 0) & (y < V)
        z_label = z.gather(-1, torch.where(in_vocab, y, 0).unsqueeze(-1)).squeeze(-1)
        z_label = torch.where(in_vocab, z_label, torch.nan)  # out-of-vocabulary label: nan, never a wrong value
        log_norm = z.sub_(row_max.unsqueeze(-1)).exp_().sum(-1).log_()
        logp[ns, ts] = torch.where(scored, (z_label - row_max) - log_norm, 0.0)
        lse[0, ns, ts] = torch.where(scored, row_max, 0.0)
        lse[1, ns, ts] = torch.where(scored, log_norm, 0.0)
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
) -> torch.Tensor:
    """Same contract as ``fastdpo.kernels.logps.logps_bwd``."""
    N, T, V = logits.shape
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    work_dtype = _compute_dtype(logits.dtype)
    row_labels = _row_labels(labels, shift, T, ignore_index)
    pad = (0, int(shift))  # the last row has no lse / grad entry when shifted
    max_rows, log_norm_rows = torch.nn.functional.pad(lse.to(work_dtype), pad)
    grad_rows = torch.nn.functional.pad(grad_logp.to(work_dtype), pad)
    for ns, ts in _chunks(N, T, V):
        y = row_labels[ns, ts]
        scored = y != ignore_index
        coef = torch.where(scored, grad_rows[ns, ts], 0.0) / temperature
        z = logits[ns, ts].to(work_dtype) / temperature
        # dz = coef * (onehot(y) - softmax(z)), built in place on the chunk's working copy
        z.sub_(max_rows[ns, ts].unsqueeze(-1)).sub_(log_norm_rows[ns, ts].unsqueeze(-1))
        dz = z.exp_().mul_(-coef.unsqueeze(-1))
        hit = scored & (y >= 0) & (y < V)
        dz.scatter_add_(-1, torch.where(hit, y, 0).unsqueeze(-1), torch.where(hit, coef, 0.0).unsqueeze(-1))
        grad[ns, ts] = dz.masked_fill_(~scored.unsqueeze(-1), 0.0)  # exp(z - 0) may overflow on unscored rows
    return grad
