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

Fused-linear path (``VocabParallelFusedLinear``): the rank holds rows ``[start_s, start_s + V_s)`` of the LM head
and the replicated hidden states; its shard of the logits is projected tile by tile and merged as above. The one
extra collective is in the backward: dH = sum_s dX_s W_s, an all-reduce of ``[R, D]`` in hidden's dtype, which
hands every rank the full gradient of its (replicated) hidden states, the convention of Megatron's
``ColumnParallelLinear`` (the backward of ``copy_to_tensor_model_parallel_region``) and of torch's ``ColwiseParallel``
(a ``Replicate`` input whose ``Partial`` gradient is reduced).
"""

from __future__ import annotations

import operator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from fastdpo._collectives import gather_ints
from fastdpo._logps_outputs import STATS
from fastdpo.ops.fused_linear import compute_dtype
from fastdpo.ops.logps import (
    LogpsOptions,
    TokenOutputs,
    impl_for,
    kernel_kw,
    logits_gradient,
    stats_mask,
)

# The shard's kernels see local labels with their own ignore value: a non-negative ignore_index (a pad token id used
# as the label pad) could equal an owned local id ``label - start`` and unscore it on the shard.
LOCAL_IGNORE = -1  # the kernels' ignore_index for local labels
NOT_OWNED = -2  # a scored label another rank owns: outside [0, V_local), so the shard reads no logit for it


def local_labels(labels: torch.Tensor, start: int, V_local: int, ignore_index: int) -> torch.Tensor:
    """Global label ids -> this shard's: ``label - start`` where owned, ``NOT_OWNED`` where another rank owns it,
    ``LOCAL_IGNORE`` where the label is ``ignore_index`` (the kernels run with ``ignore_index=LOCAL_IGNORE``)."""
    owned = (labels >= start) & (labels < start + V_local)
    return torch.where(labels == ignore_index, LOCAL_IGNORE, torch.where(owned, labels - start, NOT_OWNED))


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def merge_shards(logp_s, lse_s, stats_s, row_labels, stat_names, ignore_index, group, start: int, V_local: int,
                 V_total: int):  # fmt: skip
    """The global per-token outputs from this shard's, by the all-reduces in the module docstring.

    ``logp_s`` ``[...]``, ``lse_s`` ``[2, ...]`` (shard max, log sum), ``stats_s`` ``[len(STATS), ...]`` or None:
    what the logits kernels return for this shard with local labels; ``row_labels`` ``[...]``: the global label each
    row scores. Returns (logp, entropy or None, stats or None, lse ``[2, ...]``), lse being the global (m, log l)
    that the backward kernel needs."""
    scored = row_labels != ignore_index
    owned = scored & (row_labels >= start) & (row_labels < start + V_local)
    log_l_s = lse_s[1]
    m_s = torch.where(log_l_s == -torch.inf, -torch.inf, lse_s[0])  # a shard with no finite logit: no max
    m = _all_reduce(m_s.clone(), dist.ReduceOp.MAX, group)
    l_sum = _all_reduce(torch.exp(log_l_s + (m_s - m)), dist.ReduceOp.SUM, group)
    log_l = torch.where(scored, torch.log(l_sum), 0.0)
    r = torch.where(m_s == -torch.inf, 0.0, torch.exp(m_s - m))
    # one SUM carries the owner's log-prob and label logit, and every rank's partial entropy / log sum p^2 terms
    parts = {"logp": torch.where(owned, logp_s - ((m - m_s) + (log_l - log_l_s)), 0.0)}
    stat = {name: stats_s[STATS.index(name)] for name in stat_names}
    if "entropy" in stat:
        l_s = torch.exp(log_l_s)
        h_s = l_s * (log_l_s - stat["entropy"])
        parts["entropy"] = torch.where(r > 0, r * (h_s + (m_s - m) * l_s), 0.0)
    if "log_sum_sq_probs" in stat:
        # a shard with no finite logit (r = 0) has log sum p_s^2 = nan (-inf + inf): it adds nothing
        parts["sum_sq"] = torch.where(r > 0, r * r * torch.exp(stat["log_sum_sq_probs"] + 2 * log_l_s), 0.0)
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
    stats_out = torch.zeros_like(stats_s) if stat_names else None
    entropy = None
    if "entropy" in stat:
        entropy = torch.where(scored, log_l - total["entropy"] / l_sum, 0.0)
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
    return logp, entropy, stats_out, torch.stack([torch.where(scored, m, 0.0), log_l])


def _outputs(ctx, logp, entropy, stats):
    """The Functions' outputs (logp, entropy, stats): the statistics carry no gradient, and an unused output's
    gradient comes back as None rather than zeros. The entropy is returned as a copy because the saved one is
    needed by the backward."""
    ctx.set_materialize_grads(False)
    if stats is not None:
        ctx.mark_non_differentiable(stats)
    return logp, None if entropy is None else entropy.clone(), stats


class VocabParallelLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, options: LogpsOptions, group, start: int, V_total: int):
        o = options
        V_local = logits.shape[-1]
        local = local_labels(labels, start, V_local, o.ignore_index)
        kw = kernel_kw(o.shift, LOCAL_IGNORE, o.temperature, o.logit_scale, o.softcap)
        out = impl_for(logits).logps_fwd(logits, local, stats=o.stats, **kw)
        logp, entropy, stats, lse = merge_shards(out.logp, out.lse, out.stats, labels[:, int(o.shift) :], o.stats,
                                                 o.ignore_index, group, start, V_local, V_total)  # fmt: skip
        ctx.save_for_backward(logits, local, lse, entropy)
        ctx.kw = kw
        ctx.inplace = o.inplace_backward
        return _outputs(ctx, logp, entropy, stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        # the shard's gradient with the global (m, log l), exactly as on one device (in place, traced or not)
        return (logits_gradient(ctx, grad_logp, grad_entropy),) + (None,) * 5


class VocabParallelFusedLinear(torch.autograd.Function):
    """Per-token outputs of ``hidden @ weight.T (+ bias)`` with ``weight`` this rank's rows ``[V_s, D]`` of the LM
    head and ``hidden`` ``[R, D]`` replicated. The fused-linear op projects and sweeps the shard tile by tile; the
    outputs are merged as for logits. Backward: the fused backward with the global (m, log l) and entropy gives
    this shard's dX; dW_s = dX^T H and db_s are this rank's slices of the full gradients, and dH = dX W_s is a partial
    sum over the shards, all-reduced here, because hidden is replicated (each rank receives the full gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options, matmul_dtype, group, start: int, V_total: int):
        o = options
        V_local = weight.shape[0]
        local = local_labels(targets, start, V_local, o.ignore_index)
        args = (LOCAL_IGNORE, o.temperature, o.logit_scale, o.softcap)
        mask = stats_mask(o.stats)
        logp_s, lse_s, _, stats_s = torch.ops.fastdpo.fused_linear_logps(
            hidden, weight, bias, local, *args, mask, o.tile_elements, matmul_dtype
        )
        logp, entropy, stats, lse = merge_shards(logp_s, lse_s, stats_s if mask else None, targets, o.stats,
                                                 o.ignore_index, group, start, V_local, V_total)  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, local, lse, entropy)
        ctx.args = (*args, o.tile_elements, matmul_dtype)
        ctx.group = group
        return _outputs(ctx, logp, entropy, stats)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_stats):
        hidden, weight, bias, local, lse, entropy = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None]
        if entropy is None:
            grad_entropy = None
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return (None,) * 9
        grad_h, grad_w, grad_b = torch.ops.fastdpo.fused_linear_logps_backward(
            hidden, weight, bias, local, lse, entropy, grad_logp, grad_entropy, *ctx.args, needs
        )
        if needs[0]:
            dist.all_reduce(grad_h, group=ctx.group)
        return (grad_h if needs[0] else None, grad_w if needs[1] else None, grad_b if needs[2] else None) + (None,) * 6


def fused_linear_logps(hidden, weight, bias, targets, options, group, start: int, V_total: int):
    """``fastdpo.ops.fused_linear.fused_linear_logps`` for a vocab shard of the head: (logp [R], entropy [R] or
    None, stats [len(STATS), R] or None), replicated on every rank."""
    return VocabParallelFusedLinear.apply(hidden, weight, bias, targets, options, compute_dtype(hidden, weight),
                                          group, start, V_total)  # fmt: skip


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


def labels_digest(labels: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 digest of ``labels``: sum_i w_i labels_i with weights w_i = i mod 65521 + 1 (no overflow below
    ~5e8 labels of a 256K vocabulary). Equal labels give equal digests; labels that differ in one position always
    give different ones (a nonzero difference times w_i >= 1), in several almost always (a check, not a proof)."""
    flat = labels.reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device) % 65521 + 1
    return (flat * weights).sum()


SAMPLE = 64  # values of a shard compared across ranks (``shard_layout``)


def vocab_sample(shard: torch.Tensor, vocab_dim: int) -> torch.Tensor | None:
    """Up to ``SAMPLE`` values of ``shard`` along its vocab dimension at index 0 of the others (a view: logits
    ``[..., V_s]`` with ``vocab_dim=-1``, head rows ``[V_s, D]`` with 0); None for an empty shard or a non-tensor
    (refused by the checks that follow)."""
    if not isinstance(shard, torch.Tensor) or shard.numel() == 0:
        return None
    along = shard.movedim(vocab_dim, -1)
    return along[(0,) * (along.ndim - 1)][:SAMPLE]


def _sample_digest(sample: torch.Tensor | None) -> tuple:
    """(digest of ``sample``'s float32 bits, whether it is judged), 0-d tensors; (-1, 0) for no sample. Weights
    1..64 on int32 bit patterns cannot overflow int64; equal samples give equal digests. Judged: finite values not
    all alike (NaN logits on every rank must give a NaN loss, which a NaN guard can skip, not this error)."""
    if sample is None:
        return -1, 0
    bits = sample.detach().float().view(torch.int32).long()
    weights = torch.arange(1, bits.numel() + 1, device=bits.device)
    return (bits * weights).sum(), (sample != sample[0]).any() & torch.isfinite(sample).all()


def shard_layout(V_local: int, group, start: int | None, device: torch.device | None = None, rows_of=None,
                 labels=None, sample: torch.Tensor | None = None):  # fmt: skip
    """(this rank's first vocab id, the global vocab size) for a shard of ``V_local`` ids, checked across the group
    with one all-gather of seven integers per rank and one host sync: the shards must tile ``[0, V)`` without gap or
    overlap, none empty, and every rank must hold the same rows (the leading dimensions of ``rows_of``, its logits
    or hidden states: only the vocabulary is sharded; collectives of different sizes would crash or hang) and the
    same ``labels`` (compared by ``labels_digest``: ranks scoring different labels would merge into a wrong result
    on every rank, silently). ``sample`` (``vocab_sample`` of the shard) catches every rank passing the same values,
    e.g. the whole logits with the default offsets: they tile ``[0, world * V)`` and every log-prob would come out
    low by log(world); values equal on every rank and not all alike within the sample are refused (shards of a real
    head differ; a constant sample, e.g. a zero-initialised head, is not judged). Default ``start``: equal
    contiguous shards in rank order. Every call checks (a rank that skipped the collective because its own shard did
    not change would hang the others); a DTensor carries its layout and needs no check (``from_dtensor``,
    ``head_from_dtensor``). Every rank sees the same gathered values, so every rank raises alike.

    Under ``torch.compile`` the layout is not checked (a graph cannot branch on gathered values; the other value
    checks are skipped there too): V is ``world * V_local`` for the default shards, else a 0-d tensor, the sum of
    the shard sizes (one all-reduce, no host sync)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    default = start is None
    if default:
        start = rank * V_local
    if torch.compiler.is_compiling():
        if default:
            return start, world * V_local
        # a functional collective: torch 2.10's Dynamo cannot trace dist.get_backend (which collective_device asks)
        shard_size = torch.tensor(V_local, dtype=torch.float32, device=device)
        return start, funcol.wait_tensor(funcol.all_reduce(shard_size, "sum", group))
    try:
        start = operator.index(start)
    except TypeError:
        raise TypeError(f"vocab_start_index must be an int (this rank's first vocab id), got {start!r}") from None
    rows = rows_of.shape[:-1] if isinstance(rows_of, torch.Tensor) else ()  # a non-tensor is refused later
    lead = (*(int(n) for n in rows), -1, -1)[:2]  # a fixed count, so that the all-gather matches on every rank
    digest = labels_digest(labels) if isinstance(labels, torch.Tensor) else -1
    gathered = gather_ints([start, V_local, *lead, digest, *_sample_digest(sample)], group, device)
    if any(g[2:4] != gathered[0][2:4] for g in gathered):
        dims = [tuple(n for n in g[2:4] if n >= 0) for g in gathered]
        raise ValueError(f"every rank of vocab_parallel_group must hold the same rows and positions (only the vocab is "
                         f"sharded); got leading dimensions {dims} by rank")  # fmt: skip
    if any(g[4] != gathered[0][4] for g in gathered):
        raise ValueError("every rank of vocab_parallel_group must pass the same labels (global ids, replicated over "
                         "the group); the ranks' labels differ")  # fmt: skip
    if len(gathered) > 1 and all(g[5:] == gathered[0][5:] for g in gathered) and gathered[0][6]:
        raise ValueError("every rank of vocab_parallel_group passed the same vocab values: each rank must pass its "
                         "own shard of the vocabulary (the logits' last dimension, or the head's rows), not the whole "
                         "of it; the whole on every rank would score each token against world copies of the "
                         "vocabulary, every log-prob low by log(world)")  # fmt: skip
    if any(n <= 0 for _, n, *_ in gathered):
        raise ValueError(f"every rank of vocab_parallel_group needs a non-empty vocab shard; got shard sizes "
                         f"{[n for _, n, *_ in gathered]} by rank")  # fmt: skip
    spans = sorted((a, a + n) for a, n, *_ in gathered)
    V_total = sum(b - a for a, b in spans)
    if spans[0][0] != 0 or any(prev[1] != nxt[0] for prev, nxt in zip(spans, spans[1:])):
        raise ValueError(f"vocab shards must tile [0, V) in order without gaps or overlaps; got [start, end) = {spans}"
                         " (pass vocab_start_index for uneven shards)")  # fmt: skip
    return start, V_total


def from_dtensor(logits, name: str = "logits"):
    """(local shard, process group, first vocab id, global vocab size) of a DTensor sharded on its last dimension
    over a 1-D mesh (``ColwiseParallel(output_layouts=Shard(-1))``); the shard keeps the DTensor's autograd link.
    ``name``: the argument, for the error message."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = logits.placements
    if logits.device_mesh.ndim != 1 or not (isinstance(placements[0], Shard) and
                                             placements[0].dim in (logits.ndim - 1, -1)):  # fmt: skip
        raise ValueError(f"a DTensor of {name} must be sharded on the vocab dimension over a 1-D mesh (Shard(2)), "
                         f"got placements {placements} on a {logits.device_mesh.ndim}-D mesh")  # fmt: skip
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, placements)
    return logits.to_local(), logits.device_mesh.get_group(), int(offset[-1]), logits.shape[-1]


def head_from_dtensor(weight, group):
    """(local rows, process group, first vocab id, global vocab size) of an LM-head weight DTensor sharded on its rows
    over a 1-D mesh (``Shard(0)``, as ``ColwiseParallel`` leaves ``lm_head.weight``); ``group`` (the mesh or its
    process group) must be that mesh's. The local rows keep the DTensor's autograd link."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(f"a vocab-parallel DTensor weight must be sharded on its rows over a 1-D mesh (Shard(0)), "
                         f"got placements {placements} on a {mesh.ndim}-D mesh")  # fmt: skip
    if group is not mesh and group != mesh.get_group() and not (isinstance(group, DeviceMesh) and group == mesh):
        raise ValueError("vocab_parallel_group must be the weight DTensor's device mesh (or its process group)")
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    return weight.to_local(), mesh.get_group(), int(offset[0]), weight.shape[0]
