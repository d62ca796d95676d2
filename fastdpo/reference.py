"""Plain-PyTorch reference with the same signatures and semantics as ``fastdpo.functional``: the oracle the
kernels are tested against (call it with float64 logits for ground truth).

It is the naive computation most training loops write: ``log_softmax`` over the whole ``[N, T, V]`` tensor in
the logits' dtype, then a gather, so it materialises N x T x V log-probs (and, under autograd, their gradient
buffers). ``inplace_backward`` is accepted for signature compatibility and has no effect.

``dpo_loss`` is an independent transcription of TRL 1.16 ``DPOTrainer._compute_loss``
(``trl/trainer/dpo_trainer.py`` lines 1285-1612) plus SimPO from TRL's CPO trainer
(``trl/experimental/cpo/cpo_trainer.py`` lines 715-722, rewards 744-746). It shares no formula with
``fastdpo.losses`` (only the ``DPOOutput`` result type and the ``LossConfig`` option checks), so comparing the two
catches a wrong formula on either side; ``tests/test_trl_parity.py`` compares it with TRL's own code. Where TRL
cannot serve as an oracle it departs on purpose: the SFT term of a batch without chosen completion tokens is 0
(TRL: NaN); the alpha-divergence runs in float64 for float64 input (TRL: float32, and a KeyError for float64);
SFT and hinge under WPO weighting are multiplied out of place (TRL's in-place multiply raises in the forward for
SFT, in the backward for hinge). Packed (padding-free) batches are unpacked into a right-padded batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo import _validation
from fastdpo._logps_outputs import TokenLogps, check_outputs
from fastdpo.losses import DPOOutput, LossConfig


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True,
    temperature: float = 1.0, outputs: tuple[str, ...] = ("log_probs",),
) -> TokenLogps:
    """Per-token outputs ``[N, T - shift]`` in the logits' dtype, 0 (False) where the label is ``ignore_index``."""
    _validation.check_logits_labels(
        logits, labels, shift=shift, temperature=temperature, ignore_index=ignore_index
    )
    check_outputs(outputs)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    z = logits / temperature
    logprobs = z.log_softmax(-1)
    scored = labels != ignore_index
    index = torch.where(scored, labels, 0).long().unsqueeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    values = {
        "log_probs": lambda: logprobs.gather(-1, index).squeeze(-1),
        "entropy": lambda: -torch.special.xlogy(logprobs.exp(), logprobs.exp()).sum(-1),
        "mean_logits": lambda: z.mean(-1),
        "is_top1": lambda: z.argmax(-1) == labels,
        "log_sum_sq_probs": lambda: torch.logsumexp(2 * logprobs, dim=-1),
    }
    return TokenLogps(**{
        name: torch.where(scored, values[name](), False if name == "is_top1" else zero) for name in outputs
    })


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True,
    average: bool = False, temperature: float = 1.0, inplace_backward: bool = False, ld_alpha: float | None = None,
) -> torch.Tensor:
    """``[N]`` sum (or mean over scored tokens, 0 for none) of label log-probs, in the logits' dtype; with
    ``ld_alpha``, TRL's LD-DPO weighted sums of a chosen-then-rejected padded batch (``compute_ref_log_probs``).
    Packed batches and ``pairs`` are ``fastdpo.sequence_logps``'s only (``dpo_loss`` here has them)."""
    per_token = token_logps(logits, labels, ignore_index=ignore_index, shift=shift, temperature=temperature).log_probs
    shift_mask = labels[:, int(shift):] != ignore_index
    total = _weighted_sums(per_token, shift_mask, ld_alpha)
    return total / shift_mask.sum(1).clamp(min=1) if average else total


# ----------------------------------------------------------------------------------------------- packed input


def _unpack(x: torch.Tensor, bounds: list[tuple[int, int]], fill) -> torch.Tensor:
    """``[1, total_T, ...]`` -> ``[S, T_max, ...]``: each sequence in its own row, right-padded with ``fill``."""
    T_max = max(end - start for start, end in bounds)
    rows = []
    for start, end in bounds:
        piece = x[0, start:end]
        pad = piece.new_full((T_max - (end - start),) + tuple(piece.shape[1:]), fill)
        rows.append(torch.cat([piece, pad]))
    return torch.stack(rows)


def _sequence_bounds(cu_seq_lens, position_ids, total_T: int) -> list[tuple[int, int]]:
    """[start, end) of each packed sequence, from cu_seq_lens or from where position_ids restart at 0."""
    if cu_seq_lens is not None:
        cuts = [int(c) for c in cu_seq_lens.tolist()]
    else:
        cuts = [t for t, p in enumerate(position_ids.reshape(-1).tolist()) if p == 0] + [total_T]
    return list(zip(cuts[:-1], cuts[1:]))


# ------------------------------------------------------------------------------------- TRL _compute_loss parts


def _weighted_sums(per_token: torch.Tensor, shift_mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Sequence log-probs ``[2B]``: plain sums, or LD-DPO's shared + alpha * tail (TRL lines 1303-1315: a token
    is shared while its rank among its row's completion tokens is <= min(n_chosen, n_rejected) of its pair)."""
    if ld_alpha is None:
        return per_token.sum(1)
    rank = shift_mask.long().cumsum(1)
    n_c, n_r = shift_mask.long().sum(1).chunk(2)
    shared_len = torch.minimum(n_c, n_r).repeat(2).unsqueeze(1)
    in_shared = (rank >= 1) & (rank <= shared_len)
    in_tail = rank > shared_len
    return (per_token * in_shared).sum(1) + ld_alpha * (per_token * in_tail).sum(1)


def _f_score(rho: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """f'(exp rho), TRL lines 1353-1381. TRL's alpha branch runs in float32 and has no float64 entry in its clamp
    table (a KeyError); here float64 stays float64 with TRL's float32 clamp of 80, other dtypes follow TRL."""
    if cfg.f_divergence_type == "forward_kl":  # 1 - 1/t
        return 1 - torch.exp(-rho)
    if cfg.f_divergence_type == "js_divergence":  # log(2t / (1 + t))
        return math.log(2.0) + F.logsigmoid(rho)
    a = cfg.f_alpha_divergence_coef
    if cfg.f_divergence_type == "reverse_kl" or abs(a - 1.0) < 1e-6:  # log t (alpha -> 1 is reverse KL)
        return rho
    t = (a - 1.0) * rho  # (t^(a-1) - 1) / (a - 1)
    if rho.dtype == torch.float64:
        return (torch.exp(t.clamp(max=80.0)) - 1.0) / (a - 1.0)
    ceiling = 11.0 if rho.dtype == torch.float16 else 80.0
    return (torch.exp(t.float().clamp(max=ceiling)) - 1.0).to(rho.dtype) * (1.0 / (a - 1.0))


def _nls(x: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(x) = softplus(-x), exactly: ``F.softplus`` turns linear past its threshold (20), a 2e-9
    relative error that an oracle cannot afford."""
    return -F.logsigmoid(x)


def _soft_label(x: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)."""
    return (1 - eps) * _nls(x) + eps * _nls(-x)


# Losses of the scaled score margin z = beta * (s_c - s_r) (TRL lines 1386-1517).
_MARGIN_LOSSES = {
    "sigmoid": lambda z, cfg: _nls(z),
    "hinge": lambda z, cfg: torch.relu(1 - z),
    "robust": lambda z, cfg: ((1 - cfg.label_smoothing) * _nls(z) - cfg.label_smoothing * _nls(-z))
    / (1 - 2 * cfg.label_smoothing),
    "exo_pair": lambda z, cfg: torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-cfg.label_smoothing))
    + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(cfg.label_smoothing)),
    "discopop": lambda z, cfg: torch.lerp(_nls(z), torch.exp(-z), torch.sigmoid(z / cfg.discopop_tau)),
}


def _pair_loss(kind: str, v: dict, cfg: LossConfig) -> torch.Tensor:
    """Per-pair loss ``[B]`` of one loss type; ``v`` holds the per-pair quantities built in ``_dpo_padded``."""
    beta, eps = cfg.beta, cfg.label_smoothing
    if kind in _MARGIN_LOSSES:
        return _MARGIN_LOSSES[kind](beta * (v["s_c"] - v["s_r"]), cfg)
    if kind in ("ipo", "sigmoid_norm"):  # scores per completion token (unshifted completion_mask counts)
        d = v["s_c"] / v["n_c"] - v["s_r"] / v["n_r"]
        return (d - 0.5 / beta) ** 2 if kind == "ipo" else _nls(beta * d)
    r_c, r_r = beta * v["rho_c"], beta * v["rho_r"]
    if kind == "nca_pair":
        return _nls(r_c) + 0.5 * _nls(-r_c) + 0.5 * _nls(-r_r)
    if kind == "bco_pair":
        return _nls(r_c) + _nls(-r_r)
    if kind == "sppo_hard":
        return (v["rho_c"] - 0.5 / beta) ** 2 + (v["rho_r"] + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return torch.sigmoid(-r_c) + torch.sigmoid(r_r)
    if kind == "apo_down":
        return torch.sigmoid(r_c) + torch.sigmoid(r_r - r_c)
    if kind == "aot":  # sorted policy log-ratio minus sorted reference log-ratio, across the batch
        policy = torch.sort(v["logp_c"] - v["logp_r"]).values
        ref = torch.sort(v["ref_c"] - v["ref_r"]).values
        return _soft_label(beta * (policy - ref), eps)
    if kind == "aot_unpaired":
        return _soft_label(beta * (torch.sort(v["rho_c"]).values - torch.sort(v["rho_r"]).values), eps)
    if kind == "sft":  # one batch value: mean NLL over the chosen completion tokens (0 if there are none)
        return (-v["sft_sum"] / v["sft_count"].clamp(min=1)).expand_as(v["rho_c"])
    if kind == "simpo":  # CPO: average log-probs, margin gamma / beta, no reference
        u = v["logp_c"] / v["n_c"] - v["logp_r"] / v["n_r"] - cfg.simpo_gamma / beta
        return _soft_label(beta * u, eps)
    raise ValueError(f"unknown loss_type {kind!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean of ``x`` over ``mask``; 0 when the mask is empty (as TRL logs it)."""
    count = mask.sum()
    total = (x.detach() * mask).sum()
    return total / count if count > 0 else torch.zeros_like(total)


def _dpo_padded(logits, labels, ref_c, ref_r, ref_logits, cfg: LossConfig, ignore_index, shift, return_metrics):
    """TRL's ``_compute_loss`` on a right-padded [chosen..., rejected...] batch (references already resolved,
    or ``ref_logits``)."""
    completion_mask = labels != ignore_index  # TRL's completion_mask (unshifted)
    shift_mask = completion_mask[:, int(shift):]
    wanted = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    tok = token_logps(logits, labels, ignore_index=ignore_index, shift=shift, outputs=wanted)
    logps = _weighted_sums(tok.log_probs, shift_mask, cfg.ld_alpha)
    logp_c, logp_r = logps.chunk(2)
    if ref_logits is not None:  # TRL lines 1318-1347: the reference forward, under no_grad
        with torch.no_grad():
            ref_tok = token_logps(ref_logits, labels, ignore_index=ignore_index, shift=shift).log_probs
            ref_c, ref_r = _weighted_sums(ref_tok.to(logits.dtype), shift_mask, cfg.ld_alpha).chunk(2)
    elif ref_c is None:  # reference-free
        ref_c, ref_r = torch.zeros_like(logp_c.detach()), torch.zeros_like(logp_r.detach())
    ref_c, ref_r = ref_c.to(logps.dtype), ref_r.to(logps.dtype)
    rho_c, rho_r = logp_c - ref_c, logp_r - ref_r
    n_c, n_r = completion_mask.sum(1).clamp(min=1).to(logps.dtype).chunk(2)
    chosen_tokens = shift_mask.chunk(2)[0]
    v = dict(
        logp_c=logp_c, logp_r=logp_r, ref_c=ref_c, ref_r=ref_r, rho_c=rho_c, rho_r=rho_r,
        s_c=_f_score(rho_c, cfg), s_r=_f_score(rho_r, cfg), n_c=n_c, n_r=n_r,
        sft_sum=tok.log_probs.chunk(2)[0].sum(), sft_count=chosen_tokens.sum().to(logps.dtype),
    )  # fmt: skip

    pair_weight = 1.0
    if cfg.use_weighting:  # WPO, TRL lines 1518-1526: w = exp(mean over completion tokens of logp - log sum p^2)
        with torch.no_grad():
            gap = (tok.log_probs - tok.log_sum_sq_probs) * shift_mask
            w = torch.exp(gap.sum(1) / shift_mask.sum(1).clamp(min=1))
            w_c, w_r = w.chunk(2)
            pair_weight = w_c * w_r

    weights = cfg.loss_weights if cfg.loss_weights is not None else [1.0] * len(cfg.loss_types)
    loss = sum((_pair_loss(kind, v, cfg) * pair_weight).mean() * weight
               for kind, weight in zip(cfg.loss_types, weights))  # fmt: skip

    if set(cfg.loss_types) == {"simpo"}:  # CPO's rewards: beta * average log-prob
        chosen_rewards, rejected_rewards = cfg.beta * (logp_c / n_c).detach(), cfg.beta * (logp_r / n_r).detach()
    else:  # TRL lines 1582-1583
        chosen_rewards, rejected_rewards = cfg.beta * rho_c.detach(), cfg.beta * rho_r.detach()
    out = DPOOutput(
        loss=loss, chosen_logps=logp_c, rejected_logps=logp_r, chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards, reward_accuracy=(chosen_rewards > rejected_rewards).to(logps.dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
    )  # fmt: skip
    if not return_metrics:
        return out
    # TRL lines 1535-1601 (one process: gather is the identity)
    mask_c, mask_r = shift_mask.chunk(2)
    mean_logits_c, mean_logits_r = tok.mean_logits.chunk(2)
    dtype = logps.dtype
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": out.reward_accuracy,
        "rewards/margins": out.reward_margin,
        "logps/chosen": logp_c.detach().mean(),
        "logps/rejected": logp_r.detach().mean(),
        "logits/chosen": _masked_mean(mean_logits_c, mask_c),
        "logits/rejected": _masked_mean(mean_logits_r, mask_r),
        "entropy": _masked_mean(tok.entropy, shift_mask),
        "mean_token_accuracy": _masked_mean(tok.is_top1.chunk(2)[0].to(dtype), mask_c),
    }
    return out._replace(metrics=metrics)


def dpo_loss(
    logits: torch.Tensor, labels: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None, *, beta: float = 0.1, loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None, label_smoothing: float = 0.0, reference_free: bool = False,
    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5, ld_alpha: float | None = None,
    use_weighting: bool = False, discopop_tau: float = 0.05, simpo_gamma: float = 0.5, ignore_index: int = -100,
    shift: bool = True, ref_logits: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None, pairs: torch.Tensor | None = None, return_metrics: bool = False,
    inplace_backward: bool = False,
) -> DPOOutput:
    """Same contract as ``fastdpo.dpo_loss``. Packed input (``cu_seq_lens`` or ``position_ids``) is unpacked into
    a right-padded batch; ``pairs`` ``[B, 2]`` (chosen, rejected) sequence indices reorders the rows into TRL's
    [chosen..., rejected...] layout (default: sequence i against sequence B + i)."""
    cfg = LossConfig(
        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
        reference_free=reference_free, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha, use_weighting=use_weighting,
        discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
    )  # fmt: skip
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=1.0, ignore_index=ignore_index)
    _validation.check_ref_logits(ref_logits, logits)
    if _validation.check_packing(logits, cu_seq_lens, position_ids) is not None:
        bounds = _sequence_bounds(cu_seq_lens, position_ids, logits.shape[1])
        logits, labels = _unpack(logits, bounds, 0.0), _unpack(labels, bounds, ignore_index)
        ref_logits = None if ref_logits is None else _unpack(ref_logits, bounds, 0.0)
    pairs = _validation.resolve_pairs(pairs, logits.shape[0], logits.device)
    B = pairs.shape[0]
    _validation.check_reference_logps("ref_chosen_logps", ref_chosen_logps, B, logits.device)
    _validation.check_reference_logps("ref_rejected_logps", ref_rejected_logps, B, logits.device)
    if not cfg.needs_reference:
        ref_chosen_logps = ref_rejected_logps = ref_logits = None
    elif ref_logits is not None:  # ref_logits take precedence over given sums, as in fastdpo.functional
        ref_chosen_logps = ref_rejected_logps = None
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("a reference is required: ref_chosen_logps and ref_rejected_logps of shape (B,), or "
                         "ref_logits, or reference_free=True")  # fmt: skip
    rows = torch.cat([pairs[:, 0], pairs[:, 1]])
    if not torch.equal(rows, torch.arange(logits.shape[0], device=rows.device)):
        logits, labels = logits[rows], labels[rows]
        ref_logits = None if ref_logits is None else ref_logits[rows]
    return _dpo_padded(logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits, cfg, ignore_index, shift,
                       return_metrics)  # fmt: skip


# ----------------------------------------------------------------------------------------------- fused linear


def projected_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, temperature: float = 1.0,
    logit_scale: float = 1.0, final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """The logits the fused-linear path scores, materialised: f(hidden @ weight.T + bias) in hidden's dtype,
    f(x) = c tanh(a x / c) / temperature (a x / temperature without softcapping)."""
    x = F.linear(hidden, weight, bias) * logit_scale
    if final_logit_softcapping is not None:
        x = final_logit_softcapping * torch.tanh(x / final_logit_softcapping)
    return x / temperature


def _head_kw(kw: dict) -> dict:
    return {name: kw.pop(name) for name in ("temperature", "logit_scale", "final_logit_softcapping") if name in kw}


def fused_linear_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, outputs: tuple[str, ...] = ("log_probs",), tile_elements: int | None = None, **head,
) -> TokenLogps:
    """Same contract as ``fastdpo.fused_linear_token_logps`` (hidden ``[N, D]``, targets ``[N]``), through
    materialised logits; ``tile_elements`` is accepted and ignored."""
    logits = projected_logits(hidden, weight, bias, **head).unsqueeze(0)
    out = token_logps(logits, targets.unsqueeze(0), ignore_index=ignore_index, shift=False, outputs=outputs)
    return TokenLogps(*(None if x is None else x.squeeze(0) for x in out))


def fused_linear_sequence_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    tile_elements: int | None = None, **kw,
) -> torch.Tensor:
    """``sequence_logps`` of ``projected_logits(hidden, weight, bias, ...)`` (hidden ``[N, T, D]``)."""
    return sequence_logps(projected_logits(hidden, weight, bias, **_head_kw(kw)), labels, **kw)


def fused_linear_dpo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None, tile_elements: int | None = None, **kw,
) -> DPOOutput:
    """``dpo_loss`` of ``projected_logits(hidden, ...)``; ``ref_hidden`` through ``ref_weight``/``ref_bias``
    (default: the policy's head) becomes ``ref_logits``."""
    head = _head_kw(kw)
    ref_logits = None
    if ref_hidden is not None:
        ref_logits = projected_logits(ref_hidden, weight if ref_weight is None else ref_weight,
                                      bias if ref_weight is None and ref_bias is None else ref_bias, **head).detach()
    logits = projected_logits(hidden, weight, bias, **head)
    return dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, ref_logits=ref_logits, **kw)
