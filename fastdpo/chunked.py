"""PyTorch path for the log-prob op: the same contract as ``fastdpo.kernels.logps``, chunked over rows.

Used when Triton cannot run (CPU without ``TRITON_INTERPRET=1``, no Triton installed, float64 logits). It keeps
the kernels' memory behaviour: the float32 working copy is at most ``CHUNK_ELEMENTS`` logits, never N x T x V,
and the gradient is written chunk by chunk into one buffer of the logits' dtype (or into the logits).
Math runs in float32, or float64 for float64 logits (which is what makes ``gradcheck`` possible here), on
the same (row max, log sum) pair as the kernels. PyTorch's fused ``log_softmax`` would save a pass or two but
sums less precisely on CPU (1e-5 in log-probs at V = 2^18), so the sums here are explicit ``torch.sum``s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from fastdpo._logps_outputs import STATS, LogpsForward, check_stats

# 4M logits per chunk: a 16 MB float32 working set (32 MB in float64), small next to any real logits
# tensor; smaller chunks measured slower on CPU (per-op overhead outweighs cache reuse).
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(N: int, T: int, V: int) -> Iterator[tuple[slice, slice]]:
    """(sequence slice, position slice) blocks of at most ~CHUNK_ELEMENTS logits."""
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    t_step = max(1, min(T, rows))
    n_step = max(1, rows // max(T, 1))
    for n0 in range(0, N, n_step):
        for t0 in range(0, T, t_step):
            yield slice(n0, n0 + n_step), slice(t0, t0 + t_step)


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1)`` in an order that does not depend on how many rows ``x`` has. PyTorch's CPU reduction of a single
    output longer than its grain size (32768) splits the row across threads, so a lone row would sum in another
    order than the same row in a chunk of many; a broadcast second row keeps it on the per-row path."""
    if x[..., 0].numel() == 1:
        return x.reshape(1, -1).expand(2, -1).sum(-1)[:1].reshape(x.shape[:-1])
    return x.sum(-1)


def _row_labels(labels: torch.Tensor, shift: bool, T: int, ignore_index: int) -> torch.Tensor:
    """Label of every logits row ``[N, T]``; with shift, row t gets labels[:, t + 1] and the last row is unscored."""
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)[:, :T]


class _Transform(NamedTuple):
    """z = f(x): a x / temperature, or c tanh(a x / c) / temperature with softcap c (as in the kernels)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    def apply(self, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A working copy f(chunk) in ``dtype``, free to modify in place."""
        z = chunk.to(dtype, copy=True)
        if self.logit_scale != 1.0:
            z.mul_(self.logit_scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z if self.temperature == 1.0 else z.div_(self.temperature)

    def derivative(self, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
        """f'(x): a / temperature, times 1 - tanh^2(a x / c) with softcapping."""
        scale = self.logit_scale / self.temperature
        if self.softcap is None:
            return scale
        t = chunk.to(dtype).mul(self.logit_scale / self.softcap).tanh_()
        return t.square_().neg_().add_(1.0).mul_(scale)


def _fwd_one(logits, row_labels, V, *, ignore_index, transform: _Transform, stats):
    """(logp, lse, stats) of one logits tensor, as ``LogpsForward`` lays them out."""
    N, T_rows = row_labels.shape
    rows = dict(dtype=_compute_dtype(logits.dtype), device=logits.device)
    logp, lse = torch.zeros((N, T_rows), **rows), torch.zeros((2, N, T_rows), **rows)
    stats_out = torch.zeros((len(STATS), N, T_rows), **rows) if stats else None
    for ns, ts in _chunks(N, T_rows, V):
        y = row_labels[ns, ts]
        scored = y != ignore_index
        in_vocab = (y >= 0) & (y < V)
        z = transform.apply(logits[ns, ts], rows["dtype"])
        row_max = z.amax(-1)  # amax, not argmax: several times faster on CPU
        row_max = torch.where(row_max == -torch.inf, 0.0, row_max)  # an all -inf row keeps max 0, as the kernel
        picked = z.gather(-1, torch.where(in_vocab, y, 0).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(in_vocab, picked, torch.nan)  # out-of-vocabulary label: nan, never a wrong value
        values = {}
        if "mean_logits" in stats:
            values["mean_logits"] = _row_sums(z) / V
        if "is_top1" in stats:
            values["is_top1"] = (z.argmax(-1) == y).to(rows["dtype"])
        shifted = z.sub_(row_max.unsqueeze(-1))
        e = shifted.exp() if "entropy" in stats else shifted.exp_()  # in place unless z - m is still needed
        norm = _row_sums(e)  # torch.sum sums in cascade: as precise as the kernels' block sums
        log_norm = norm.log()
        if "entropy" in stats:  # H = log l - sum e (z - m) / l; 0 log 0 = 0 on masked vocab
            values["entropy"] = log_norm - _row_sums(torch.where(e > 0, e * shifted, 0.0)) / norm
        if "log_sum_sq_probs" in stats:
            values["log_sum_sq_probs"] = _row_sums(e.square_()).log() - 2 * log_norm
        logp[ns, ts] = torch.where(scored, (picked - row_max) - log_norm, 0.0)
        lse[0, ns, ts] = torch.where(scored, row_max, 0.0)
        lse[1, ns, ts] = torch.where(scored, log_norm, 0.0)
        for name, value in values.items():
            stats_out[STATS.index(name), ns, ts] = torch.where(scored, value, 0.0)
    return logp, lse, stats_out


def logps_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    ignore_index: int,
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ref_logits: torch.Tensor | None = None,
    stats: tuple[str, ...] = (),
) -> LogpsForward:
    """Same contract as ``fastdpo.kernels.logps.logps_fwd``; float64 outputs for float64 logits."""
    check_stats(stats)
    N, T, V = logits.shape
    T_rows = T - int(shift)
    row_labels = _row_labels(labels, shift, T, ignore_index)[:, :T_rows]
    kw = dict(ignore_index=ignore_index, transform=_Transform(temperature, logit_scale, softcap), stats=stats)
    logp, lse, stats_out = _fwd_one(logits[:, :T_rows], row_labels, V, **kw)  # scored rows only
    ref_logp = ref_stats = None
    if ref_logits is not None:
        ref_logp, _, ref_stats = _fwd_one(ref_logits[:, :T_rows], row_labels, V, **kw)
    return LogpsForward(logp, lse, stats_out, ref_logp, ref_stats)


def logps_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor | None,
    *,
    shift: bool,
    ignore_index: int,
    temperature: float,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    inplace: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``fastdpo.kernels.logps.logps_bwd``."""
    N, T, V = logits.shape
    if out is None:
        out = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    grad = out
    work = _compute_dtype(logits.dtype)
    transform = _Transform(temperature, logit_scale, softcap)

    def rows(x):  # [N, T - shift] -> [N, T]: the last row has no entry when shifted
        return None if x is None else torch.nn.functional.pad(x.to(work), (0, int(shift)))

    row_labels = _row_labels(labels, shift, T, ignore_index)
    g_logp, g_ent, ent = rows(grad_logp), rows(grad_entropy), rows(entropy)
    max_rows, log_norm_rows = rows(lse)
    for ns, ts in _chunks(N, T, V):
        y = row_labels[ns, ts]
        scored = y != ignore_index
        z = transform.apply(logits[ns, ts], work)
        log_p = z.sub_(max_rows[ns, ts].unsqueeze(-1)).sub_(log_norm_rows[ns, ts].unsqueeze(-1))
        if g_ent is None:  # -g p everywhere; the label's entry is replaced below
            dz = log_p.exp_().mul_(-g_logp[ns, ts].unsqueeze(-1))
        else:  # - g_H p (log p + H)
            p = log_p.exp()
            dz = torch.where(p > 0, p * (log_p + ent[ns, ts].unsqueeze(-1)), 0.0)
            dz.mul_(-g_ent[ns, ts].unsqueeze(-1))
            if g_logp is not None:
                dz.sub_(p * g_logp[ns, ts].unsqueeze(-1))
        if g_logp is not None:  # the label's entry, g (1 - p) = -g expm1(log p), from the log-prob as the kernel
            hit = (scored & (y >= 0) & (y < V)).unsqueeze(-1)
            index = torch.where(hit, y.unsqueeze(-1), 0)
            z_label = transform.apply(logits[ns, ts].gather(-1, index), work)
            lp = (z_label - max_rows[ns, ts].unsqueeze(-1)) - log_norm_rows[ns, ts].unsqueeze(-1)
            value = -torch.expm1(lp.clamp(max=0.0)) * g_logp[ns, ts].unsqueeze(-1)
            if g_ent is not None:
                p_label = lp.exp()
                entropy_term = torch.where(p_label > 0, p_label * (lp + ent[ns, ts].unsqueeze(-1)), 0.0)
                value = value - g_ent[ns, ts].unsqueeze(-1) * entropy_term
            dz.scatter_(-1, index, torch.where(hit, value, dz.gather(-1, index)))
        if transform != _Transform():
            dz.mul_(transform.derivative(logits[ns, ts], work))  # dlogits = dz f'(x)
        grad[ns, ts] = dz.masked_fill_(~scored.unsqueeze(-1), 0.0)  # unscored rows: 0, whatever they hold
    return grad
