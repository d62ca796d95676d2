"""Autograd-level tests of ``sequence_logps`` on both backends: gradients, views, in-place backward,
determinism, gradcheck, saved-state safety."""

import os

import pytest
import torch

import fastdpo
from fastdpo import chunked, reference
from fastdpo._testing import assert_close_to_reference, downcast_slack, make_labels, make_logits
from fastdpo.ops.logps import LogpsOptions, select_backend, token_logps

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _grad(fn, logits, labels, upstream, **kw):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels, **kw)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequence_logps_and_grad(backend, dtype, average, device):
    N, T, V = 4, 9, 1000
    big = make_logits(N, T + 1, V, dtype, device)
    logits = big[:, :-1]  # the model_logits[:, :-1] slice: a non-contiguous view
    labels = make_labels(N, T, V, device)
    labels[2] = -100
    upstream = torch.randn(N, device=device)

    out, grad = _grad(fastdpo.sequence_logps, logits, labels, upstream, average=average)
    truth, truth_grad = _grad(reference.sequence_logps, logits.double(), labels, upstream.double(), average=average)
    base, base_grad = _grad(reference.sequence_logps, logits.float(), labels, upstream, average=average)

    assert out.shape == (N,) and out.dtype == torch.float32 and grad.dtype == dtype
    assert out[2] == 0 and torch.all(grad[2] == 0)
    assert_close_to_reference(out, truth, base, dtype, "sequence_logps")
    slack = downcast_slack(dtype, triton_path=select_backend(logits) == "triton")
    assert_close_to_reference(grad, truth_grad, base_grad.to(dtype), dtype, "grad", slack=slack)


def test_float64_logits_give_float64_logps(device):
    logits = make_logits(2, 5, 30, torch.float64, device)
    labels = make_labels(2, 5, 30, device)
    out = fastdpo.sequence_logps(logits, labels)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.sequence_logps(logits, labels), rtol=1e-12, atol=1e-12)


def test_gradcheck_pytorch_path(device):
    logits = make_logits(2, 4, 11, torch.float64, device).requires_grad_()
    labels = make_labels(2, 4, 11, device)
    labels[0, -1] = -100
    for kw in (dict(), dict(temperature=0.6, average=True), dict(shift=False)):
        assert torch.autograd.gradcheck(lambda x: fastdpo.sequence_logps(x, labels, **kw), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_matches_default(backend, dtype, device):
    logits = make_logits(4, 6, 700, dtype, device)
    labels = make_labels(4, 6, 700, device)
    upstream = torch.randn(4, device=device)
    _, expected = _grad(fastdpo.sequence_logps, logits, labels, upstream)

    leaf = logits.clone().requires_grad_()
    x = leaf * 1  # a non-leaf whose producer (mul by a constant) does not save it for backward
    (fastdpo.sequence_logps(x, labels, inplace_backward=True) * upstream).sum().backward()
    assert torch.equal(leaf.grad, expected)


def test_default_backward_leaves_logits_for_a_second_loss(backend, device):
    """The same logits feed fastdpo and another loss; the default backward must not touch them."""
    logits = make_logits(2, 5, 300, torch.float32, device).requires_grad_()
    labels = make_labels(2, 5, 300, device)
    before = logits.detach().clone()
    (fastdpo.sequence_logps(logits, labels).sum() + (logits**2).sum()).backward()
    ref = logits.detach().clone().requires_grad_()
    (reference.sequence_logps(ref, labels).sum() + (ref**2).sum()).backward()
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_bitwise_deterministic(backend, device):
    logits = make_logits(4, 7, 1000, torch.bfloat16, device)
    labels = make_labels(4, 7, 1000, device)
    upstream = torch.randn(4, device=device)
    first = _grad(fastdpo.sequence_logps, logits, labels, upstream)
    second = _grad(fastdpo.sequence_logps, logits, labels, upstream)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_mutating_the_output_leaves_saved_state_intact(backend, device):
    logits = make_logits(2, 5, 200, torch.float32, device)
    labels = make_labels(2, 5, 200, device)
    _, expected = _grad(fastdpo.sequence_logps, logits, labels, torch.ones(2, device=device))
    x = logits.clone().requires_grad_()
    per_token = token_logps(x, labels, LogpsOptions()).logp
    per_token.detach().add_(1e3)  # same storage as the op's output
    per_token.sum().backward()
    assert torch.equal(x.grad, expected)


def test_no_grad_forward_saves_nothing(backend, device):
    logits = make_logits(2, 5, 200, torch.float32, device)
    labels = make_labels(2, 5, 200, device)
    with torch.no_grad():
        out = fastdpo.sequence_logps(logits.requires_grad_(), labels)
    assert out.grad_fn is None


class _LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest new storage any aten op returns (views of an input's storage do not count);
    Triton launches allocate through torch.empty/zeros, so they are seen too."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat_inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in flat_inputs if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_reference_forward_allocates_nothing_of_size_n_by_v(backend, device, monkeypatch):
    """sequence_logps under no_grad (a reference model) allocates O(N·T), never O(N·T·V); the PyTorch path's
    working chunk is bounded by CHUNK_ELEMENTS (shrunk here so the bound is visible at test sizes)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's CPU interpreter copies kernel arguments; the kernels' own allocations are O(N·T)")
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * 1000)
    logits = make_logits(4, 16, 1000, torch.bfloat16, device)
    labels = make_labels(4, 16, 1000, device)
    with torch.no_grad(), _LargestAllocation() as mode:
        fastdpo.sequence_logps(logits, labels)
    assert mode.largest <= 4 * 1000 * 4 + 4096, mode.largest  # one fp32 chunk at most, far below 4·16·1000·2 B
