"""Triton kernels: per-token log-probabilities of labels, read straight from strided logits.

Maths, per scored row r = (n, t) with label y = labels[n, t + SHIFT] and z = f(logits[n, t, :]), where
f(x) = a x / temperature, or c tanh(a x / c) / temperature with softcapping (Gemma's final_logit_softcapping c,
Cohere's logit scale a; the fused-linear path feeds raw projection tiles through it):

    lse[r]  = m + log l,  m = max_v z[v],  l = sum_v exp(z[v] - m)    (online, one read of the row in
              BLOCK_V chunks: m' = max(m, max_b z); l' = l e^(m - m') + sum_b e^(z - m'))
    logp[r] = (z[y] - m) - log l
    dz[v] = g[r] (1[v = y] - exp((z[v] - m) - log l)) - g_H[r] p[v] (log p[v] + H[r])   (g_H: entropy's grad)
    dlogits[n, t, v] = dz[v] f'(x[v]),  f'(x) = a / temperature, times (1 - tanh^2(a x / c)) with softcapping

The row is read in chunks of CHUNK blocks (``heuristics.logps_config``): each chunk's (m, l, ...) is computed
online as above and folded into the row's in chunk order (``_fold``). A row's chunks run in one program, or, when
there are too few rows to fill the GPU (N 256 rows at V 256000 is 2 rows per H100 SM), in one program each, whose
statistics a second, one-warp launch folds in the same order: the same arithmetic, so the same bits. The backward
has no fold: a split row's programs each write their own columns.

The log-sum-exp is kept as the pair (m, log l), not rounded to one float: z - m is exact for the logits that
carry the probability mass, so log-probs and softmax keep full float32 precision however large the logits
(rounding m + log l to float32 at |z| ~ 1e4 would cost 5e-4 relative in every softmax value).

Optional statistics in the same sweep, behind constexpr flags (no extra read of the logits):
    entropy H = log l - h / l with h = sum_v e^(z - m) (z - m);  log sum_v p^2 = log sum_v e^(2 (z - m)) - 2 log l;
    mean logit sum_v z / V;  top-1 = the label is the first argmax (z[y] >= m and z[y] > max of z before y).
Reference logits can ride along in the same launch (grid axis 1), for DPO's reference log-probs.

Rows whose label is ``ignore_index`` (and, with SHIFT=1, the last position of each sequence, which has no
next token) are unscored: logp = 0, lse = 0, gradient 0, and the forward does not read them.

The shift of the Hugging Face convention (logits[:, t] scores labels[:, t + 1]) is done by indexing, so a
sliced or narrowed logits view is read in place. All offsets are int64: N * T * V passes 2^31 at
realistic sizes (16k tokens x 152k vocab).

Bytes per scored row: forward reads V logits (+ one label, writes 12 bytes, + 4 per statistic; a split row writes
and reads 8 bytes, or 24 with statistics, per chunk); backward reads V + 1 logits and writes V gradients (unscored
rows: writes V zeros only). Reference: ``fastdpo.reference.sequence_logps``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fastdpo._logps_outputs import STATS, LogpsForward, check_stats
from fastdpo.kernels.heuristics import logps_config, split_rows

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
def _transformed(x, logit_scale, softcap, inv_temperature, SOFTCAP: tl.constexpr):
    """z = f(x), and t = tanh(a x / c) with softcapping (f'(x) carries 1 - t^2; t is unused without it)."""
    y = x * logit_scale
    t = y
    if SOFTCAP:
        # tanh(u) = 1 - 2 / (e^(2u) + 1): exact limits +-1 when e^(2u) overflows or vanishes; absolute error
        # ~1 ulp of 1, i.e. c * 6e-8 in z, below float32 resolution of z itself once |z| > 1.
        t = 1.0 - 2.0 / (tl.exp(2.0 * (y / softcap)) + 1.0)
        y = softcap * t
    return y * inv_temperature, t


@triton.jit
def _one_minus_exp(x):
    """1 - e^x for x <= 0 without cancellation of its own near x = 0: -expm1(x), by Kahan's
    expm1(x) = (u - 1) x / log u, u = e^x, for x > -1 (a few ulps where 1 - e^x keeps none); 1 - u below, where
    it is exact and Kahan's quotient would lose digits to a subnormal u."""
    u = tl.exp(x)
    near_zero = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u))
    return -tl.where(x < -1.0, u - 1.0, near_zero)


# Phases of the forward kernel (its PHASE constexpr): one program per row folds every chunk itself (WHOLE_ROW), or,
# when rows are too few to fill the GPU, one program per (row, chunk) writes the chunk's statistics (CHUNK_PARTIALS)
# and a second launch folds them per row (FOLD_PARTIALS). Both fold the same chunks in the same order: same bits.
WHOLE_ROW, CHUNK_PARTIALS, FOLD_PARTIALS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _chunk_stats(
    row_ptr, lo, hi, V, label, logit_scale, softcap, inv_temperature,
    SOFTCAP: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, COMPUTE_SUM_SQ: tl.constexpr, COMPUTE_MEAN: tl.constexpr,
    COMPUTE_TOP1: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Online statistics of z over the columns [lo, hi) of one row, relative to their own max m:
    (m, l = sum e^(z - m), h = sum e^(z - m) (z - m), q = sum e^(2 (z - m)), s = sum z, b = max z before the label).
    lo is a multiple of BLOCK_V and hi is lo plus a multiple of it or V, so a block is masked against V alone,
    which keeps the compiler's knowledge that V is a multiple of 16 (vectorised loads)."""
    offs_v = tl.arange(0, BLOCK_V)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    h_i = tl.full((), 0.0, tl.float32)
    q_i = tl.full((), 0.0, tl.float32)
    s_i = tl.full((), 0.0, tl.float32)
    b_i = tl.full((), float("-inf"), tl.float32)
    # Counted blocks, not range(lo, hi, BLOCK_V): Triton 3.6 gives that loop twice the registers.
    for k in tl.range(0, tl.cdiv(hi - lo, BLOCK_V), num_stages=NUM_STAGES):
        offs = lo + k * BLOCK_V + offs_v
        mask_v = offs < V
        x = tl.load(row_ptr + offs, mask=mask_v, other=float("-inf")).to(tl.float32)
        z, _ = _transformed(x, logit_scale, softcap, inv_temperature, SOFTCAP)
        if SOFTCAP:  # c tanh(-inf) = -c: padding lanes must stay -inf
            z = tl.where(mask_v, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        # Shift by 0 while every logit seen so far is -inf, so no (-inf) - (-inf) = nan appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        e = tl.exp(z - m_safe)
        if COMPUTE_ENTROPY:
            # sum e'(z - m') = alpha (sum e (z - m) + (m - m') sum e) + sum_b e (z - m'), kept relative to the
            # max so that H = log l - h / l has no cancellation at large |z|
            m_prev = tl.where(m_i == float("-inf"), 0.0, m_i)
            e_z = tl.where(z > float("-inf"), e * (z - m_safe), 0.0)
            # clamped: below -1e4 alpha is 0 anyway, and (m - m') l would overflow for finite mask values (finfo.min)
            h_i = alpha * (h_i + tl.maximum(m_prev - m_safe, -1e4) * l_i) + tl.sum(e_z, axis=0)
        if COMPUTE_SUM_SQ:
            q_i = q_i * alpha * alpha + tl.sum(e * e, axis=0)
        if COMPUTE_MEAN:
            s_i += tl.sum(tl.where(mask_v, z, 0.0), axis=0)
        if COMPUTE_TOP1:
            b_i = tl.maximum(b_i, tl.max(tl.where(offs < label, z, float("-inf")), axis=0))
        l_i = l_i * alpha + tl.sum(e, axis=0)
        m_i = m_new
    return m_i, l_i, h_i, q_i, s_i, b_i


@triton.jit
def _fold(m_r, l_r, h_r, q_r, s_r, b_r, m_c, l_c, h_c, q_c, s_c, b_c, COMPUTE_ENTROPY: tl.constexpr,
          COMPUTE_SUM_SQ: tl.constexpr):  # fmt: skip
    """Running statistics (suffix _r, relative to m_r) merged with a chunk's (_c, relative to m_c), relative to
    M = max(m_r, m_c):
        l = l_r e^(m_r - M) + l_c e^(m_c - M)
        h = e^(m_r - M) (h_r + (m_r - M) l_r) + e^(m_c - M) (h_c + (m_c - M) l_c)
        q = q_r e^(2 (m_r - M)) + q_c e^(2 (m_c - M))
    The first fold, into m_r = -inf, returns the chunk's values exactly. Every product-plus-sum is an explicit
    fma: no multiply is left for the compiler to contract, so the fold is the same arithmetic whether its chunk
    values come from registers (WHOLE_ROW) or from memory (FOLD_PARTIALS); the chunk statistics themselves reach it
    as sums and maxima, which nothing can fuse into."""
    m_new = tl.maximum(m_r, m_c)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a_r = tl.exp(m_r - m_safe)
    a_c = tl.exp(m_c - m_safe)
    if COMPUTE_ENTROPY:
        m0_r = tl.where(m_r == float("-inf"), 0.0, m_r)
        m0_c = tl.where(m_c == float("-inf"), 0.0, m_c)
        d_r = tl.maximum(m0_r - m_safe, -1e4)  # e^d is 0 below -1e4: keeps d l finite (finfo.min masks)
        d_c = tl.maximum(m0_c - m_safe, -1e4)
        h_r = tl.fma(a_r, tl.fma(d_r, l_r, h_r), a_c * tl.fma(d_c, l_c, h_c))
    if COMPUTE_SUM_SQ:
        q_r = tl.fma(q_r * a_r, a_r, (q_c * a_c) * a_c)
    return m_new, tl.fma(l_r, a_r, l_c * a_c), h_r, q_r, s_r + s_c, tl.maximum(b_r, b_c)


@triton.jit
def _logps_fwd_kernel(
    logits_ptr,
    ref_logits_ptr,
    labels_ptr,
    logp_ptr,
    ref_logp_ptr,
    lse_ptr,
    stats_ptr,
    ref_stats_ptr,
    partials_ptr,
    stride_logits_n,
    stride_logits_t,
    stride_ref_n,
    stride_ref_t,
    stride_labels_n,
    stride_labels_t,
    T,
    T_rows,
    n_rows,
    V,
    chunk_blocks,
    ignore_index,
    logit_scale,
    softcap,
    inv_temperature,
    SHIFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    COMPUTE_SUM_SQ: tl.constexpr,
    COMPUTE_MEAN: tl.constexpr,
    COMPUTE_TOP1: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    PHASE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)  # 0: policy logits, 1: reference logits (grid axis 1 has size 1 without them)
    n = row // T_rows
    t = row - n * T_rows
    row_ptr = logits_ptr + n * stride_logits_n + t * stride_logits_t
    logp_out = logp_ptr + row
    stats_out = stats_ptr + row  # channel k at + k * n_rows
    # lse [grid axis 1, 2, n_rows]: every program stores, unmasked and unbranched (Triton 3.2's interpreter ignored a
    # scalar store's mask; a branch made Triton 3.6 spill at sm_90a)
    lse_out = lse_ptr + which * 2 * n_rows + row
    if which == 1:
        row_ptr = ref_logits_ptr + n * stride_ref_n + t * stride_ref_t
        logp_out = ref_logp_ptr + row
        stats_out = ref_stats_ptr + row
    label, scored, in_vocab = _label_of_row(
        labels_ptr, n, t + SHIFT, stride_labels_n, stride_labels_t, T, V, ignore_index
    )
    if not scored:  # the launcher zero-fills the statistics
        if PHASE != CHUNK_PARTIALS:
            tl.store(logp_out, 0.0)
            tl.store(lse_out, 0.0)
            tl.store(lse_out + n_rows, 0.0)
        return

    # partials [6, n_chunks, grid axis 1, n_rows]: statistic k of chunk c at + k * stride_stat + c * stride_chunk
    chunk_v = chunk_blocks * BLOCK_V
    n_chunks = tl.cdiv(V, chunk_v)
    stride_chunk = tl.num_programs(1).to(tl.int64) * n_rows
    stride_stat = n_chunks * stride_chunk
    part_ptr = partials_ptr + which * n_rows + row
    if PHASE == CHUNK_PARTIALS:
        chunk = tl.program_id(2)
        lo = chunk * chunk_v
        m_c, l_c, h_c, q_c, s_c, b_c = _chunk_stats(
            row_ptr, lo, tl.minimum(lo + chunk_v, V), V, label, logit_scale, softcap, inv_temperature, SOFTCAP,
            COMPUTE_ENTROPY, COMPUTE_SUM_SQ, COMPUTE_MEAN, COMPUTE_TOP1, BLOCK_V, NUM_STAGES,
        )  # fmt: skip
        part_ptr += chunk * stride_chunk
        tl.store(part_ptr, m_c)
        tl.store(part_ptr + stride_stat, l_c)
        if COMPUTE_ENTROPY:
            tl.store(part_ptr + 2 * stride_stat, h_c)
        if COMPUTE_SUM_SQ:
            tl.store(part_ptr + 3 * stride_stat, q_c)
        if COMPUTE_MEAN:
            tl.store(part_ptr + 4 * stride_stat, s_c)
        if COMPUTE_TOP1:
            tl.store(part_ptr + 5 * stride_stat, b_c)
        return

    m_i = tl.full((), float("-inf"), tl.float32)  # running max
    l_i = tl.full((), 0.0, tl.float32)  # sum e^(z - m)
    h_i = tl.full((), 0.0, tl.float32)  # sum e^(z - m) (z - m), for the entropy
    q_i = tl.full((), 0.0, tl.float32)  # sum e^(2 (z - m)), for log sum p^2
    s_i = tl.full((), 0.0, tl.float32)  # sum z, for the mean logit
    b_i = tl.full((), float("-inf"), tl.float32)  # max of z before the label's index, for top-1 ties
    for chunk in range(0, n_chunks):
        if PHASE == WHOLE_ROW:
            lo = chunk * chunk_v
            m_c, l_c, h_c, q_c, s_c, b_c = _chunk_stats(
                row_ptr, lo, tl.minimum(lo + chunk_v, V), V, label, logit_scale, softcap, inv_temperature, SOFTCAP,
                COMPUTE_ENTROPY, COMPUTE_SUM_SQ, COMPUTE_MEAN, COMPUTE_TOP1, BLOCK_V, NUM_STAGES,
            )  # fmt: skip
        else:
            c_ptr = part_ptr + chunk * stride_chunk
            m_c = tl.load(c_ptr)
            l_c = tl.load(c_ptr + stride_stat)
            h_c = 0.0
            q_c = 0.0
            s_c = 0.0
            b_c = float("-inf")
            if COMPUTE_ENTROPY:
                h_c = tl.load(c_ptr + 2 * stride_stat)
            if COMPUTE_SUM_SQ:
                q_c = tl.load(c_ptr + 3 * stride_stat)
            if COMPUTE_MEAN:
                s_c = tl.load(c_ptr + 4 * stride_stat)
            if COMPUTE_TOP1:
                b_c = tl.load(c_ptr + 5 * stride_stat)
        m_i, l_i, h_i, q_i, s_i, b_i = _fold(
            m_i, l_i, h_i, q_i, s_i, b_i, m_c, l_c, h_c, q_c, s_c, b_c, COMPUTE_ENTROPY, COMPUTE_SUM_SQ
        )
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    log_l = tl.log(l_i)

    # One extra element read; an out-of-vocabulary label is never dereferenced and yields nan, not garbage.
    x_label = tl.load(row_ptr + label, mask=in_vocab, other=float("nan")).to(tl.float32)
    z_label, _ = _transformed(x_label, logit_scale, softcap, inv_temperature, SOFTCAP)
    tl.store(logp_out, (z_label - m_i) - log_l)
    tl.store(lse_out, m_i)  # the policy's for its backward; the reference's go to a block nobody reads
    tl.store(lse_out + n_rows, log_l)
    if COMPUTE_ENTROPY:
        tl.store(stats_out, log_l - h_i / l_i)
    if COMPUTE_SUM_SQ:
        tl.store(stats_out + n_rows, tl.log(q_i) - 2.0 * log_l)
    if COMPUTE_MEAN:
        tl.store(stats_out + 2 * n_rows, s_i / V)
    if COMPUTE_TOP1:
        tl.store(stats_out + 3 * n_rows, ((z_label >= m_i) & (z_label > b_i)).to(tl.float32))


@triton.jit
def _logps_bwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    stride_logits_n,
    stride_logits_t,
    stride_labels_n,
    stride_labels_t,
    stride_grad_logp_n,
    stride_grad_logp_t,
    stride_grad_entropy_n,
    stride_grad_entropy_t,
    stride_grad_n,
    stride_grad_t,
    T,
    T_rows,
    n_rows,
    V,
    chunk_blocks,
    ignore_index,
    logit_scale,
    softcap,
    inv_temperature,
    SHIFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_LOGP_GRAD: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # over all N * T logits rows, so every gradient row is written
    lo = tl.program_id(1) * chunk_blocks * BLOCK_V  # this program's columns: [lo, hi)
    hi = tl.minimum(lo + chunk_blocks * BLOCK_V, V)
    n = row // T
    t = row - n * T
    label, scored, in_vocab = _label_of_row(
        labels_ptr, n, t + SHIFT, stride_labels_n, stride_labels_t, T, V, ignore_index
    )
    m_i = tl.load(lse_ptr + n * T_rows + t, mask=scored, other=0.0)
    log_l = tl.load(lse_ptr + n_rows + n * T_rows + t, mask=scored, other=0.0)
    coef = 0.0
    if HAS_LOGP_GRAD:
        g = tl.load(grad_logp_ptr + n * stride_grad_logp_n + t * stride_grad_logp_t, mask=scored, other=0.0)
        coef = g.to(tl.float32)
    coef_h = 0.0
    entropy = 0.0
    if HAS_ENTROPY_GRAD:
        g_h = tl.load(grad_entropy_ptr + n * stride_grad_entropy_n + t * stride_grad_entropy_t, mask=scored, other=0.0)
        coef_h = g_h.to(tl.float32)
        entropy = tl.load(entropy_ptr + n * T_rows + t, mask=scored, other=0.0)

    row_ptr = logits_ptr + n * stride_logits_n + t * stride_logits_t
    grad_row_ptr = grad_logits_ptr + n * stride_grad_n + t * stride_grad_t
    # At the label, 1 - p is computed once per row from its log-prob (one extra element read, as in the forward).
    # As p -> 1 it is as precise as l = 1 + (1 - p) is in float32: ~1.2e-7 absolute (keeping the sum without the
    # label's term would be needed for more; 1.0 - p in the loop measured no worse). Only the program whose
    # columns hold the label reads it, before it writes them: in place, another chunk's program may already have
    # overwritten it.
    has_label = scored & in_vocab & (label >= lo) & (label < hi)
    x_label = tl.load(row_ptr + label, mask=has_label, other=0.0).to(tl.float32)
    z_label, _ = _transformed(x_label, logit_scale, softcap, inv_temperature, SOFTCAP)
    one_minus_p_label = _one_minus_exp(tl.minimum((z_label - m_i) - log_l, 0.0))
    offs_v = tl.arange(0, BLOCK_V)
    v_read = tl.where(scored, V, 0)  # unscored rows read nothing (fully masked loads) and write zeros
    # masked against V alone, counted and pipelined: as in _chunk_stats
    for k in tl.range(0, tl.cdiv(hi - lo, BLOCK_V), num_stages=NUM_STAGES):
        offs = lo + k * BLOCK_V + offs_v
        mask_v = offs < V
        x = tl.load(row_ptr + offs, mask=offs < v_read, other=0.0).to(tl.float32)
        z, t_cap = _transformed(x, logit_scale, softcap, inv_temperature, SOFTCAP)
        log_p = (z - m_i) - log_l
        p = tl.exp(log_p)
        dz = coef * tl.where(offs == label, one_minus_p_label, -p)
        if HAS_ENTROPY_GRAD:
            dz -= coef_h * tl.where(p > 0.0, p * (log_p + entropy), 0.0)  # dH/dz_v = -p_v (log p_v + H)
        dz = dz * (logit_scale * inv_temperature)  # f'(x)
        if SOFTCAP:
            dz = dz * (1.0 - t_cap * t_cap)
        dz = tl.where(scored, dz, 0.0)
        tl.store(grad_row_ptr + offs, dz.to(grad_logits_ptr.dtype.element_ty), mask=mask_v)


def device_guard(t: torch.Tensor):
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
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ref_logits: torch.Tensor | None = None,
    stats: tuple[str, ...] = (),
    block_v: int | None = None,
    chunk_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split: bool | None = None,
) -> LogpsForward:
    """Per-token log-probs, log-sum-exps and the requested ``stats`` (see ``fastdpo._logps_outputs``) of
    z = f(logits) (``logit_scale``, ``softcap``, ``temperature``: see the module docstring).

    logits ``[N, T, V]`` (unit stride in V), labels ``[N, T]``. ``ref_logits`` (same shape and dtype, any
    strides) are read in the same launch, as a second slice of the grid. ``block_v``, ``chunk_v``, ``num_warps``,
    ``num_stages`` override ``logps_config``; ``split`` overrides ``split_rows`` (one program per chunk of a row,
    then a fold launch; the same bits either way).
    """
    _check_launch_args(logits, labels)
    check_stats(stats)
    if ref_logits is not None:
        _check_launch_args(ref_logits, labels)
        if ref_logits.shape != logits.shape or ref_logits.dtype != logits.dtype:
            raise ValueError(
                f"ref_logits must match logits {tuple(logits.shape)} {logits.dtype}, "
                f"got {tuple(ref_logits.shape)} {ref_logits.dtype}"
            )
    N, T, V = logits.shape
    T_rows = T - int(shift)
    has_ref = ref_logits is not None
    rows = dict(dtype=torch.float32, device=logits.device)
    out = LogpsForward(
        logp=torch.empty((N, T_rows), **rows),
        # block 1: the reference's, never read, but held with the policy's until the backward (8 bytes a row)
        lse=torch.empty((1 + has_ref, 2, N, T_rows), **rows)[0],
        stats=torch.zeros((len(STATS), N, T_rows), **rows) if stats else None,
        ref_logp=torch.empty((N, T_rows), **rows) if has_ref else None,
        ref_stats=torch.zeros((len(STATS), N, T_rows), **rows) if stats and has_ref else None,
    )
    if N * T_rows == 0:
        return out
    cfg = logps_config(V, block_v, chunk_v=chunk_v, num_warps=num_warps, num_stages=num_stages)
    n_rows, n_which, n_chunks = N * T_rows, 1 + has_ref, triton.cdiv(V, cfg.chunk_v)
    split = n_chunks > 1 and split_rows(n_rows * n_which, logits.device, split)
    # chunk statistics (m, l and, with statistics, h, q, s, b): [2 or 6, n_chunks, n_which, n_rows], float32
    partials = torch.empty((6 if stats else 2, n_chunks, n_which, n_rows), **rows) if split else out.logp
    ref = ref_logits if has_ref else logits  # unused pointers get a valid tensor of the right type
    stats_buf = out.stats if stats else out.logp
    args = (
        logits, ref, labels, out.logp, out.ref_logp if has_ref else out.logp, out.lse,
        stats_buf, out.ref_stats if stats and has_ref else stats_buf, partials,
        logits.stride(0), logits.stride(1), ref.stride(0), ref.stride(1), labels.stride(0), labels.stride(1),
        T, T_rows, n_rows, V, cfg.chunk_v // cfg.block_v, ignore_index, logit_scale, softcap or 1.0,
        1.0 / temperature,
    )  # fmt: skip
    flags = dict(
        SHIFT=int(shift), SOFTCAP=softcap is not None, COMPUTE_ENTROPY="entropy" in stats,
        COMPUTE_SUM_SQ="log_sum_sq_probs" in stats, COMPUTE_MEAN="mean_logits" in stats,
        COMPUTE_TOP1="is_top1" in stats, BLOCK_V=cfg.block_v, NUM_STAGES=cfg.num_stages,
    )  # fmt: skip
    with device_guard(logits):
        if split:
            _logps_fwd_kernel[(n_rows, n_which, n_chunks)](*args, **flags, PHASE=CHUNK_PARTIALS,
                                                           num_warps=cfg.num_warps)  # fmt: skip
            _logps_fwd_kernel[(n_rows, n_which)](*args, **flags, PHASE=FOLD_PARTIALS, num_warps=1)
        else:
            _logps_fwd_kernel[(n_rows, n_which)](*args, **flags, PHASE=WHOLE_ROW, num_warps=cfg.num_warps)
    return out


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
    block_v: int | None = None,
    chunk_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split: bool | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_logp * logp) + sum(grad_entropy * entropy)`` with respect to logits, ``[N, T, V]``
    in the logits' dtype, or written into ``out`` (``[N, T, V]``, unit stride in V, any float dtype: the
    fused-linear path reads float32 tiles and writes the gradient in the matmul's bf16/fp16).

    ``lse`` is ``[2, N, T - shift]`` from ``logps_fwd``; ``entropy`` (contiguous ``[N, T - shift]``, from the
    forward) is needed with ``grad_entropy``. The gradients are ``[N, T - shift]`` with any strides (the
    backward of ``.sum(1)`` hands in a stride-0 expand), or None. With ``inplace=True`` the gradient overwrites
    ``logits`` (same storage and strides): each program reads a block of its row before writing that block,
    and rows are disjoint (a row split across programs, ``split``, is split into disjoint column chunks).
    ``block_v``, ``chunk_v``, ``num_warps``, ``num_stages``, ``split``: as in ``logps_fwd``; the bits do not depend
    on them.
    """
    _check_launch_args(logits, labels)
    N, T, V = logits.shape
    if out is not None and (out.shape != logits.shape or out.stride(-1) != 1 or out.dtype not in SUPPORTED_DTYPES):
        raise ValueError(f"out must be a float [N, T, V] = {tuple(logits.shape)} buffer, unit-stride in V")
    if out is None:
        out = logits if inplace else torch.empty((N, T, V), dtype=logits.dtype, device=logits.device)
    grad = out
    if N * T == 0:
        return grad
    cfg = logps_config(V, block_v, backward=True, chunk_v=chunk_v, num_warps=num_warps, num_stages=num_stages)
    n_chunks = triton.cdiv(V, cfg.chunk_v) if split_rows(N * T, logits.device, split) else 1
    chunk_blocks = cfg.chunk_v // cfg.block_v if n_chunks > 1 else triton.cdiv(V, cfg.block_v)
    has_logp_grad, has_entropy_grad = grad_logp is not None, grad_entropy is not None
    if has_entropy_grad and entropy is None:
        raise ValueError("grad_entropy needs the forward's [N, T - shift] entropy")
    lse = lse.contiguous()  # both are indexed as contiguous rows; no copy unless a caller made a view
    entropy = None if entropy is None else entropy.contiguous()
    g_logp = grad_logp if has_logp_grad else lse[0]  # unused pointers get a valid float32 tensor
    g_ent = grad_entropy if has_entropy_grad else lse[0]
    with device_guard(logits):
        _logps_bwd_kernel[(N * T, n_chunks)](
            logits, labels, lse, entropy if has_entropy_grad else lse, g_logp, g_ent, grad,
            logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
            g_logp.stride(0), g_logp.stride(1), g_ent.stride(0), g_ent.stride(1), grad.stride(0), grad.stride(1),
            T, T - int(shift), N * (T - int(shift)), V, chunk_blocks, ignore_index, logit_scale, softcap or 1.0,
            1.0 / temperature,
            SHIFT=int(shift), SOFTCAP=softcap is not None, HAS_LOGP_GRAD=has_logp_grad,
            HAS_ENTROPY_GRAD=has_entropy_grad,
            BLOCK_V=cfg.block_v, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
        )  # fmt: skip
    return grad
