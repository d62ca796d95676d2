"""fastdpo on a transformers causal LM without its logits: run the backbone, then the fused-linear loss on the
last hidden states and the LM head.

    out = fastdpo.integrations.transformers.dpo_loss(model, batch, ref_chosen_logps, ref_rejected_logps, beta=0.1)
    # instead of: logits = model(**batch).logits; out = fastdpo.dpo_loss(logits, labels, ...)

``batch`` holds ``input_ids``, ``labels`` (TRL's concatenated layout: rows [0, B) chosen, [B, 2B) rejected,
-100 on prompt and padding) and whatever else the model's forward takes (``attention_mask``, ``position_ids``
for packed rows, ...). Works for any ``*ForCausalLM`` whose output embedding is an ``nn.Linear`` (tied to the
input embeddings or not; a bias is used when present). The logit transform is read from the config as TRL
1.16's fused LM head reads it: ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere),
``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), ``logits_scaling`` (Granite and MiniCPM3 divide by it,
HyperCLOVA X multiplies).
"""

from __future__ import annotations

import torch

from fastdpo.fused_linear import fused_linear_dpo_loss, fused_linear_sequence_logps
from fastdpo.losses import DPOOutput


def logit_transform(config) -> dict:
    """``{"logit_scale": a, "final_logit_softcapping": c}`` from a transformers config (its text config for
    multimodal models), as TRL reads them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return {"logit_scale": 1.0 if scale is None else float(scale), "final_logit_softcapping": softcap}


def lm_head(model) -> torch.nn.Linear:
    """The model's output projection; an error names what was found when it is not a linear layer."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"fastdpo's fused-linear path needs an nn.Linear LM head; {type(model).__name__}'s output "
                        f"embedding is {type(head).__name__}")  # fmt: skip
    return head


def last_hidden_states(model, batch: dict) -> torch.Tensor:
    """``[N, T, D]`` hidden states that the LM head would project: the backbone's output (``model.base_model``,
    as TRL calls it), without the head. ``labels`` in ``batch`` are not passed to the model. A PEFT model is read
    through ``get_base_model()`` (the transformers model with its adapters injected): its own ``base_model`` is
    the adapter wrapper, whose forward is the whole causal LM."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["use_cache"] = False
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model(**inputs).last_hidden_state


def _packing(batch: dict, kwargs: dict) -> dict:
    """A one-row batch with ``position_ids`` is packed: the loss reads its sequences from them too."""
    if batch["labels"].shape[0] == 1 and "position_ids" in batch and "cu_seq_lens" not in kwargs:
        return {"position_ids": batch["position_ids"]}
    return {}


def dpo_loss(
    model,
    batch: dict,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    ref_model=None,
    **kwargs,
) -> DPOOutput:
    """``fastdpo.fused_linear_dpo_loss`` of ``model`` on ``batch`` (see the module docstring); ``kwargs`` are its
    loss keywords. The reference: ``ref_*_logps`` ``[B]`` (e.g. from ``sequence_logps`` below under no_grad), or
    ``ref_model`` (run forward-only and scored through its own head in the same call), or
    ``reference_free=True``. Packed rows: pass ``position_ids`` in ``batch``; they are forwarded to the model
    and define the sequences for the loss."""
    head = lm_head(model)
    hidden = last_hidden_states(model, batch)
    kwargs = {**logit_transform(model.config), **kwargs}
    kwargs.update(_packing(batch, kwargs))
    if ref_model is not None:
        with torch.no_grad():
            ref_head = lm_head(ref_model)
            kwargs.update(ref_hidden=last_hidden_states(ref_model, batch), ref_weight=ref_head.weight,
                          ref_bias=ref_head.bias)  # fmt: skip
    return fused_linear_dpo_loss(hidden, head.weight, batch["labels"], ref_chosen_logps, ref_rejected_logps,
                                 bias=head.bias, **kwargs)  # fmt: skip


def sequence_logps(model, batch: dict, **kwargs) -> torch.Tensor:
    """``[N]`` summed label log-probs of ``model`` on ``batch`` without its logits (``fused_linear_sequence_logps``);
    run it under ``torch.no_grad()`` to precompute reference log-probs (``.chunk(2)`` gives chosen, rejected)."""
    head = lm_head(model)
    kwargs = {**logit_transform(model.config), **kwargs, **_packing(batch, kwargs)}
    return fused_linear_sequence_logps(last_hidden_states(model, batch), head.weight, batch["labels"],
                                       bias=head.bias, **kwargs)  # fmt: skip


class DPOLossWrapper(torch.nn.Module):
    """The model and its fused DPO loss as one module, so that DDP/FSDP wrap the whole computation:
    ``DistributedDataParallel(DPOLossWrapper(model, beta=0.1))(**batch, ref_chosen_logps=..., ...)`` returns the
    ``DPOOutput``. Gradient synchronisation needs the forward to run through the wrapper; calling
    ``dpo_loss(ddp.module, ...)`` would bypass it. Each rank's loss is the mean over its local pairs (as in TRL), so
    DDP's gradient average over equal local batches is the gradient of the global mean.
    """

    def __init__(self, model, ref_model=None, **loss_kwargs):
        super().__init__()
        self.model = model
        self.ref_model = ref_model
        self.loss_kwargs = loss_kwargs

    def forward(self, ref_chosen_logps=None, ref_rejected_logps=None, **batch) -> DPOOutput:
        return dpo_loss(self.model, batch, ref_chosen_logps, ref_rejected_logps, ref_model=self.ref_model,
                        **self.loss_kwargs)  # fmt: skip
