"""Liger-Kernel's fused-linear DPO loss, computed by fastdpo: the same constructor, call and outputs, so switching
is the import line.

    from fastdpo.integrations.liger import LigerFusedLinearDPOLoss   # was: from liger_kernel.chunked_loss import ...
    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, compute_nll_loss=True, alpha=0.5)
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
           rejected_rewards) = loss_fn(lm_head.weight, hidden, target, bias, ref_hidden, ref_weight, ref_bias)

Inputs as Liger takes them: ``_input`` ``[2B, T, H]`` (chosen rows first), ``target`` ``[2B, T]`` already aligned
with the hidden states (``ignore_index`` where unscored), the reference's hidden states and head when
``use_ref_model``. What differs from Liger's ``LigerFusedLinearDPOFunction``:

- the logits come in float32 tiles of scored rows only (``fastdpo.fused_linear_sequence_logps``), the reference's
  in a forward-only pass, and the backward recomputes each tile once; Liger computes every row, chunk by chunk,
  with the gradient of each chunk during the forward. ``compiled`` and ``chunk_size`` are accepted and unused;
- the logit means are computed without the logits: the sum over rows r and vocab v of h_r · w_v + b_v is
  (Σ_r h_r) · (Σ_v w_v) + rows · Σ_v b_v (float64), divided by rows · V as Liger divides, every position of the
  chosen (rejected) half counted;
- every ``fastdpo.LOSS_TYPES`` entry is accepted, not only Liger's ten (``ipo`` included), with TRL's formulas on
  the sequence log-probs (their means with ``average_log_prob``); a sequence with no scored token has log-prob 0
  where Liger's mean is 0/0;
- the returned log-probs, logit means, NLL (0 without ``compute_nll_loss``, as Liger returns it) and rewards are
  detached, as Liger's Function gives them no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdpo.fused_linear import fused_linear_sequence_logps
from fastdpo.losses import LossConfig, SequenceTerms, preference_loss


def liger_fused_linear_dpo(
    _input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, ignore_index=-100, beta=0.1,
    compute_nll_loss=False, compiled=True, use_ref_model=True, average_log_prob=False, chunk_size=1,
    loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05, alpha=1.0,
):  # fmt: skip
    """``liger_kernel.chunked_loss.functional.liger_fused_linear_dpo`` (Liger's ``Function.apply``), positional
    order included: ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards))``, the loss carrying gradients to ``_input``, ``weight`` and ``bias``."""
    del compiled, chunk_size  # Liger's tuning knobs; fastdpo's tiles follow V and the device
    if use_ref_model and (ref_input is None or ref_weight is None):
        raise ValueError("use_ref_model=True needs ref_input ([2B, T, H], the reference model's hidden states) and "
                         "ref_weight (its LM head); pass use_ref_model=False for a reference-free loss")  # fmt: skip
    if not isinstance(target, torch.Tensor) or target.ndim != 2 or target.shape[0] % 2:
        raise ValueError(f"target must be a [2B, T] tensor (chosen rows first), got "
                         f"{getattr(target, 'shape', type(target).__name__)}")  # fmt: skip
    B = target.shape[0] // 2
    cfg = LossConfig(beta=beta, loss_type=[loss_type, "sft"] if compute_nll_loss else loss_type,
                     loss_weights=[1.0, alpha] if compute_nll_loss else None, label_smoothing=label_smoothing,
                     reference_free=not use_ref_model, discopop_tau=discopop_tau)  # fmt: skip
    kw = dict(shift=False, average=average_log_prob, ignore_index=ignore_index)
    logps = fused_linear_sequence_logps(_input, weight, target, bias=bias, **kw)
    if use_ref_model:
        with torch.no_grad():
            ref_logps = fused_linear_sequence_logps(ref_input, ref_weight, target, bias=ref_bias, **kw)
    else:
        ref_logps = torch.zeros_like(logps)
    tokens = (target != ignore_index).sum(1).to(logps.dtype)
    sums = logps * tokens if average_log_prob else logps
    terms = SequenceTerms(
        chosen_logps=logps[:B], rejected_logps=logps[B:], ref_chosen_logps=ref_logps[:B],
        ref_rejected_logps=ref_logps[B:], chosen_tokens=tokens[:B], rejected_tokens=tokens[B:],
        sft_numerator=sums[:B].sum(), sft_denominator=tokens[:B].sum(), wpo_weights=None,
    )  # fmt: skip
    out = preference_loss(terms, cfg)
    nll = -(terms.sft_numerator / terms.sft_denominator).detach() if compute_nll_loss else out.loss.new_zeros(())
    chosen_mean, rejected_mean = _logits_means(_input, weight, bias, B)
    return out.loss, (out.chosen_logps.detach(), out.rejected_logps.detach(), chosen_mean, rejected_mean, nll,
                      out.chosen_rewards, out.rejected_rewards)  # fmt: skip


def _logits_means(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, B: int):
    """Means of ``hidden @ weight.T + bias`` over every row and vocab entry of the chosen ``[:B]`` and the rejected
    ``[B:]`` halves, without the logits (see above); the head is summed once for both."""
    with torch.no_grad():
        rows = B * hidden.shape[1]
        w_sum = weight.sum(0, dtype=torch.float64)  # no float64 copies of the head or the hidden states
        b_total = 0.0 if bias is None else rows * bias.sum(dtype=torch.float64)
        return tuple(((half.sum((0, 1), dtype=torch.float64) @ w_sum + b_total) / (rows * weight.shape[0]))
                     .to(torch.float32) for half in (hidden[:B], hidden[B:]))  # fmt: skip


class LigerFusedLinearDPOLoss(nn.Module):
    """``liger_kernel.chunked_loss.LigerFusedLinearDPOLoss``: same keywords and defaults, and
    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None)`` (the weight
    first, as Liger orders it). The loss options are checked at construction, as Liger checks them."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05):  # fmt: skip
        super().__init__()
        LossConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, discopop_tau=discopop_tau)
        self.options = dict(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss,
                            compiled=compiled, use_ref_model=use_ref_model, average_log_prob=average_log_prob,
                            chunk_size=chunk_size, loss_type=loss_type, label_smoothing=label_smoothing,
                            discopop_tau=discopop_tau, alpha=alpha)  # fmt: skip

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return liger_fused_linear_dpo(_input, lin_weight, target, bias, ref_input, ref_weight, ref_bias,
                                      **self.options)  # fmt: skip
