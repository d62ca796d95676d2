"""What the forward of the log-prob op returns, shared by the Triton launchers and the chunked PyTorch path
(kept out of ``fastdpo.kernels`` so the PyTorch path imports without Triton)."""

from __future__ import annotations

from typing import NamedTuple

import torch

# Optional per-token statistics, computed in the same sweep as the log-prob (channel order of ``stats``):
#   entropy           H = lse - sum_v p_v z_v
#   log_sum_sq_probs  log sum_v p_v^2   (WPO weights)
#   mean_logits       sum_v z_v / V
#   is_top1           1.0 if the label is the first argmax of z, else 0.0
STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class LogpsForward(NamedTuple):
    """Forward outputs, float32 (float64 for float64 logits), rows ``[N, T - shift]``, 0 on unscored rows.

    Separate allocations (no views of a shared buffer), so autograd can hand them out as outputs.
    """

    logp: torch.Tensor  # [N, T - shift] label log-probs
    lse: torch.Tensor  # [2, N, T - shift] (row max, log of the rescaled sum); lse.sum(0) is the log-sum-exp
    stats: torch.Tensor | None  # [len(STATS), N, T - shift], requested channels only
    ref_logp: torch.Tensor | None  # the same for reference logits read in the same sweep
    ref_stats: torch.Tensor | None


class TokenLogps(NamedTuple):
    """Per-token outputs of ``fastdpo.token_logps``, each ``[N, T - shift]`` (None when not requested), 0 (False)
    on unscored tokens. ``log_probs`` and ``entropy`` carry gradients."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None  # bool
    log_sum_sq_probs: torch.Tensor | None = None


OUTPUTS = TokenLogps._fields


def check_outputs(outputs: tuple[str, ...]) -> None:
    if isinstance(outputs, str):
        raise TypeError(f"outputs must be a tuple of names from {OUTPUTS}, got the string {outputs!r} "
                        f"(write ({outputs!r},))")  # fmt: skip
    unknown = set(outputs) - set(OUTPUTS)
    if unknown or not outputs:
        raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}, got {tuple(outputs)}")


def check_stats(stats: tuple[str, ...]) -> None:
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ValueError(f"outputs must be among {('log_probs',) + STATS}, got {sorted(unknown)}")
