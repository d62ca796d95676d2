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

``patch_trl()`` swaps the hook for the duration of a ``with`` block (or until ``.undo()``); ``DPOTrainer``
applies it around its own loss and reference computations only, so other trainers in the process are untouched.
"""

from __future__ import annotations

import importlib

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
                super().__init__(*args, **kwargs)

            def compute_loss(self, *args, **kwargs):
                with patch_trl():
                    return super().compute_loss(*args, **kwargs)

            def compute_ref_log_probs(self, *args, **kwargs):
                with patch_trl():
                    return super().compute_ref_log_probs(*args, **kwargs)

        _TRAINER = FastDPOTrainer
    return _TRAINER
