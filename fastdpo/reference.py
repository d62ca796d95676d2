"""Plain-PyTorch reference with the same signatures and semantics as ``fastdpo.functional``: the oracle the
kernels are tested against (call it with float64 logits for ground truth).

It is the naive computation most training loops write: ``log_softmax`` over the whole ``[N, T, V]`` tensor in
the logits' dtype, then a gather, so it materialises N x T x V log-probs (and, under autograd, their gradient
buffers). ``inplace_backward`` is accepted for signature compatibility and has no effect.
"""

from __future__ import annotations

import torch

from fastdpo import _validation
from fastdpo.losses import DPOOutput, check_loss_options, dpo_from_logps


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[N, T - shift]`` label log-probs in the logits' dtype, 0 where the label is ``ignore_index``."""
    _validation.check_logits_labels(
        logits, labels, shift=shift, temperature=temperature, ignore_index=ignore_index
    )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logprobs = (logits / temperature).log_softmax(-1)
    scored = labels != ignore_index
    picked = logprobs.gather(-1, torch.where(scored, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = True,
    average: bool = False, temperature: float = 1.0, inplace_backward: bool = False,
) -> torch.Tensor:
    """``[N]`` sum (or mean over scored tokens, 0 for none) of label log-probs, in the logits' dtype."""
    per_token = token_logps(logits, labels, ignore_index=ignore_index, shift=shift, temperature=temperature)
    if not average:
        return per_token.sum(1)
    n_scored = (labels[:, int(shift):] != ignore_index).sum(1).clamp(min=1)
    return per_token.sum(1) / n_scored


def dpo_loss(
    logits: torch.Tensor, labels: torch.Tensor, ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None, *, beta: float = 0.1, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, reference_free: bool = False, ignore_index: int = -100, shift: bool = True,
    inplace_backward: bool = False,
) -> DPOOutput:
    """Same contract as ``fastdpo.dpo_loss``."""
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=1.0, ignore_index=ignore_index)
    check_loss_options(loss_type, beta, label_smoothing)
    B = _validation.check_pairs(logits.shape[0])
    _validation.check_reference_logps("ref_chosen_logps", ref_chosen_logps, B, logits.device)
    _validation.check_reference_logps("ref_rejected_logps", ref_rejected_logps, B, logits.device)
    logps = sequence_logps(logits, labels, ignore_index=ignore_index, shift=shift)
    return dpo_from_logps(
        logps, labels, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
        label_smoothing=label_smoothing, reference_free=reference_free, ignore_index=ignore_index,
    )
