"""Argument checks shared by ``fastdpo.functional`` and ``fastdpo.reference``, so both reject the same inputs
with the same message: each error names the argument, what was expected and what was received.

Label values are checked against ``[0, V)`` where that costs no host sync: always for CPU tensors, and for
CUDA tensors only with ``FASTDPO_CHECK_LABELS=1`` (a debugging switch; it synchronises). Unchecked, an
out-of-range label is never dereferenced: its token's log-prob is NaN, so the loss is NaN, not silently wrong.
"""

from __future__ import annotations

import os

import torch

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits_labels(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, temperature: float, ignore_index: int
) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"logits and labels must be tensors, got {type(logits).__name__} and {type(labels).__name__}"
        )
    if logits.ndim != 3:
        raise ValueError(f"logits must be 3-D (N, T, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must have a dtype in {LOGITS_DTYPES}, got {logits.dtype}")
    N, T, V = logits.shape
    if N == 0 or V == 0:
        raise ValueError(f"logits must have at least one sequence and one vocab entry, got shape {(N, T, V)}")
    if T < 1 + int(shift):
        raise ValueError(f"logits need T >= {1 + int(shift)} positions with shift={shift}, got shape {(N, T, V)}")
    if logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be unit-stride in the vocab dimension, got strides {logits.stride()}; "
            "views along N and T are fine, a transposed vocab dimension needs .contiguous()"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != (N, T):
        raise ValueError(f"labels must have shape (N, T) = {(N, T)} to match logits, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    check_label_values(labels, V, ignore_index, first_scored=int(shift))


def check_label_values(labels: torch.Tensor, V: int, ignore_index: int, first_scored: int) -> None:
    """Raise if a scored label (``labels[:, first_scored:]``) is neither ``ignore_index`` nor a vocab id, where
    that needs no host sync (see above)."""
    if labels.device.type != "cpu" and os.environ.get("FASTDPO_CHECK_LABELS") != "1":
        return
    scored = labels[:, first_scored:]
    bad = (scored != ignore_index) & ((scored < 0) | (scored >= V))
    if bad.any():
        n, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, V) = [0, {V}) or equal ignore_index={ignore_index} where scored; "
            f"got {int(scored[n, t])} at labels[{n}, {t + first_scored}]"
        )


def check_pairs(N: int) -> int:
    """Number of pairs B for a chosen-then-rejected batch of N rows."""
    if N % 2:
        raise ValueError(f"logits must hold 2B rows (chosen rows [0, B), then rejected rows [B, 2B)), got N = {N}")
    return N // 2


def check_reference_logps(name: str, value: torch.Tensor | None, B: int, device: torch.device) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({B},), got {type(value).__name__}")
    if tuple(value.shape) != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one value per pair), got {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {value.device}")
