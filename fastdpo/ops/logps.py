"""Autograd op: per-token label log-probs from logits, with a backward that never builds a softmax tensor.

``token_logps(logits [N, T, V], labels [N, T], options, ref_logits=None)`` returns ``TokenOutputs(logp,
entropy, stats, ref_logp, ref_stats)``: ``logp [N, T - shift]`` (float32, float64 for float64 logits; 0 on
unscored tokens) and ``entropy`` (when requested) carry gradients; ``stats [len(STATS), N, T - shift]`` and the
reference's outputs (or None) do not. Saved for backward: the logits (a reference, no copy), the labels and the
per-token log-sum-exp pair ``[2, N, T - shift]``. The backward recomputes each softmax row from the logits and
writes ``dlogits = g / temperature * (onehot(label) - softmax(z))`` in the logits' dtype.

The forward and the backward are ``torch.library`` custom ops (``fastdpo::token_logps`` and
``fastdpo::token_logps_backward``) with fake implementations and a registered autograd formula, so the op is
one opaque node under ``torch.compile(fullgraph=True)``: nothing inside it is traced, and its shapes are known
without running it. Under compile, ``inplace_backward`` is ignored (the backward graph is functional: the
gradient gets its own buffer); in eager mode it overwrites the logits as documented.

Backend choice, per call: Triton kernels for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
(tests); the chunked PyTorch path otherwise, for float64, or when Triton is missing. The environment
variable ``FASTDPO_BACKEND`` (``auto`` | ``triton`` | ``torch``) overrides the choice.
"""

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from fastdpo import chunked
from fastdpo._logps_outputs import STATS, LogpsForward

try:
    from fastdpo.kernels import logps as triton_logps
    from fastdpo.kernels import sums as triton_sums
except ImportError:  # Triton is optional on CPU-only installs
    triton_logps = triton_sums = None

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LogpsOptions:
    """Everything about a call that is not a tensor."""

    shift: bool = True
    ignore_index: int = -100
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    inplace_backward: bool = False
    stats: tuple = ()  # names from fastdpo._logps_outputs.STATS


def stats_mask(stats) -> int:
    """Statistics names -> a bit mask (custom-op arguments are ints, not string lists)."""
    return sum(1 << i for i, name in enumerate(STATS) if name in stats)


def stats_of(mask: int) -> tuple:
    return tuple(name for i, name in enumerate(STATS) if mask >> i & 1)


def select_backend(logits: torch.Tensor, dtypes: tuple | None = None) -> str:
    """``"triton"`` or ``"torch"`` for these logits (or, with ``dtypes``, another tensor a kernel takes in those
    dtypes), honouring ``FASTDPO_BACKEND``."""
    requested = os.environ.get("FASTDPO_BACKEND", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"FASTDPO_BACKEND must be one of {BACKENDS}, got {requested!r}")
    triton_ok = (
        triton_logps is not None
        and logits.dtype in (dtypes or triton_logps.SUPPORTED_DTYPES)
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


def kernel_kw(shift, ignore_index, temperature, logit_scale, softcap) -> dict:
    """The keywords every launcher (Triton or chunked) takes besides tensors, stats and buffers."""
    return dict(shift=shift, ignore_index=ignore_index, temperature=temperature, logit_scale=logit_scale,
                softcap=softcap)  # fmt: skip


def _forward(logits, labels, ref_logits, kw: dict, stats: tuple) -> LogpsForward:
    impl = impl_for(logits)
    if ref_logits is None or (impl is triton_logps and ref_logits.dtype == logits.dtype):
        return impl.logps_fwd(logits, labels, ref_logits=ref_logits, stats=stats, **kw)
    # Reference logits of another dtype cannot share the launch: a second one, forward only.
    ref = impl_for(ref_logits).logps_fwd(ref_logits, labels, stats=stats, **kw)
    return impl.logps_fwd(logits, labels, stats=stats, **kw)._replace(ref_logp=ref.logp, ref_stats=ref.stats)


def _empty(like: Tensor, dtype) -> Tensor:
    return like.new_empty(0, dtype=dtype)


def _token_logps_impl(
    logits: Tensor,
    labels: Tensor,
    ref_logits: Optional[Tensor],
    shift: bool,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    stats: int,
    inplace_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logp, lse, entropy, stats, ref_logp, ref_stats); what was not requested is an empty tensor.
    ``stats``: ``stats_mask`` of the statistics; ``inplace_backward`` is read by the backward only."""
    names = stats_of(stats)
    out = _forward(logits, labels, ref_logits, kernel_kw(shift, ignore_index, temperature, logit_scale, softcap),
                   names)  # fmt: skip
    dtype = out.logp.dtype
    # The entropy carries a gradient: its own allocation, not a view of the statistics buffer.
    entropy = out.stats[STATS.index("entropy")].clone() if "entropy" in names else _empty(logits, dtype)

    def given(x):  # outputs may not alias each other: a fresh empty tensor for each one missing
        return _empty(logits, dtype) if x is None else x

    return out.logp, out.lse, entropy, given(out.stats), given(out.ref_logp), given(out.ref_stats)


_token_logps_op = torch.library.custom_op("fastdpo::token_logps", _token_logps_impl, mutates_args=())


@_token_logps_op.register_fake
def _(logits, labels, ref_logits, shift, ignore_index, temperature, logit_scale, softcap, stats, inplace_backward):
    N, T, _ = logits.shape
    rows = (N, T - int(shift))
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_stats = len(STATS) if stats else 0
    has_ref = ref_logits is not None
    return (logits.new_empty(rows, dtype=dtype), logits.new_empty((2, *rows), dtype=dtype),
            logits.new_empty(rows if stats & 1 else (0,), dtype=dtype),
            logits.new_empty((n_stats, *rows) if n_stats else (0,), dtype=dtype),
            logits.new_empty(rows if has_ref else (0,), dtype=dtype),
            logits.new_empty((n_stats, *rows) if n_stats and has_ref else (0,), dtype=dtype))  # fmt: skip


def _token_logps_backward_impl(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_logp: Optional[Tensor],
    entropy: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    shift: bool,
    ignore_index: int,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
) -> Tensor:
    """dlogits ``[N, T, V]`` in the logits' dtype, a new buffer."""
    return impl_for(logits).logps_bwd(
        logits, labels, lse, grad_logp, entropy=entropy, grad_entropy=grad_entropy,
        **kernel_kw(shift, ignore_index, temperature, logit_scale, softcap),
    )  # fmt: skip


_token_logps_backward_op = torch.library.custom_op(
    "fastdpo::token_logps_backward", _token_logps_backward_impl, mutates_args=()
)


@_token_logps_backward_op.register_fake
def _(logits, labels, lse, grad_logp, entropy, grad_entropy, shift, ignore_index, temperature, logit_scale, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """Whether fastdpo's ops may run as plain Python, skipping torch's dispatcher: real tensors, and nothing tracing
    or transforming them (torch.compile, export, make_fx, fake or functional tensors, torch.func's vmap and grad,
    torch.jit.trace), which must see the op itself."""
    return (not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode() and not torch.jit.is_tracing()
            and torch._C._functorch.peek_interpreter_stack() is None
            and all(type(t) is Tensor for t in tensors if t is not None))  # fmt: skip


def _setup_context(ctx, inputs, output):
    logits, labels, _ref, shift, ignore_index, temperature, logit_scale, softcap, stats, inplace = inputs
    logp, lse, entropy, stats_out, ref_logp, ref_stats = output
    ctx.save_for_backward(logits, labels, lse, entropy if stats & 1 else None)
    ctx.kw = kernel_kw(shift, ignore_index, temperature, logit_scale, softcap)
    ctx.inplace = inplace
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, stats_out, ref_logp, ref_stats)


def _backward(ctx, grad_logp, _grad_lse, grad_entropy, *_):
    return (logits_gradient(ctx, grad_logp, grad_entropy),) + (None,) * 9


def logits_gradient(ctx, grad_logp, grad_entropy) -> Optional[Tensor]:
    """dlogits of a log-prob op or Function whose ``ctx`` saved ``(logits, labels, lse, entropy or None)`` (logits its
    first input) with ``ctx.kw`` (``kernel_kw``) and ``ctx.inplace``; None where no gradient is needed. Shared by
    ``fastdpo::token_logps`` and the vocab-parallel Function, whose labels are the shard's local ones."""
    logits, labels, lse, entropy = ctx.saved_tensors
    if entropy is None:  # the entropy output is an empty placeholder: any gradient for it is meaningless
        grad_entropy = None
    if (grad_logp is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
        return None
    # in place only where the gradient is a plain value: on real tensors outside any tracing (torch.compile; torch
    # 2.11's AOTAutograd traces this formula with fake tensors while is_compiling() is False) or dispatch mode (e.g.
    # FlopCounterMode: out of place there, one more [N, T, V] buffer), and not in a backward that builds a graph
    # (create_graph=True: the overwritten logits would carry the forward's graph into the double backward)
    if ctx.inplace and not torch.is_grad_enabled() and plain_eager(logits, lse, grad_logp, grad_entropy):
        grad = impl_for(logits).logps_bwd(logits, labels, lse, grad_logp, entropy=entropy, grad_entropy=grad_entropy,
                                          inplace=True, **ctx.kw)  # fmt: skip
    else:
        # a backward that builds a graph (create_graph=True) uses the op: its formula refuses a double backward
        direct = plain_eager(logits, lse, grad_logp, grad_entropy) and not torch.is_grad_enabled()
        backward = _token_logps_backward_impl if direct else _token_logps_backward_op
        grad = backward(logits, labels, lse, grad_logp, entropy, grad_entropy, **ctx.kw)
    return grad


def no_double_backward(ctx, *grads):
    """Autograd formula of the backward ops: they have none, so differentiating a gradient (``create_graph=True``
    then a second backward, e.g. a gradient penalty) stops with this message instead of PyTorch's about a missing
    formula. The gradient itself is exact; only its own derivative is not provided."""
    raise RuntimeError("fastdpo does not support double backward: the gradient of its log-prob ops is computed by a "
                       "kernel with no derivative of its own (create_graph=True, then backward through the gradient)")


_token_logps_op.register_autograd(_backward, setup_context=_setup_context)
_token_logps_backward_op.register_autograd(no_double_backward)


class _EagerTokenLogps(torch.autograd.Function):
    """``fastdpo::token_logps`` without torch's dispatcher, for eager calls: the same implementation and the same
    autograd formula (``_setup_context``, ``_backward``). The custom op's dispatch (its autograd wrapper, a
    redispatch, a dynamo guard) costs about 15 µs of host time per call, forward and backward each, which at small
    sizes is longer than the kernel; wherever tensors are traced (``plain_eager``) the op itself is used."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _token_logps_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


class TokenOutputs(NamedTuple):
    """``token_logps``'s result: ``logp`` and ``entropy`` (if requested) carry gradients, the rest does not."""

    logp: torch.Tensor  # [N, T - shift]
    entropy: torch.Tensor | None  # [N, T - shift]
    stats: torch.Tensor | None  # [len(STATS), N, T - shift] (its entropy channel is detached)
    ref_logp: torch.Tensor | None  # [N, T - shift]
    ref_stats: torch.Tensor | None  # [len(STATS), N, T - shift]


def token_logps(
    logits: Tensor, labels: Tensor, options: LogpsOptions, ref_logits: Optional[Tensor] = None
) -> TokenOutputs:
    """Per-token outputs of the fused sweep; arguments are assumed validated."""
    o = options
    mask = stats_mask(o.stats)
    op = _EagerTokenLogps.apply if plain_eager(logits, labels, ref_logits) else _token_logps_op
    logp, _lse, entropy, stats, ref_logp, ref_stats = op(
        logits, labels, ref_logits, o.shift, o.ignore_index, o.temperature, o.logit_scale, o.softcap, mask,
        o.inplace_backward,
    )  # fmt: skip
    return TokenOutputs(logp, entropy if mask & 1 else None, stats if mask else None,
                        ref_logp if ref_logits is not None else None,
                        ref_stats if mask and ref_logits is not None else None)  # fmt: skip
