"""Autograd op: per-token label log-probs from logits, with a backward that never builds a softmax tensor.

``TokenLogpsFunction.apply(logits [N, T, V], labels [N, T], options) -> logp [N, T - shift]`` (float32,
float64 for float64 logits; 0 on unscored tokens). Saved for backward: the logits (a reference, no copy), the
labels and the per-token log-sum-exp ``[N, T - shift]``. The backward recomputes each softmax row from the
logits and writes ``dlogits = g / temperature * (onehot(label) - softmax(z))`` in the logits' dtype.

Backend choice, per call: Triton kernels for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
(tests); the chunked PyTorch path otherwise, for float64, or when Triton is missing. The environment
variable ``FASTDPO_BACKEND`` (``auto`` | ``triton`` | ``torch``) overrides the choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastdpo import chunked

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
    inplace_backward: bool = False


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


def _impl(logits: torch.Tensor):
    return triton_logps if select_backend(logits) == "triton" else chunked


class TokenLogpsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, options: LogpsOptions) -> torch.Tensor:
        logp, lse = _impl(logits).logps_fwd(
            logits, labels, shift=options.shift, ignore_index=options.ignore_index, temperature=options.temperature
        )
        ctx.save_for_backward(logits, labels, lse)
        ctx.options = options
        ctx.set_materialize_grads(False)
        return logp

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None):
        if grad_logp is None or not ctx.needs_input_grad[0]:
            return None, None, None
        logits, labels, lse = ctx.saved_tensors
        o = ctx.options
        grad = _impl(logits).logps_bwd(
            logits,
            labels,
            lse,
            grad_logp,
            shift=o.shift,
            ignore_index=o.ignore_index,
            temperature=o.temperature,
            inplace=o.inplace_backward,
        )
        return grad, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, options: LogpsOptions) -> torch.Tensor:
    """Differentiable per-token log-probs ``[N, T - shift]``; arguments are assumed validated."""
    return TokenLogpsFunction.apply(logits, labels, options)
