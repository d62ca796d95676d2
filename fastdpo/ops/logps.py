"""Autograd op: per-token label log-probs from logits, with a backward that never builds a softmax tensor.

``TokenLogpsFunction.apply(logits [N, T, V], labels [N, T], ref_logits or None, options)`` returns
``(logp, entropy, stats, ref_logp, ref_stats)``: ``logp [N, T - shift]`` (float32, float64 for float64
logits; 0 on unscored tokens) and ``entropy`` (when requested) carry gradients; ``stats
[len(STATS), N, T - shift]`` and the reference's outputs (or None) do not. Saved for backward: the logits (a reference, no copy), the labels and the per-token
log-sum-exp pair ``[2, N, T - shift]``. The backward recomputes each softmax row from the logits and writes
``dlogits = g / temperature * (onehot(label) - softmax(z))`` in the logits' dtype.

Backend choice, per call: Triton kernels for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
(tests); the chunked PyTorch path otherwise, for float64, or when Triton is missing. The environment
variable ``FASTDPO_BACKEND`` (``auto`` | ``triton`` | ``torch``) overrides the choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastdpo import chunked
from fastdpo._logps_outputs import STATS, LogpsForward

try:
    from fastdpo.kernels import logps as triton_logps
except ImportError:  # Triton is optional on CPU-only installs
    triton_logps = None

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LogpsOptions:
    """Everything about a call that is not a tensor; frozen so backward returns a single ``None`` for it."""

    shift: bool = True
    ignore_index: int = -100
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None
    inplace_backward: bool = False
    stats: tuple[str, ...] = ()  # names from fastdpo._logps_outputs.STATS


def select_backend(logits: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for these logits, honouring ``FASTDPO_BACKEND``."""
    requested = os.environ.get("FASTDPO_BACKEND", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"FASTDPO_BACKEND must be one of {BACKENDS}, got {requested!r}")
    triton_ok = (
        triton_logps is not None
        and logits.dtype in triton_logps.SUPPORTED_DTYPES
        and (logits.is_cuda or (logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"))
    )
    if requested == "triton" and not triton_ok:
        raise ValueError(
            f"FASTDPO_BACKEND=triton cannot run {logits.dtype} logits on {logits.device} "
            "(needs Triton, a CUDA device or TRITON_INTERPRET=1, and float16/bfloat16/float32)"
        )
    if requested == "torch" or not triton_ok:
        return "torch"
    return "triton"


def impl_for(logits: torch.Tensor):
    """The module (Triton launchers or ``fastdpo.chunked``) that runs these logits."""
    return triton_logps if select_backend(logits) == "triton" else chunked


def _forward(logits, labels, ref_logits, o: LogpsOptions) -> LogpsForward:
    kw = dict(shift=o.shift, ignore_index=o.ignore_index, temperature=o.temperature, logit_scale=o.logit_scale,
              softcap=o.softcap, stats=o.stats)
    impl = impl_for(logits)
    if ref_logits is None or (impl is triton_logps and ref_logits.dtype == logits.dtype):
        return impl.logps_fwd(logits, labels, ref_logits=ref_logits, **kw)
    # Reference logits of another dtype cannot share the launch: a second one, forward only.
    ref = impl_for(ref_logits).logps_fwd(ref_logits, labels, **kw)
    return impl.logps_fwd(logits, labels, **kw)._replace(ref_logp=ref.logp, ref_stats=ref.stats)


class TokenLogpsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ref_logits, options: LogpsOptions):
        out = _forward(logits, labels, ref_logits, options)
        # The entropy carries a gradient: its own allocation, not a view of the statistics buffer.
        entropy = out.stats[STATS.index("entropy")].clone() if "entropy" in options.stats else None
        ctx.save_for_backward(logits, labels, out.lse, entropy)
        ctx.options = options
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(x for x in out[2:] if x is not None))
        return out.logp, entropy, out.stats, out.ref_logp, out.ref_stats

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        if (grad_logp is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
            return None, None, None, None
        logits, labels, lse, entropy = ctx.saved_tensors
        o = ctx.options
        grad = impl_for(logits).logps_bwd(
            logits,
            labels,
            lse,
            grad_logp,
            shift=o.shift,
            ignore_index=o.ignore_index,
            temperature=o.temperature,
            logit_scale=o.logit_scale,
            softcap=o.softcap,
            entropy=entropy,
            grad_entropy=grad_entropy,
            inplace=o.inplace_backward,
        )
        return grad, None, None, None


class TokenOutputs(NamedTuple):
    """``token_logps``'s result: ``logp`` and ``entropy`` (if requested) carry gradients, the rest does not."""

    logp: torch.Tensor  # [N, T - shift]
    entropy: torch.Tensor | None  # [N, T - shift]
    stats: torch.Tensor | None  # [len(STATS), N, T - shift] (its entropy channel is detached)
    ref_logp: torch.Tensor | None  # [N, T - shift]
    ref_stats: torch.Tensor | None  # [len(STATS), N, T - shift]


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, options: LogpsOptions, ref_logits: torch.Tensor | None = None
) -> TokenOutputs:
    """Per-token outputs of the fused sweep; arguments are assumed validated."""
    return TokenOutputs(*TokenLogpsFunction.apply(logits, labels, ref_logits, options))
