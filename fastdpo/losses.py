"""The paired preference losses on per-sequence log-probs ``(B,)``, TRL 1.16 ``DPOTrainer`` formulas.

Everything here is tiny torch code on ``(B,)`` tensors; autograd through it yields the per-sequence
coefficient ``c = dL/dlogp`` that the logits backward multiplies into ``onehot - softmax``. Both
``fastdpo.functional.dpo_loss`` (kernels) and ``fastdpo.reference.dpo_loss`` (plain PyTorch) end here.

With Δ = (logp_c − ref_c) − (logp_r − ref_r), β = ``beta`` and ε = ``label_smoothing``:

    sigmoid   −log σ(βΔ)                                   (ε unused, as in TRL)
    robust    [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε),  0 ≤ ε < 0.5
    hinge     max(0, 1 − βΔ)
    ipo       (Δ_avg − 1/(2β))²,  Δ_avg = (logp_c − ref_c)/n_c − (logp_r − ref_r)/n_r,
              n = completion tokens of the sequence (labels ≠ ignore_index), at least 1

The loss is the mean over pairs. Rewards are β·(logp − ref), detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


class DPOOutput(NamedTuple):
    """Result of a DPO loss call. ``loss`` is a scalar; the per-pair fields are ``(B,)``; metrics are detached."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor


def check_loss_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


def pair_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> torch.Tensor:
    """Per-pair loss ``(B,)`` from the policy-minus-reference log-ratios ``(B,)``."""
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        avg_delta = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        return (avg_delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")


def dpo_from_logps(
    logps: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    reference_free: bool,
    ignore_index: int,
) -> DPOOutput:
    """DPO loss and metrics from the stacked sequence log-probs ``(2B,)`` (chosen rows first)."""
    chosen_logps, rejected_logps = logps.chunk(2)
    if reference_free:
        ref_chosen_logps = ref_rejected_logps = torch.zeros_like(chosen_logps)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps are required (shape (B,)) unless reference_free=True"
        )
    chosen_logratios = chosen_logps - ref_chosen_logps.to(logps.dtype)
    rejected_logratios = rejected_logps - ref_rejected_logps.to(logps.dtype)
    # IPO's length normalisation counts label tokens as TRL counts completion_mask (before the shift).
    chosen_tokens, rejected_tokens = (labels != ignore_index).sum(1).to(logps.dtype).chunk(2)
    losses = pair_losses(
        chosen_logratios,
        rejected_logratios,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return DPOOutput(
        loss=losses.mean(),
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(logps.dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
    )
