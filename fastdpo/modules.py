"""``nn.Module`` shells over ``fastdpo.functional``: they hold the keyword configuration and nothing else."""

from __future__ import annotations

import torch
from torch import nn

from fastdpo import functional
from fastdpo.losses import DPOOutput, check_loss_options


class DPOLoss(nn.Module):
    """``DPOLoss(beta=0.1, ...)(logits, labels, ref_chosen_logps, ref_rejected_logps) -> DPOOutput``.

    Same keywords and semantics as ``fastdpo.dpo_loss``; the options are validated at construction.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        ignore_index: int = -100,
        shift: bool = True,
        inplace_backward: bool = False,
    ):
        super().__init__()
        check_loss_options(loss_type, beta, label_smoothing)
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_free = reference_free
        self.ignore_index = ignore_index
        self.shift = shift
        self.inplace_backward = inplace_backward

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
    ) -> DPOOutput:
        return functional.dpo_loss(
            logits,
            labels,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            reference_free=self.reference_free,
            ignore_index=self.ignore_index,
            shift=self.shift,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"
