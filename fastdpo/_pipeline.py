"""From per-token outputs to per-sequence sums and the DPO-family loss, for every entry point.

``fastdpo.functional`` (logits) and ``fastdpo.fused_linear`` (hidden states + LM head) differ only in how they get
per-token outputs. Each passes a ``TokenSource``: called with the masked labels ``[N, T]``, the statistics to
compute and whether the reference rides along, it returns ``fastdpo.ops.logps.TokenOutputs`` rows
``[N, T - shift]``. Everything after that (sequence sums, pairing, LD-DPO and WPO weights, the loss, TRL's
metrics) is here, once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdpo import _validation
from fastdpo._logps_outputs import STATS
from fastdpo.losses import DPOOutput, LossConfig, SequenceTerms, preference_loss
from fastdpo.ops.logps import TokenOutputs
from fastdpo.sequences import SequenceLayout

TokenSource = Callable[[torch.Tensor, tuple[str, ...], bool], TokenOutputs]


def ordered_stats(names) -> tuple[str, ...]:
    """The requested statistics in ``STATS`` channel order."""
    return tuple(name for name in STATS if name in names)


def sequence_sums(
    source: TokenSource,
    labels: torch.Tensor,
    layout: SequenceLayout,
    *,
    ignore_index: int,
    average: bool,
    ld_alpha: float | None,
    pairs: torch.Tensor | None,
) -> torch.Tensor:
    """``sequence_logps`` after validation: ``[S]`` sums (means with ``average``), LD-DPO weighted with ``ld_alpha``."""
    if pairs is not None and ld_alpha is None:
        raise ValueError("pairs has no effect on sequence log-probs without ld_alpha (LD-DPO weights a sequence by its "
                         "pair); pass it to dpo_loss, or with ld_alpha")  # fmt: skip
    labels = layout.mask_labels(labels, ignore_index)
    per_token = source(labels, (), False).logp
    if ld_alpha is None and not average:
        return layout.sums(per_token)  # the plain sums: no launch beyond the log-prob kernel and the sums
    scored = (labels[:, layout.shift :] != ignore_index).to(per_token.dtype)
    if ld_alpha is not None:
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
        pairs = _validation.resolve_pairs(pairs, layout.num_sequences, labels.device, distinct=True)
        per_token = per_token * _ld_alpha_weights(ld_alpha, layout, scored, by_pair_of(pairs, layout.sums(scored)),
                                                  pairs)  # fmt: skip
    total = layout.sums(per_token)
    return total / layout.sums(scored).clamp(min=1) if average else total


def preference(
    source: TokenSource,
    labels: torch.Tensor,
    layout: SequenceLayout,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    cfg: LossConfig,
    *,
    ignore_index: int,
    has_inline_reference: bool,
    pairs: torch.Tensor | None,
    return_metrics: bool,
) -> DPOOutput:
    """``dpo_loss`` after validation of the inputs the source reads. ``has_inline_reference``: the source can
    compute the reference's per-token log-probs in the same sweep (``ref_logits`` or ``ref_hidden``)."""
    device = labels.device
    if pairs is None:  # the default pairing is built after the kernel's launch, its B known now
        B = _validation.check_pairs(layout.num_sequences)
    else:
        pairs = _validation.resolve_pairs(pairs, layout.num_sequences, device, distinct=cfg.ld_alpha is not None)
        B = pairs.shape[0]
    _validation.check_reference_logps("ref_chosen_logps", ref_chosen_logps, B, device)
    _validation.check_reference_logps("ref_rejected_logps", ref_rejected_logps, B, device)
    use_inline_ref = cfg.needs_reference and has_inline_reference
    if cfg.needs_reference and not use_inline_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError("a reference is required: ref_chosen_logps and ref_rejected_logps of shape (B,), or "
                         "ref_logits (ref_hidden on the fused-linear path), or reference_free=True")  # fmt: skip

    stats = (("entropy", "mean_logits", "is_top1") if return_metrics else ()) + (
        ("log_sum_sq_probs",) if cfg.use_weighting else ()
    )
    # the log-prob kernel first: the small launches below then queue behind it instead of delaying it
    masked = layout.mask_labels(labels, ignore_index)
    tok = source(masked, ordered_stats(stats), use_inline_ref)
    if pairs is None:
        pairs = _validation.resolve_pairs(None, layout.num_sequences, device)
    chosen_tokens, rejected_tokens = by_pair_of(pairs, layout.label_counts(labels, ignore_index))
    labels = masked
    scored = (labels[:, layout.shift :] != ignore_index).to(tok.logp.dtype)
    n_scored = layout.sums(scored)

    def by_pair(per_sequence):
        return by_pair_of(pairs, per_sequence)

    weights = _ld_alpha_weights(cfg.ld_alpha, layout, scored, by_pair(n_scored), pairs)
    weighted = (lambda x: x) if weights is None else (lambda x: x * weights)
    raw_sums = layout.sums(tok.logp)
    chosen_logps, rejected_logps = by_pair(raw_sums if weights is None else layout.sums(weighted(tok.logp)))
    if not cfg.needs_reference:
        ref_chosen_logps = ref_rejected_logps = torch.zeros_like(chosen_logps)
    elif use_inline_ref:
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
        wpo_weights=_wpo_weights(tok, layout, scored, n_scored, by_pair) if cfg.use_weighting else None,
    )
    out = preference_loss(terms, cfg)
    if return_metrics:
        # neither out._replace(...) nor out[:-1]: torch 2.8's Dynamo traces neither
        out = DPOOutput(*list(out)[:-1], metrics=_metrics(out, tok, layout, n_scored, by_pair))
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
