"""fastdpo: fused Triton kernels for DPO-style preference losses.

    import fastdpo
    out = fastdpo.dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, beta=0.1)
    out.loss.backward()
    # or, without the logits: from the last hidden states and the LM head
    out = fastdpo.fused_linear_dpo_loss(hidden, model.lm_head.weight, labels, ref_chosen_logps, ref_rejected_logps)

``fastdpo.reference`` holds the plain-PyTorch oracle with the same signatures.
"""

from fastdpo import reference
from fastdpo._logps_outputs import TokenLogps
from fastdpo.functional import dpo_loss, sequence_logps, token_logps
from fastdpo.fused_linear import fused_linear_dpo_loss, fused_linear_sequence_logps, fused_linear_token_logps
from fastdpo.losses import F_DIVERGENCES, LOSS_TYPES, DPOOutput
from fastdpo.modules import DPOLoss, FusedLinearDPOLoss
from fastdpo.sequences import shift_labels

__version__ = "0.1.0"

__all__ = [
    "DPOLoss", "DPOOutput", "F_DIVERGENCES", "FusedLinearDPOLoss", "LOSS_TYPES", "TokenLogps", "dpo_loss",
    "fused_linear_dpo_loss", "fused_linear_sequence_logps", "fused_linear_token_logps", "reference", "sequence_logps",
    "shift_labels", "token_logps",
]
