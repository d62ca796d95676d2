"""The implementations under test, behind one interface: ``fn(logits [S, T, V], labels [S, T]) -> [S]``.

Each returns the summed label log-probs of each sequence (every token scored, no shift), in float32. ``run``
drives a provider in one of two modes, on identical inputs:

- ``fwd``: the call under ``torch.no_grad()`` on logits that do not require grad (a reference-model pass);
- ``fwd_bwd``: the call on logits that require grad, then ``torch.autograd.grad`` of ``(out * g).sum()`` for a
  random upstream ``g [S]``. The gradient is returned, not accumulated into ``.grad``, as when an ``lm_head``'s
  backward consumes it (accumulation would copy an in-place gradient).

Third-party implementations are imported, never copied; one that is not installed, or cannot run on this
device, carries the reason in ``Provider.unavailable``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastdpo
from benchmarks.shapes import CHECK_TOKENS
from fastdpo._testing import assert_close_to_reference, downcast_slack
from fastdpo.ops.logps import select_backend

# Every implementation, in the order tables and plots list them.
NAMES = (
    "eager", "trl-selective", "compile", "compile-max-autotune", "trl-triton", "liger", "quack", "quack-inplace",
    "fastdpo", "fastdpo-inplace", "fastdpo-tp1",
)  # fmt: skip
# The order a size's cases are measured in: fastdpo and the fastest peers first, torch.compile last (its compile
# time at a large size can run into a time-limited run's margin, and must not cost the others their rows).
RUN_ORDER = (
    "fastdpo", "fastdpo-inplace", "quack", "quack-inplace", "trl-triton", "liger", "eager", "trl-selective",
    "fastdpo-tp1", "compile", "compile-max-autotune",
)  # fmt: skip
# torch.compile: one graph per (shape, dtype, grad mode) and mode, specialised (dynamic=False) as a training step at
# a fixed shape would be; a sweep compiles ~100 of them, far above dynamo's default limit of 8, past which it would
# silently fall back to eager.
COMPILE_RECOMPILE_LIMIT = 256


class AccuracyError(Exception):
    """An implementation's output is off the float64 reference (``check_accuracy``); distinct from its own input
    assertions, which are errors of the case, not accuracy failures."""


@dataclass(frozen=True)
class Provider:
    """One implementation: its function, why it cannot run here (None when it can) and a note for the rows.

    ``clobbers_logits``: its fwd_bwd overwrites the logits (in-place backward, or a gradient written during the
    forward), so the runner refills them before the next provider.
    ``rounds_to_dtype``: it rounds each per-token log-prob to the logits' dtype by design (TRL's bf16 path
    computes log_softmax in bf16; Liger returns the loss in the input dtype); the accuracy check allows for that.
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    unavailable: str | None = None
    note: str = ""
    clobbers_logits: bool = False
    rounds_to_dtype: bool = False


def run(provider: Provider, mode: str, logits: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor):
    """One call in ``mode``: returns (sequence log-probs [S], gradient [S, T, V] or None)."""
    if mode == "fwd":
        with torch.no_grad():
            return provider.fn(logits.detach(), labels), None
    x = logits.detach().requires_grad_()
    out = provider.fn(x, labels)
    (dx,) = torch.autograd.grad(out, x, grad)
    return out, dx


def eager(logits, labels):
    """What most training loops write: a float32 log_softmax over the whole tensor, then a gather."""
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1)


def _fastdpo(inplace: bool):
    def fn(logits, labels):
        return fastdpo.sequence_logps(logits, labels, shift=False, inplace_backward=inplace)

    return fn


_OWN_PROCESS_GROUP = []  # the default group fastdpo-tp1 created, for shutdown()


def _fastdpo_tp1(device: torch.device):
    """fastdpo's vocab-parallel path over a process group of one rank (NCCL on CUDA, gloo on the CPU): the same
    kernels plus the shard merge's O(N) all-reduces, whose cost against ``fastdpo`` this row measures."""

    def make():
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = device.type == "cuda"  # NCCL wants a device with an index
            device_id = torch.device("cuda", torch.cuda.current_device()) if cuda else None
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device_id)  # fmt: skip
            _OWN_PROCESS_GROUP.append(True)
        group = dist.new_group([0])

        def fn(logits, labels):
            return fastdpo.sequence_logps(logits, labels, shift=False, vocab_parallel_group=group)

        return fn

    return make


def _trl_selective():
    """TRL's ``selective_log_softmax`` on its PyTorch path: a loop over sequences (log_softmax + gather in the
    logits' dtype for bf16/fp16, gather - logsumexp for fp32). Recent TRL sends CUDA calls to its Triton
    kernel instead; that kernel is measured as ``trl-triton``, so the dispatch is switched off here."""
    from unittest import mock

    import trl.trainer.utils as trl_utils

    def fn(logits, labels):
        with mock.patch.object(trl_utils, "is_triton_available", lambda: False, create=True):
            return trl_utils.selective_log_softmax(logits, labels).float().sum(-1)

    return fn


def _trl_triton():
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    def fn(logits, labels):
        logp, _entropy = selective_log_softmax_and_entropy(logits, labels)
        return logp.sum(-1)

    return fn


def _liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fn(logits, labels):
        S, T, V = logits.shape
        loss = liger_cross_entropy(logits.view(S * T, V), labels.view(S * T), reduction="none")
        return -loss.float().view(S, T).sum(-1)

    return fn


def _quack(inplace: bool):
    def make():
        from quack.cross_entropy import cross_entropy

        def fn(logits, labels):
            S, T, V = logits.shape
            loss = cross_entropy(logits.view(S * T, V), labels.view(S * T), reduction="none", inplace_backward=inplace)
            return -loss.float().view(S, T).sum(-1)

        return fn

    return make


def raise_recompile_limits() -> None:
    config = torch._dynamo.config
    config.recompile_limit = COMPILE_RECOMPILE_LIMIT
    if hasattr(config, "accumulated_recompile_limit"):  # torch >= 2.5
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, COMPILE_RECOMPILE_LIMIT)


def _compile(mode: str | None):
    def make():
        raise_recompile_limits()
        return torch.compile(eager, mode=mode, dynamic=False)

    return make


def _needs(module: str, device: torch.device, cuda: bool, make: Callable[[], Callable]):
    """(fn, reason): the reason names the missing package or device; the error when its setup breaks."""
    if importlib.util.find_spec(module) is None:
        return None, f"`{module}` is not installed"
    if cuda and device.type != "cuda":
        return None, "needs a CUDA device"
    try:
        return make(), None
    except Exception as exc:  # a broken third-party install is reported, not fatal to the sweep
        return None, f"setup failed: {type(exc).__name__}: {exc}"


def shutdown() -> None:
    """Destroy the process group ``fastdpo-tp1`` created, if any (a live NCCL group can hang the interpreter's
    exit)."""
    if _OWN_PROCESS_GROUP:
        import torch.distributed as dist

        dist.destroy_process_group()
        _OWN_PROCESS_GROUP.clear()


def get_providers(device: torch.device, names=None) -> dict[str, Provider]:
    """The implementations ``names`` (default: all), in the order the tables list them, with their availability on
    ``device``. Only these are set up (no process group unless ``fastdpo-tp1`` is among them)."""
    names = NAMES if names is None else names
    backend = select_backend(torch.empty(0, device=device))
    fastdpo_note = "Triton kernels" if backend == "triton" else "chunked PyTorch path (no Triton on this device)"
    # name: (module it needs, needs CUDA, factory, note, clobbers_logits, rounds_to_dtype)
    optional = {
        "trl-selective": ("trl", False, _trl_selective, "TRL's PyTorch path (Triton dispatch off)", False, True),
        "compile": ("torch", True, _compile(None), "torch.compile(eager)", False, False),
        "compile-max-autotune": (
            "torch", True, _compile("max-autotune-no-cudagraphs"), "torch.compile(eager, max-autotune-no-cudagraphs)",
            False, False,
        ),
        "trl-triton": ("trl", True, _trl_triton, "trl.kernels.logprob_entropy (also computes entropy)", False, False),
        "liger": ("liger_kernel", True, _liger, "Liger cross entropy, reduction='none'", True, True),
        "quack": ("quack", True, _quack(False), "QuACK cross entropy, reduction='none'", False, False),
        "quack-inplace": ("quack", True, _quack(True), "QuACK cross entropy, inplace_backward=True", True, False),
    }  # fmt: skip
    providers = {"eager": Provider("eager", eager, note="logits.float().log_softmax(-1).gather(...)")}
    for name, (module, cuda, make, note, clobbers, rounds) in optional.items():
        if name in names:
            fn, reason = _needs(module, device, cuda, make)
            providers[name] = Provider(name, fn, reason, note, clobbers, rounds)
    providers["fastdpo"] = Provider("fastdpo", _fastdpo(False), note=fastdpo_note)
    providers["fastdpo-inplace"] = Provider(
        "fastdpo-inplace", _fastdpo(True), note=f"{fastdpo_note}, inplace_backward=True", clobbers_logits=True
    )
    if "fastdpo-tp1" in names:
        fn, reason = _needs("torch.distributed", device, False, _fastdpo_tp1(device))
        providers["fastdpo-tp1"] = Provider("fastdpo-tp1", fn, reason,
                                            note=f"{fastdpo_note}, vocab_parallel_group of one rank")  # fmt: skip
    return {name: providers[name] for name in NAMES if name in names}


def _reference(logits, labels):
    return fastdpo.reference.sequence_logps(logits, labels, shift=False)


REFERENCE = Provider("reference", _reference, note="fastdpo.reference, math in the logits' dtype")


def check_accuracy(provider: Provider, mode: str, logits, labels, grad) -> tuple[float, float | None]:
    """Check ``provider`` on the first ``CHECK_TOKENS`` tokens of the first sequence; returns the relative
    errors (log-probs, gradient or None) or raises ``AccuracyError`` naming the worst element (an exception the
    provider itself raises, its own input assertions included, propagates as it is).

    Truth is the float64 reference; the baseline is the same computation in float32 (gradient rounded to the
    logits' dtype), and ``fastdpo._testing``'s three-way criterion applies. A provider that ``rounds_to_dtype``
    gets an extra eps/2 of the logits' dtype: rounding each per-token log-prob moves a sum of same-signed terms
    by at most eps/2 of its magnitude (and the gradient, computed from rounded values, by about as much).
    """
    x = logits[:1, :CHECK_TOKENS].clone()  # a copy: a clobbering provider must not touch the timed logits
    y, g = labels[:1, :CHECK_TOKENS].clone(), grad[:1]
    truth, truth_grad = run(REFERENCE, mode, x.double(), y, g.double())
    base, base_grad = run(REFERENCE, mode, x.float(), y, g)
    out, dx = run(provider, mode, x.clone(), y, g)
    slack = torch.finfo(x.dtype).eps / 2 if provider.rounds_to_dtype else 0.0
    # Under TRITON_INTERPRET=1 (a CPU test session), interpreted bf16 stores truncate instead of rounding; the
    # helper's slack is 0 everywhere else.
    slack += downcast_slack(x.dtype, triton_path=True)
    name = f"{provider.name} {mode}"
    # detach: outputs of the fwd_bwd call still require grad, and an in-place gradient is the input itself
    truth, base, out = truth.detach(), base.detach(), out.detach().float()
    try:
        err = assert_close_to_reference(out, truth, base, x.dtype, f"{name} log-probs", slack=slack)
        if dx is None:
            return err, None
        base_grad = base_grad.to(x.dtype)
        grad_err = assert_close_to_reference(dx.detach(), truth_grad, base_grad, x.dtype, f"{name} grad", slack=slack)
    except AssertionError as exc:
        raise AccuracyError(str(exc)) from exc
    return err, grad_err
