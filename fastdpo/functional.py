"""Public functions: validate, run the fused log-prob op, reduce per sequence, apply the DPO loss.

Shapes: N rows (sequences), T positions, V vocab. A DPO batch is TRL's concatenated batch: rows [0, B) are the
chosen completions and rows [B, 2B) the rejected ones (N = 2B); a packed batch is one row of S = 2B sequences
(``cu_seq_lens`` or ``position_ids``, see ``fastdpo.sequences``), paired the same way or by ``pairs``. ``labels`` are aligned with the input ids
(``shift=True``: logits[:, t] scores labels[:, t + 1]) and hold ``ignore_index`` on unscored tokens, e.g.
``labels = input_ids.masked_fill(completion_mask == 0, -100)``.

The logits are read in place (any strides with a unit-stride vocab dimension): nothing of size N x T x V is
allocated in the forward, and the backward allocates one gradient buffer in the logits' dtype, or none with
``inplace_backward=True``.

``inplace_backward=True`` overwrites the logits with their gradient during backward. It is safe when the
logits feed nothing else whose backward reads them, which holds for the usual ``lm_head`` Linear output
(its backward reads the hidden states and weight, not the logits). It is unsafe, and silently wrong, when
(a) the same logits also feed another loss or metric that is back-propagated afterwards, (b) the op that
produced them saved its output for backward (e.g. ``tanh`` softcapping, ``softmax``), (c) you read the
logits after ``backward()``, or (d) you call backward twice (``retain_graph=True``).
"""

from __future__ import annotations

import torch

from fastdpo import _validation
from fastdpo._logps_outputs import OUTPUTS, STATS, TokenLogps, check_outputs
from fastdpo.losses import DPOOutput, LossConfig, SequenceTerms, preference_loss
from fastdpo.ops import logps as logps_op
from fastdpo.sequences import SequenceLayout


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    inplace_backward: bool = False,
) -> TokenLogps:
    """Per-token outputs ``[N, T - shift]`` of one sweep over the logits: any of ``log_probs``, ``entropy``,
    ``mean_logits``, ``is_top1`` (bool), ``log_sum_sq_probs``; None for what was not requested, 0 (False) where
    the label is ignored. ``log_probs`` and ``entropy`` carry gradients. Float32 (float64 for float64 logits)."""
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=temperature, ignore_index=ignore_index)
    check_outputs(outputs)
    options = logps_op.LogpsOptions(
        shift=shift, ignore_index=ignore_index, temperature=float(temperature), inplace_backward=inplace_backward,
        stats=tuple(name for name in STATS if name in outputs),
    )  # fmt: skip
    out = logps_op.token_logps(logits, labels, options)
    values = {"log_probs": out.logp, "entropy": out.entropy}
    for name in ("mean_logits", "log_sum_sq_probs", "is_top1"):
        if name in outputs:
            values[name] = out.stats[STATS.index(name)]
    if "is_top1" in outputs:
        values["is_top1"] = values["is_top1"] > 0.5
    return TokenLogps(**{name: values[name] if name in outputs else None for name in OUTPUTS})


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum (or, with ``average=True``, mean over scored tokens) of each sequence's label log-probs.

    logits ``[N, T, V]`` float16/bfloat16/float32/float64, labels ``[N, T]`` integer -> ``[N]`` float32
    (float64 for float64 logits); packed (``cu_seq_lens``/``position_ids``, N = 1) -> ``[S]``. A sequence with
    no scored token gives 0. Under ``torch.no_grad()`` (a reference model) nothing of size N x T x V is
    allocated. With ``ld_alpha`` the batch is read as DPO pairs (``pairs``, default sequence i with B + i) and
    the sums are LD-DPO weighted, as ``dpo_loss`` weights them (what precomputed reference sums need).
    """
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=temperature, ignore_index=ignore_index)
    layout = SequenceLayout(labels, shift=shift, cu_seq_lens=_validation.check_packing(logits, cu_seq_lens,
                                                                                         position_ids))
    labels = layout.mask_labels(labels, ignore_index)
    options = logps_op.LogpsOptions(
        shift=shift, ignore_index=ignore_index, temperature=float(temperature), inplace_backward=inplace_backward
    )
    per_token = logps_op.token_logps(logits, labels, options).logp
    scored = (labels[:, int(shift) :] != ignore_index).to(per_token.dtype)
    if ld_alpha is not None:
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
        pairs = _validation.resolve_pairs(pairs, layout.num_sequences, logits.device, distinct=True)
        per_token = per_token * _ld_alpha_weights(ld_alpha, layout, scored, by_pair_of(pairs, layout.sums(scored)),
                                                  pairs)
    total = layout.sums(per_token)
    return total / layout.sums(scored).clamp(min=1) if average else total


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    ignore_index: int = -100,
    shift: bool = True,
    ref_logits: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
    return_metrics: bool = False,
    inplace_backward: bool = False,
) -> DPOOutput:
    """DPO-family loss over TRL's concatenated (or packed) batch, from the policy logits in one fused sweep.

    logits ``[2B, T, V]`` (or ``[1, total_T, V]`` packed), labels alike. The reference is one of:
    ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` (summed log-probs, e.g. from ``sequence_logps`` under
    ``torch.no_grad()``), ``ref_logits`` (read in the same launch as the policy logits), or
    ``reference_free=True``. The loss keywords are TRL ``DPOConfig``'s (see ``fastdpo.losses``). Per-token
    statistics for ``return_metrics`` (entropy, mean logits, top-1) and ``use_weighting`` (log sum p^2) come
    from the same sweep.
    """
    cfg = LossConfig(
        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
        reference_free=reference_free, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha, use_weighting=use_weighting,
        discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
    )  # fmt: skip
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=1.0, ignore_index=ignore_index)
    _validation.check_ref_logits(ref_logits, logits)
    layout = SequenceLayout(labels, shift=shift, cu_seq_lens=_validation.check_packing(logits, cu_seq_lens,
                                                                                         position_ids))
    pairs = _validation.resolve_pairs(pairs, layout.num_sequences, logits.device, distinct=ld_alpha is not None)
    B = pairs.shape[0]
    _validation.check_reference_logps("ref_chosen_logps", ref_chosen_logps, B, logits.device)
    _validation.check_reference_logps("ref_rejected_logps", ref_rejected_logps, B, logits.device)
    use_ref_logits = cfg.needs_reference and ref_logits is not None
    if cfg.needs_reference and not use_ref_logits and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("a reference is required: ref_chosen_logps and ref_rejected_logps of shape (B,), or "
                         "ref_logits, or reference_free=True")  # fmt: skip

    chosen_tokens, rejected_tokens = by_pair_of(pairs, layout.label_counts(labels, ignore_index))
    labels = layout.mask_labels(labels, ignore_index)
    stats = (("entropy", "mean_logits", "is_top1") if return_metrics else ()) + (
        ("log_sum_sq_probs",) if use_weighting else ()
    )
    options = logps_op.LogpsOptions(shift=shift, ignore_index=ignore_index, inplace_backward=inplace_backward,
                                    stats=tuple(name for name in STATS if name in stats))  # fmt: skip
    tok = logps_op.token_logps(logits, labels, options, ref_logits=ref_logits if use_ref_logits else None)
    scored = (labels[:, int(shift) :] != ignore_index).to(tok.logp.dtype)
    n_scored = layout.sums(scored)

    def by_pair(per_sequence):
        return by_pair_of(pairs, per_sequence)

    weights = _ld_alpha_weights(cfg.ld_alpha, layout, scored, by_pair(n_scored), pairs)
    weighted = (lambda x: x) if weights is None else (lambda x: x * weights)
    raw_sums = layout.sums(tok.logp)
    chosen_logps, rejected_logps = by_pair(raw_sums if weights is None else layout.sums(weighted(tok.logp)))
    if not cfg.needs_reference:
        ref_chosen_logps = ref_rejected_logps = torch.zeros_like(chosen_logps)
    elif use_ref_logits:
        ref_chosen_logps, ref_rejected_logps = by_pair(layout.sums(weighted(tok.ref_logp)))
    chosen_raw, _ = by_pair(raw_sums)
    chosen_scored, _ = by_pair(n_scored)
    terms = SequenceTerms(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps.to(chosen_logps.dtype),
        ref_rejected_logps=ref_rejected_logps.to(chosen_logps.dtype),
        chosen_tokens=chosen_tokens.to(chosen_logps.dtype),
        rejected_tokens=rejected_tokens.to(chosen_logps.dtype),
        sft_numerator=chosen_raw.sum(),
        sft_denominator=chosen_scored.sum(),
        wpo_weights=_wpo_weights(tok, layout, scored, n_scored, by_pair) if use_weighting else None,
    )
    out = preference_loss(terms, cfg)
    if return_metrics:
        out = out._replace(metrics=_metrics(out, tok, layout, n_scored, by_pair))
    return out


def by_pair_of(pairs: torch.Tensor, per_sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S]`` -> (``[B]`` chosen, ``[B]`` rejected) along ``pairs`` ``[B, 2]``."""
    return per_sequence[pairs[:, 0]], per_sequence[pairs[:, 1]]


def _ld_alpha_weights(alpha, layout: SequenceLayout, scored, pair_lengths, pairs) -> torch.Tensor | None:
    """LD-DPO token weights ``[N, T - shift]``: 1 on the first min(n_c, n_r) completion tokens of each pair's
    sequences, ``alpha`` past them (TRL's shared/tail split)."""
    if alpha is None:
        return None
    shared = torch.minimum(*pair_lengths)
    shared_per_sequence = torch.zeros(layout.num_sequences, dtype=shared.dtype, device=shared.device)
    shared_per_sequence[pairs[:, 0]] = shared
    shared_per_sequence[pairs[:, 1]] = shared
    in_shared = layout.rank(scored > 0) <= layout.broadcast(shared_per_sequence)
    return torch.where(in_shared, 1.0, alpha).to(scored.dtype)


def _wpo_weights(tok, layout: SequenceLayout, scored, n_scored, by_pair) -> torch.Tensor:
    """WPO pair weights w_c w_r, w = exp(mean over completion tokens of (log p_label - log sum p^2)); no grad."""
    with torch.no_grad():
        log_sum_sq = tok.stats[STATS.index("log_sum_sq_probs")]
        w = torch.exp(layout.sums((tok.logp - log_sum_sq) * scored) / n_scored.clamp(min=1))
        w_c, w_r = by_pair(w)
        return w_c * w_r


def _metrics(out: DPOOutput, tok, layout: SequenceLayout, n_scored, by_pair) -> dict[str, torch.Tensor]:
    """What TRL's DPOTrainer logs, under its names, as 0-d detached tensors (no host sync)."""
    per_sequence = {name: layout.sums(tok.stats[STATS.index(name)]) for name in ("entropy", "mean_logits", "is_top1")}
    count_c, count_r = (c.sum() for c in by_pair(n_scored))

    def ratio(num, den):  # TRL logs 0 when there is no token
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    logits_c, logits_r = (x.sum() for x in by_pair(per_sequence["mean_logits"]))
    entropy_c, entropy_r = (x.sum() for x in by_pair(per_sequence["entropy"]))
    top1_c, _ = by_pair(per_sequence["is_top1"])
    return {
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/accuracies": out.reward_accuracy,
        "rewards/margins": out.reward_margin,
        "logps/chosen": out.chosen_logps.detach().mean(),
        "logps/rejected": out.rejected_logps.detach().mean(),
        "logits/chosen": ratio(logits_c, count_c),
        "logits/rejected": ratio(logits_r, count_r),
        "entropy": ratio(entropy_c + entropy_r, count_c + count_r),
        "mean_token_accuracy": ratio(top1_c.sum(), count_c),
    }
