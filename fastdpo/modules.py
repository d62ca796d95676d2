"""``nn.Module`` shells over ``fastdpo.functional``: they hold the keyword configuration and nothing else."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastdpo import functional, fused_linear
from fastdpo.losses import DPOOutput, LossConfig


class DPOLoss(nn.Module):
    """``DPOLoss(beta=0.1, ...)(logits, labels, ref_chosen_logps, ref_rejected_logps, **batch) -> DPOOutput``.

    Same keywords and semantics as ``fastdpo.dpo_loss``; the loss options are validated at construction. With
    ``vocab_parallel_group`` (and ``vocab_start_index``) the logits passed to ``forward`` are this rank's shard;
    with ``context_parallel_group`` (and ``shift=False``) they are this rank's slice of the positions. Per-batch
    tensors (``ref_logits``, ``cu_seq_lens``, ``position_ids``, ``pairs``) go to ``forward``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        *,
        ignore_index: int = -100,
        shift: bool = True,
        return_metrics: bool = False,
        inplace_backward: bool = False,
        vocab_parallel_group=None,
        vocab_start_index: int | None = None,
        context_parallel_group=None,
        **loss_options,
    ):
        super().__init__()
        self.config = LossConfig(beta=beta, loss_type=loss_type, **loss_options)
        self.ignore_index = ignore_index
        self.shift = shift
        self.return_metrics = return_metrics
        self.inplace_backward = inplace_backward
        self.parallel = dict(vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index,
                             context_parallel_group=context_parallel_group)  # fmt: skip

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        **batch: torch.Tensor | None,
    ) -> DPOOutput:
        return functional.dpo_loss(
            logits,
            labels,
            ref_chosen_logps,
            ref_rejected_logps,
            **dataclasses.asdict(self.config),
            ignore_index=self.ignore_index,
            shift=self.shift,
            return_metrics=self.return_metrics,
            inplace_backward=self.inplace_backward,
            **self.parallel,
            **batch,
        )

    def extra_repr(self) -> str:
        c = self.config
        return f"beta={c.beta}, loss_type={c.loss_type!r}, label_smoothing={c.label_smoothing}"


class FusedLinearDPOLoss(nn.Module):
    """``FusedLinearDPOLoss(beta=0.1, ...)(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, **batch)``.

    ``fastdpo.fused_linear_dpo_loss`` with its keyword configuration held: the loss options, and the LM head's
    logit transform (``temperature``, ``logit_scale``, ``final_logit_softcapping``) and tile budget. Per-batch
    tensors (``bias``, ``ref_hidden``, ``ref_weight``, ``ref_bias``, ``cu_seq_lens``, ``position_ids``,
    ``pairs``) go to ``forward``. ``weight`` is passed per call (e.g. ``model.lm_head.weight``), so the module
    holds no parameter and ties to nothing; with ``vocab_parallel_group`` it is this rank's vocab shard. With
    ``context_parallel_group`` (and ``shift=False``) hidden is this rank's slice of the positions.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        *,
        ignore_index: int = -100,
        shift: bool = True,
        return_metrics: bool = False,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        final_logit_softcapping: float | None = None,
        tile_elements: int | None = None,
        vocab_parallel_group=None,
        vocab_start_index: int | None = None,
        context_parallel_group=None,
        **loss_options,
    ):
        super().__init__()
        self.config = LossConfig(beta=beta, loss_type=loss_type, **loss_options)
        self.call_options = dict(
            ignore_index=ignore_index, shift=shift, return_metrics=return_metrics, temperature=temperature,
            logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping, tile_elements=tile_elements,
            vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index,
            context_parallel_group=context_parallel_group,
        )  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        **batch: torch.Tensor | None,
    ) -> DPOOutput:
        return fused_linear.fused_linear_dpo_loss(
            hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, **dataclasses.asdict(self.config),
            **self.call_options, **batch,
        )  # fmt: skip

    def extra_repr(self) -> str:
        c = self.config
        return f"beta={c.beta}, loss_type={c.loss_type!r}, softcap={self.call_options['final_logit_softcapping']}"
