"""The paired preference losses on per-sequence log-probs ``(B,)``: TRL 1.16 ``DPOTrainer`` formulas.

Everything here is tiny torch code on ``(B,)`` tensors; autograd through it yields the per-sequence
coefficient ``c = dL/dlogp`` that the logits backward multiplies into ``onehot - softmax``. Both
``fastdpo.functional.dpo_loss`` (kernels) and ``fastdpo.reference.dpo_loss`` (plain PyTorch) end here, and
``tests/test_losses.py`` checks every formula against an independent float64 transcription.

Notation: ρ_c = logp_c − ref_c, ρ_r = logp_r − ref_r (log-ratios); s = f'(exp ρ) the f-divergence score
(s = ρ for reverse KL); Δ = s_c − s_r; β = ``beta``; ε = ``label_smoothing``; n = completion tokens.

    sigmoid        −log σ(βΔ)                              hinge       max(0, 1 − βΔ)
    ipo            (s_c/n_c − s_r/n_r − 1/(2β))²            sigmoid_norm −log σ(β(s_c/n_c − s_r/n_r))
    robust         [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε)
    exo_pair       σ(βΔ)(log σ(βΔ) − log(1−ε)) + σ(−βΔ)(log σ(−βΔ) − log ε)
    nca_pair       −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)
    bco_pair       −log σ(βρ_c) − log σ(−βρ_r)
    sppo_hard      (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²
    aot            −(1−ε) log σ(βd) − ε log σ(−βd),  d = sort(logp_c − logp_r) − sort(ref_c − ref_r)
    aot_unpaired   the same with d = sort(ρ_c) − sort(ρ_r)
    apo_zero       1 − σ(βρ_c) + σ(βρ_r)                   apo_down    σ(βρ_c) + 1 − σ(β(ρ_c − ρ_r))
                   (computed as σ(−x) for 1 − σ(x))
    discopop       (1 − σ(βΔ/τ))·(−log σ(βΔ)) + σ(βΔ/τ)·e^(−βΔ),  τ = ``discopop_tau``
    sft            −(Σ chosen token log-probs) / (Σ chosen tokens)   (one value for the batch)
    simpo          −(1−ε) log σ(βu) − ε log σ(−βu),  u = logp_c/n_c − logp_r/n_r − γ/β   (reference-free,
                   from TRL's CPO trainer; γ = ``simpo_gamma``)

A list of loss types is TRL's weighted mix Σ_k w_k mean(loss_k). With WPO weighting (``use_weighting``),
each pair's loss is multiplied by w_c·w_r, w = exp(mean over completion tokens of (log p_label − log Σ p²)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo",
)  # fmt: skip
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the f-DPO reparameterisation only cancels log Z(x) in the chosen-minus-rejected difference.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")  # sort across the batch: per-pair WPO weights would misalign
REFERENCE_FREE_LOSS_TYPES = ("simpo",)


class DPOOutput(NamedTuple):
    """Result of a DPO loss call. ``loss`` is a scalar; the per-pair fields are ``(B,)``; metrics are detached.

    ``metrics`` (with ``return_metrics=True``) holds what TRL's ``DPOTrainer`` logs, under TRL's names, as
    0-d tensors (no host sync): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``logits/chosen``, ``logits/rejected``,
    ``entropy``, ``mean_token_accuracy``.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    metrics: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class LossConfig:
    """The loss keywords of ``dpo_loss`` (TRL ``DPOConfig`` names and defaults), validated on construction.
    The API functions name each keyword when they build it: ``LossConfig(**locals())``-style shortcuts break
    ``torch.compile(fullgraph=True)`` before torch 2.13, whose Dynamo cannot trace ``locals()``."""

    beta: float = 0.1
    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    label_smoothing: float = 0.0
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5

    def __post_init__(self):
        types = self.loss_types
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown or not types:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)} (or a list of them), got {self.loss_type!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss type {types}, got {self.loss_weights}")
        if not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be finite and > 0, got {self.beta}")
        if "robust" in types and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {self.label_smoothing}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {self.label_smoothing}")
        if "exo_pair" in types and not 0.0 < self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in (0, 1) for loss_type='exo_pair' (EXO suggests 1e-3), "
                             f"got {self.label_smoothing}")  # fmt: skip
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCES)}, got {self.f_divergence_type!r}")
        if self.f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSS_TYPES):
            raise ValueError(f"f_divergence_type={self.f_divergence_type!r} supports only loss types "
                             f"{list(F_DIVERGENCE_LOSS_TYPES)}, got {types}")  # fmt: skip
        if self.use_weighting and set(types) & set(SORTING_LOSS_TYPES):
            raise ValueError(f"use_weighting (WPO) cannot be combined with {list(SORTING_LOSS_TYPES)}: they sort "
                             "pairs across the batch, which misaligns per-pair weights")  # fmt: skip
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {self.ld_alpha}")
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and not set(self.loss_types) <= set(REFERENCE_FREE_LOSS_TYPES)


class SequenceTerms(NamedTuple):
    """Per-sequence inputs of the loss, each ``(B,)``: chosen first, rejected second in every pair field."""

    chosen_logps: torch.Tensor  # summed (ld_alpha-weighted) log-probs, with gradient
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor  # zeros when reference-free
    ref_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor  # label tokens per sequence (TRL's completion_mask.sum), float
    rejected_tokens: torch.Tensor
    sft_numerator: torch.Tensor  # 0-d: Σ chosen token log-probs (unweighted), with gradient
    sft_denominator: torch.Tensor  # 0-d: Σ chosen scored tokens
    wpo_weights: torch.Tensor | None  # (B,) w_c·w_r, detached, or None


def _f_score(logratio: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """f'(exp ρ): the score that replaces the log-ratio under an f-divergence (TRL's f-DPO)."""
    kind = cfg.f_divergence_type
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence" and abs(cfg.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a = cfg.f_alpha_divergence_coef  # f'(t) = (t^(α−1) − 1) / (α − 1); exp clamped as TRL clamps it
        clamp_max = {torch.float16: 11.0}.get(logratio.dtype, 80.0)
        return (torch.exp(torch.clamp(((a - 1) * logratio).float(), max=clamp_max)) - 1).to(logratio.dtype) / (a - 1)
    return logratio  # reverse KL, and the α → 1 limit of the α-divergence


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def pair_losses(terms: SequenceTerms, loss_type: str, cfg: LossConfig) -> torch.Tensor:
    """Per-pair loss ``(B,)`` of one loss type (``sft``: its batch value expanded to ``(B,)``)."""
    beta, eps = cfg.beta, cfg.label_smoothing
    rho_c = terms.chosen_logps - terms.ref_chosen_logps
    rho_r = terms.rejected_logps - terms.ref_rejected_logps
    s_c, s_r = _f_score(rho_c, cfg), _f_score(rho_r, cfg)
    delta = s_c - s_r
    n_c, n_r = terms.chosen_tokens.clamp(min=1), terms.rejected_tokens.clamp(min=1)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (s_c / n_c - s_r / n_r - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * (s_c / n_c - s_r / n_r))
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        q_c, q_r = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
        return (q_c * (F.logsigmoid(beta * delta) - math.log1p(-eps))
                + q_r * (F.logsigmoid(-beta * delta) - math.log(eps)))  # fmt: skip
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * rho_c) - 0.5 * F.logsigmoid(-beta * rho_c) - 0.5 * F.logsigmoid(-beta * rho_r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * rho_c) - F.logsigmoid(-beta * rho_r)
    if loss_type == "sppo_hard":
        return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
    if loss_type == "aot":
        policy = (terms.chosen_logps - terms.rejected_logps).sort(dim=0).values
        ref = (terms.ref_chosen_logps - terms.ref_rejected_logps).sort(dim=0).values
        return _smoothed_sigmoid(beta * (policy - ref), eps)
    if loss_type == "aot_unpaired":
        return _smoothed_sigmoid(beta * (rho_c.sort(dim=0).values - rho_r.sort(dim=0).values), eps)
    if loss_type == "apo_zero":  # 1 − σ(x) written σ(−x): no cancellation in value or gradient at large x
        return torch.sigmoid(-beta * rho_c) + torch.sigmoid(beta * rho_r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * rho_c) + torch.sigmoid(-beta * (rho_c - rho_r))
    if loss_type == "discopop":
        x = beta * delta
        mix = torch.sigmoid(x / cfg.discopop_tau)
        return -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix
    if loss_type == "sft":
        return (-terms.sft_numerator / terms.sft_denominator.clamp(min=1)).expand(rho_c.shape)
    if loss_type == "simpo":
        u = terms.chosen_logps / n_c - terms.rejected_logps / n_r - cfg.simpo_gamma / beta
        return _smoothed_sigmoid(beta * u, eps)
    raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")


def preference_loss(terms: SequenceTerms, cfg: LossConfig) -> DPOOutput:
    """Loss (TRL's weighted mix of per-pair means) and the per-pair rewards.

    The ``(B,)`` arithmetic runs in float64 (free at this size): log-ratios are differences of large
    log-probs, and float32 sigmoids of them lose digits that the coefficient c = dL/dlogp then multiplies
    into every gradient element. Results are cast back to the log-probs' dtype.
    """
    dtype = terms.chosen_logps.dtype
    wide = torch.float64 if terms.chosen_logps.device.type in ("cpu", "cuda") else dtype
    terms = SequenceTerms(*(None if t is None else t.to(wide) for t in terms))
    weights = cfg.loss_weights or [1.0] * len(cfg.loss_types)
    loss = 0.0
    for loss_type, weight in zip(cfg.loss_types, weights):
        per_pair = pair_losses(terms, loss_type, cfg)
        if terms.wpo_weights is not None:
            per_pair = per_pair * terms.wpo_weights
        loss = loss + per_pair.mean() * weight
    if set(cfg.loss_types) <= set(REFERENCE_FREE_LOSS_TYPES):  # SimPO's rewards: β · average log-prob (TRL CPO)
        chosen_rewards = cfg.beta * (terms.chosen_logps / terms.chosen_tokens.clamp(min=1)).detach()
        rejected_rewards = cfg.beta * (terms.rejected_logps / terms.rejected_tokens.clamp(min=1)).detach()
    else:
        chosen_rewards = cfg.beta * (terms.chosen_logps - terms.ref_chosen_logps).detach()
        rejected_rewards = cfg.beta * (terms.rejected_logps - terms.ref_rejected_logps).detach()
    return DPOOutput(
        loss=loss.to(dtype),
        chosen_logps=terms.chosen_logps.to(dtype),
        rejected_logps=terms.rejected_logps.to(dtype),
        chosen_rewards=chosen_rewards.to(dtype),
        rejected_rewards=rejected_rewards.to(dtype),
        reward_accuracy=(chosen_rewards > rejected_rewards).to(dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean().to(dtype),
    )
