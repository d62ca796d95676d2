"""Public functions: validate, run the fused log-prob op, reduce per sequence, apply the DPO loss.

Shapes: N rows (sequences), T positions, V vocab. A DPO batch is TRL's concatenated batch: rows [0, B) are the
chosen completions and rows [B, 2B) the rejected ones (N = 2B). ``labels`` are aligned with the input ids
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
from fastdpo.losses import DPOOutput, check_loss_options, dpo_from_logps
from fastdpo.ops.logps import LogpsOptions, token_logps


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    temperature: float = 1.0,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Sum (or, with ``average=True``, mean) of each sequence's label log-probs.

    logits ``[N, T, V]`` float16/bfloat16/float32/float64, labels ``[N, T]`` integer ->
    ``[N]`` float32 (float64 for float64 logits). A sequence with no scored token gives 0.
    """
    _validation.check_logits_labels(
        logits, labels, shift=shift, temperature=temperature, ignore_index=ignore_index
    )
    options = LogpsOptions(
        shift=shift, ignore_index=ignore_index, temperature=float(temperature), inplace_backward=inplace_backward
    )
    per_token = token_logps(logits, labels, options).logp
    return reduce_sequences(per_token, labels, ignore_index=ignore_index, shift=shift, average=average)


def reduce_sequences(
    per_token: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, shift: bool, average: bool
) -> torch.Tensor:
    """``[N, T - shift]`` per-token log-probs (0 on unscored tokens) -> ``[N]`` sums or means."""
    total = per_token.sum(1)
    if not average:
        return total
    scored = labels[:, int(shift) :] != ignore_index
    return total / scored.sum(1).clamp(min=1).to(total.dtype)


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    ignore_index: int = -100,
    shift: bool = True,
    inplace_backward: bool = False,
) -> DPOOutput:
    """DPO loss over TRL's concatenated batch, from the policy logits in one fused sweep.

    logits ``[2B, T, V]``, labels ``[2B, T]``, ref_chosen_logps / ref_rejected_logps ``[B]`` (summed reference
    log-probs, e.g. precomputed by ``sequence_logps`` under ``torch.no_grad()``), or ``reference_free=True``.
    Returns a ``DPOOutput``; see ``fastdpo.losses`` for the loss formulas.
    """
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=1.0, ignore_index=ignore_index)
    check_loss_options(loss_type, beta, label_smoothing)
    B = _validation.check_pairs(logits.shape[0])
    _validation.check_reference_logps("ref_chosen_logps", ref_chosen_logps, B, logits.device)
    _validation.check_reference_logps("ref_rejected_logps", ref_rejected_logps, B, logits.device)
    logps = sequence_logps(
        logits, labels, ignore_index=ignore_index, shift=shift, inplace_backward=inplace_backward
    )
    return dpo_from_logps(
        logps,
        labels,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        ignore_index=ignore_index,
    )
