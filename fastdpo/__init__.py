"""fastdpo: fused Triton kernels for DPO-style preference losses.

    import fastdpo
    out = fastdpo.dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, beta=0.1)
    out.loss.backward()

``fastdpo.reference`` holds the plain-PyTorch oracle with the same signatures.
"""

from fastdpo import reference
from fastdpo._logps_outputs import TokenLogps
from fastdpo.functional import dpo_loss, sequence_logps, token_logps
from fastdpo.losses import F_DIVERGENCES, LOSS_TYPES, DPOOutput
from fastdpo.modules import DPOLoss

__version__ = "0.1.0"

__all__ = [
    "DPOLoss", "DPOOutput", "F_DIVERGENCES", "LOSS_TYPES", "TokenLogps", "dpo_loss", "reference", "sequence_logps",
    "token_logps",
]
