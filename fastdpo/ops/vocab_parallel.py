"""Vocab (tensor) parallel log-probs: each rank holds a shard ``[N, T, V_s]`` of the logits, covering global vocab
ids ``[start_s, start_s + V_s)``; labels are global ids, replicated.

Forward, per rank: the logits kernels run on the shard with labels made local (``label - start_s``; a label another
rank owns becomes a sentinel outside ``[0, V_s)``), giving per token the shard's (max m_s, log l_s), its label
log-prob where it owns the label, and its partial statistics. Then all-reduces of O(N T) floats, nothing of size
V (r = e^(m_s - m)):

    m = max_s m_s                                   (all-reduce MAX)
    l = sum_s l_s r                                 (all-reduce SUM)
    logp = logp_s - ((m - m_s) + (log l - log l_s))  on the owner, 0 elsewhere   (all-reduce SUM)
    H = log l - sum_s r (h_s + (m_s - m) l_s) / l,  h_s = l_s (log l_s - H_s)    (entropy; in the SUM above)
    log sum p^2 = log sum_s r^2 q_s - 2 log l,  q_s = l_s^2 e^(log sum p_s^2)   (WPO)
    mean logit = sum_s V_s mean_s / V
    top-1: the owner's shard-local top-1 (then z_label = m_owner exactly), m_owner >= m, and m_owner > the max of
           every shard wholly before the label's id (the first argmax wins ties)

Backward: no communication. The shard's gradient is its slice of the unsharded one, written by the same backward
kernel from the *global* (m, log l) and entropy: dz = g (onehot - e^(z - m - log l)) - g_H p (log p + H).

Every rank returns the same (replicated) log-probs and receives the same upstream gradient; nothing is scaled by
the group size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastdpo._logps_outputs import STATS
from fastdpo.ops.logps import LogpsOptions, TokenOutputs, impl_for, kernel_kw


def local_labels(labels: torch.Tensor, start: int, V_local: int, ignore_index: int) -> torch.Tensor:
    """Global label ids -> this shard's: ``label - start`` where owned, a sentinel outside ``[0, V_local)`` (and
    different from ``ignore_index``) where another rank owns it, ``ignore_index`` kept."""
    not_owned = -1 if ignore_index != -1 else -2
    owned = (labels >= start) & (labels < start + V_local)
    return torch.where(labels == ignore_index, ignore_index, torch.where(owned, labels - start, not_owned))


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


class VocabParallelLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, options: LogpsOptions, group, start: int, V_total: int):
        o = options
        V_local = logits.shape[-1]
        local = local_labels(labels, start, V_local, o.ignore_index)
        kw = kernel_kw(o.shift, o.ignore_index, o.temperature, o.logit_scale, o.softcap)
        impl = impl_for(logits)
        out = impl.logps_fwd(logits, local, stats=o.stats, **kw)
        row_labels = labels[:, int(o.shift) :]
        scored = row_labels != o.ignore_index
        owned = scored & (row_labels >= start) & (row_labels < start + V_local)
        log_l_s = out.lse[1]
        m_s = torch.where(log_l_s == -torch.inf, -torch.inf, out.lse[0])  # a shard with no finite logit: no max
        m = _all_reduce(m_s.clone(), dist.ReduceOp.MAX, group)
        l = _all_reduce(torch.exp(log_l_s + (m_s - m)), dist.ReduceOp.SUM, group)
        log_l = torch.where(scored, torch.log(l), 0.0)
        r = torch.where(m_s == -torch.inf, 0.0, torch.exp(m_s - m))
        # one SUM carries the owner's log-prob and label logit, and every rank's partial entropy / log sum p^2 terms
        parts = {"logp": torch.where(owned, out.logp - ((m - m_s) + (log_l - log_l_s)), 0.0)}
        stat = {name: out.stats[STATS.index(name)] for name in o.stats}
        if "entropy" in stat:
            l_s = torch.exp(log_l_s)
            h_s = l_s * (log_l_s - stat["entropy"])
            parts["entropy"] = torch.where(r > 0, r * (h_s + (m_s - m) * l_s), 0.0)
        if "log_sum_sq_probs" in stat:
            parts["sum_sq"] = r * r * torch.exp(stat["log_sum_sq_probs"] + 2 * log_l_s)
        if "mean_logits" in stat:
            parts["mean_logits"] = stat["mean_logits"] * (V_local / V_total)
        if "is_top1" in stat:
            # Where the label is its shard's first argmax, its logit *is* the shard max m_s: compare that exact value
            # with the other shards' maxima (rebuilding z_label from logp + m + log l would round).
            parts["z_label"] = torch.where(owned, m_s, 0.0)
            parts["top1_owner"] = torch.where(owned, stat["is_top1"], 0.0)
        summed = _all_reduce(torch.stack(list(parts.values())), dist.ReduceOp.SUM, group)
        total = dict(zip(parts, summed))
        logp = torch.where(scored, total["logp"], 0.0)
        stats_out = torch.zeros_like(out.stats) if o.stats else None
        entropy = None
        if "entropy" in stat:
            entropy = torch.where(scored, log_l - total["entropy"] / l, 0.0)
            stats_out[STATS.index("entropy")] = entropy
        if "log_sum_sq_probs" in stat:
            log_sum_sq = torch.log(total["sum_sq"]) - 2 * log_l
            stats_out[STATS.index("log_sum_sq_probs")] = torch.where(scored, log_sum_sq, 0.0)
        if "mean_logits" in stat:
            stats_out[STATS.index("mean_logits")] = torch.where(scored, total["mean_logits"], 0.0)
        if "is_top1" in stat:
            before = (start + V_local <= row_labels) & scored  # this whole shard precedes the label's id
            b = _all_reduce(torch.where(before, m_s, -torch.inf), dist.ReduceOp.MAX, group)
            z = total["z_label"]
            top1 = (total["top1_owner"] > 0.5) & (z >= m) & (z > b) & scored
            stats_out[STATS.index("is_top1")] = top1.to(stats_out.dtype)
        lse = torch.stack([torch.where(scored, m, 0.0), log_l])
        ctx.save_for_backward(logits, local, lse, entropy)
        ctx.kw = kw
        ctx.inplace = o.inplace_backward
        ctx.set_materialize_grads(False)
        if stats_out is not None:
            ctx.mark_non_differentiable(stats_out)
        return logp, None if entropy is None else entropy.clone(), stats_out

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        logits, local, lse, entropy = ctx.saved_tensors
        if (grad_logp is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return (None,) * 6
        grad = impl_for(logits).logps_bwd(logits, local, lse, grad_logp, entropy=entropy,
                                          grad_entropy=grad_entropy, inplace=ctx.inplace, **ctx.kw)  # fmt: skip
        return (grad,) + (None,) * 5


def token_logps(logits, labels, options: LogpsOptions, group, start: int, V_total: int,
                ref_logits=None) -> TokenOutputs:  # fmt: skip
    """``fastdpo.ops.logps.token_logps`` for a vocab shard; ``ref_logits`` (the reference's shard) are scored by a
    second, forward-only call."""
    logp, entropy, stats = VocabParallelLogps.apply(logits, labels, options, group, start, V_total)
    ref_logp = None
    if ref_logits is not None:
        with torch.no_grad():
            ref_logp = VocabParallelLogps.apply(ref_logits, labels, LogpsOptions(
                shift=options.shift, ignore_index=options.ignore_index, temperature=options.temperature), group,
                start, V_total)[0]  # fmt: skip
    return TokenOutputs(logp, entropy, stats, ref_logp, None)


def shard_layout(logits: torch.Tensor, group, start: int | None) -> tuple[int, int]:
    """(this rank's first vocab id, the global vocab size), checked across the group with one all-gather: the
    shards must tile ``[0, V)`` without gap or overlap. Default ``start``: equal contiguous shards in rank order."""
    V_local = logits.shape[-1]
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if start is None:
        start = rank * V_local
    mine = torch.tensor([start, V_local], dtype=torch.long, device=_collective_device(group))
    ranges = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(ranges, mine, group=group)
    spans = sorted((int(a), int(a) + int(n)) for a, n in (r.tolist() for r in ranges))
    V_total = sum(b - a for a, b in spans)
    if spans[0][0] != 0 or any(prev[1] != nxt[0] for prev, nxt in zip(spans, spans[1:])):
        raise ValueError(f"vocab shards must tile [0, V) in order without gaps or overlaps; got [start, end) = {spans}"
                         " (pass vocab_start_index for uneven shards)")  # fmt: skip
    return start, V_total


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def from_dtensor(logits):
    """(local shard, process group, first vocab id) of a DTensor sharded on its last dimension over a 1-D mesh
    (``ColwiseParallel(output_layouts=Shard(-1))``); the shard keeps the DTensor's autograd link."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = logits.placements
    if logits.device_mesh.ndim != 1 or not (isinstance(placements[0], Shard) and
                                             placements[0].dim in (logits.ndim - 1, -1)):  # fmt: skip
        raise ValueError(f"a DTensor of logits must be sharded on the vocab dimension over a 1-D mesh (Shard(2)), "
                         f"got placements {placements} on a {logits.device_mesh.ndim}-D mesh")  # fmt: skip
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, placements)
    return logits.to_local(), logits.device_mesh.get_group(), int(offset[-1])
