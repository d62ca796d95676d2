"""TRL drop-in: TRL's ``DPOTrainer`` with its per-token log-probs computed by fastdpo.

    from fastdpo.integrations.trl import DPOTrainer     # instead of: from trl import DPOTrainer

Everything else is TRL's: ``DPOConfig`` and every loss option, the logged metrics, the reference model
(a ``ref_model``, a PEFT adapter disabled for the reference, or ``precompute_ref_log_probs``), accelerate/DDP/
FSDP/DeepSpeed. fastdpo replaces exactly one call, the one that turns the last hidden states and the LM head
into per-token outputs:

Covered: TRL >= 1.15 (tested: 1.16, the version CI installs), whose ``DPOTrainer`` gets its log-probs from
``add_fused_lm_head``, which calls ``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, bias,
targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)``. ``FusedLMHeadLogProbs``
answers the same call with ``fastdpo.fused_linear_token_logps``: float32 logit tiles (TRL rounds them to bf16:
0.2-0.4 nats per 256-token sequence, ``benchmarks/NOTES.md``), the same outputs (log-probs, entropy,
log sum p^2, mean logit, top-1).

Not covered: TRL 1.0-1.14, whose ``DPOTrainer`` computes log-probs from full logits through
``selective_log_softmax`` / ``selective_log_softmax_and_entropy`` (signatures that changed across those
releases). There the trainer raises ``ImportError`` naming the installed version; call ``fastdpo.dpo_loss`` on the
logits in your own loop, or upgrade TRL.

Padding-free: TRL 1.16's DPO only warns on ``padding_free=True`` and pads. ``DPOTrainer`` here honours it: each
padded batch is packed into one row (padding dropped, ``position_ids`` restarting per sequence), the model and
the reference run on that row, and the per-token outputs go back to TRL's padded layout, so TRL's loss and
metrics code runs unchanged. Attention stays within each sequence: flash-attention implementations read the
sequence boundaries from ``position_ids``; any other (sdpa, eager) gets a block-diagonal causal additive mask of
``total_tokens^2`` values in the model's dtype (fine for the short batches of DPO on CPU; use flash attention at
scale); a model's sliding window goes into that mask (per layer type where full and sliding layers mix). Without
flash attention a MoE router loss (``output_router_logits``) raises: TRL computes it from the attention mask,
expecting a 2-D one. Not supported together with padding-free (an error at construction): a PEFT adapter-disabled
reference, vision data.

``patch_trl()`` swaps the hook for the duration of a ``with`` block (or until ``.undo()``); ``DPOTrainer``
applies it around its own loss and reference computations only, so other trainers in the process are untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

from fastdpo.fused_linear import fused_linear_token_logps

OUTPUT_ORDER = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's return order


class FusedLMHeadLogProbs:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction``: same ``apply`` signature, same return order."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OUTPUT_ORDER[1:]):  # fmt: skip
        """``chunk_size`` (TRL's vocab tile width) is ignored: fastdpo tiles by scored rows over the whole vocab."""
        requested = ("log_probs", *(name for name in OUTPUT_ORDER[1:] if name in outputs))
        tok = fused_linear_token_logps(hidden, weight, targets, bias=bias, temperature=temperature,
                                       logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping,
                                       outputs=requested)  # fmt: skip
        return tuple(getattr(tok, name) for name in OUTPUT_ORDER)


def _hook():
    """(module, attribute, replacement) for the installed TRL: its fused LM head's log-prob function."""
    trl = importlib.import_module("trl")
    utils = importlib.import_module("trl.trainer.utils")
    dpo = importlib.import_module("trl.trainer.dpo_trainer")
    if hasattr(utils, "_ChunkedLogProbFunction") and hasattr(dpo, "add_fused_lm_head"):
        return utils, "_ChunkedLogProbFunction", FusedLMHeadLogProbs
    raise ImportError(f"fastdpo.integrations.trl needs a TRL whose DPOTrainer uses the fused LM head (trl >= 1.15); "
                      f"trl {trl.__version__} computes DPO log-probs from full logits: call fastdpo.dpo_loss on them, "
                      "or upgrade TRL")  # fmt: skip


class patch_trl:  # noqa: N801 - used like a function: `with patch_trl():` or `patch_trl()` ... `.undo()`
    """Route TRL's per-token log-probs through fastdpo until ``undo()`` (or the end of a ``with`` block)."""

    def __init__(self):
        self.module, self.name, replacement = _hook()
        self.original = getattr(self.module, self.name)
        setattr(self.module, self.name, replacement)

    def undo(self) -> None:
        setattr(self.module, self.name, self.original)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


class PackedModel:
    """Calls a (fused-head) causal LM on a padded ``[N, T]`` batch packed into one ``[1, total]`` row, and returns
    its per-token outputs in the padded ``[N, T - 1]`` layout. Other calls and attributes go to the model."""

    def __init__(self, model):
        object.__setattr__(self, "model", model)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *, input_ids, attention_mask, labels=None, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        keep = attention_mask.bool()
        position_ids = (keep.cumsum(1) - 1)[keep].unsqueeze(0)
        packed_labels = labels[keep].clone()
        packed_labels[position_ids[0] == 0] = -100  # a sequence's first token is never scored (nor read across)
        inner = _unwrapped(self.model)
        mask = {}
        if "flash" not in str(getattr(inner.config, "_attn_implementation", "")):
            _check_router_loss(inner.config)
            mask = {"attention_mask": _packed_attention_mask(inner.config, keep, inner.dtype)}
        out = self.model(input_ids=input_ids[keep].unsqueeze(0), position_ids=position_ids,
                         labels=packed_labels.unsqueeze(0), fused_lm_head=True, **mask, **kwargs)  # fmt: skip
        # padded (n, t) scores token t + 1 of row n: packed position j = rank of token (n, t) among kept tokens
        scored = keep[:, :-1] & keep[:, 1:]
        source = (keep.flatten().cumsum(0) - 1).view_as(keep)[:, :-1][scored]
        for name in PER_TOKEN_FIELDS:
            value = getattr(out, name, None)
            if value is not None:
                setattr(out, name, value.new_zeros(scored.shape).masked_scatter(scored, value[0][source]))
        return out


def _unwrapped(model):
    """The model inside DDP / DeepSpeed / torch.compile wrappers (the trainer may hand ``compute_loss`` a wrapper)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _check_router_loss(config) -> None:
    """MoE models' router loss is computed from the attention mask (TRL hands it the mask, expecting a 2-D one):
    packed without flash attention it would get the ``[total, total]`` block mask."""
    if getattr(config, "output_router_logits", False):
        raise ValueError("padding_free=True with output_router_logits (a MoE router loss) needs flash attention: the "
                         "router loss is computed from the attention mask, which packed is a [total, total] block "
                         "mask; use attn_implementation='flash_attention_2' (or 3), or padding_free=False")  # fmt: skip


def _packed_attention_mask(config, keep: torch.Tensor, dtype: torch.dtype):
    """The 4-D attention mask of a packed row for attention other than flash: each sequence's causal block, and,
    where the model has a sliding window that some sequence exceeds, that window within it. A model that mixes
    full and sliding layers (``config.layer_types``) gets ``{layer type: mask}``, which transformers takes as
    given; one without layer types slides in every layer, so its one mask is the windowed one."""
    sequence = torch.repeat_interleave(torch.arange(keep.shape[0], device=keep.device), keep.sum(1))
    causal = torch.ones(sequence.numel(), sequence.numel(), dtype=torch.bool, device=keep.device).tril()
    allowed = (sequence[:, None] == sequence[None, :]) & causal
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if window is None or ("sliding_attention" not in layer_types and layer_types) or keep.sum(1).max() <= window:
        return _additive(allowed, dtype)
    position = torch.arange(sequence.numel(), device=keep.device)
    windowed = allowed & (position[:, None] - position[None, :] < window)  # query - key < window, as transformers
    if not layer_types:
        return _additive(windowed, dtype)
    return {"full_attention": _additive(allowed, dtype), "sliding_attention": _additive(windowed, dtype)}


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[1, 1, q, k]`` additive mask in the model's dtype: 0 where ``allowed``, the dtype's lowest value elsewhere.
    Additive, not boolean: transformers uses a 4-D mask as given, and eager attention adds it to the scores (a
    boolean True would add 1 and mask nothing)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def __getattr__(name: str):
    # The trainer subclass is built on first access, so importing this module does not import TRL.
    if name in ("DPOTrainer", "FastDPOTrainer"):
        return _trainer_class()
    raise AttributeError(name)


_TRAINER = None


def _trainer_class():
    global _TRAINER
    if _TRAINER is None:
        import trl

        class FastDPOTrainer(trl.DPOTrainer):
            """``trl.DPOTrainer`` whose per-token log-probs come from fastdpo (see the module docstring)."""

            def __init__(self, *args, **kwargs):
                _hook()  # fail at construction, not at the first step, on an unsupported TRL
                config = kwargs.get("args", args[2] if len(args) > 2 else None)  # (model, ref_model, args, ...)
                self.fastdpo_packed = bool(getattr(config, "padding_free", False))
                with warnings.catch_warnings():
                    if self.fastdpo_packed:  # TRL's "padding_free is disabled" warning: not true here
                        warnings.filterwarnings("ignore", message=".*padding_free=True.*")
                    super().__init__(*args, **kwargs)
                if self.fastdpo_packed and self.ref_model is None and not self.precompute_ref_logps:
                    raise ValueError("padding_free=True with fastdpo needs a ref_model or "
                                     "precompute_ref_log_probs=True (an adapter-disabled PEFT reference is not "
                                     "supported packed)")  # fmt: skip
                if self.fastdpo_packed and self._is_vision_dataset:
                    raise ValueError("padding_free=True with fastdpo does not support vision datasets")

            @contextlib.contextmanager
            def _packed_reference(self):
                ref = self.ref_model
                if self.fastdpo_packed and ref is not None:
                    self.ref_model = PackedModel(ref)
                try:
                    yield
                finally:
                    self.ref_model = ref

            def compute_loss(self, model, *args, **kwargs):
                with patch_trl(), self._packed_reference():
                    return super().compute_loss(PackedModel(model) if self.fastdpo_packed else model, *args, **kwargs)

            def compute_ref_log_probs(self, model, *args, **kwargs):
                with patch_trl():
                    return super().compute_ref_log_probs(PackedModel(model) if self.fastdpo_packed else model, *args,
                                                         **kwargs)  # fmt: skip

        _TRAINER = FastDPOTrainer
    return _TRAINER
