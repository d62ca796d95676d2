"""Bad input raises a clear error; numerics hold at the extremes; scale edge cases (64-bit offsets, V = 1 to
2^18, 32k-token sequences). Every numeric case runs on the Triton kernels and on the PyTorch path."""

import math
import os

import pytest
import torch

import fastdpo
from fastdpo import reference
from fastdpo._testing import assert_close_to_reference, make_labels, make_logits


def _logps_and_grad(fn, logits, labels, **kw):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels, **kw)
    out.sum().backward()
    return out.detach(), x.grad


# ---------------------------------------------------------------- bad input
def test_errors_name_the_argument(device):
    logits = make_logits(2, 4, 10, torch.float32, device)
    labels = make_labels(2, 4, 10, device)
    cases = [
        (lambda: fastdpo.sequence_logps(logits[:0], labels[:0]), ValueError, "at least one sequence"),
        (lambda: fastdpo.sequence_logps(logits[..., :0], labels), ValueError, "at least one sequence"),
        (lambda: fastdpo.sequence_logps(logits, labels.to("meta")), ValueError, "labels must be on"),
        (lambda: fastdpo.sequence_logps(logits, labels.bool()), TypeError, "int64 or int32"),
        (lambda: fastdpo.sequence_logps(logits, labels.to(torch.int8)), TypeError, "int64 or int32"),
        (lambda: fastdpo.sequence_logps(logits, labels.to(torch.int16)), TypeError, "int64 or int32"),
        (lambda: fastdpo.sequence_logps(logits, labels, ignore_index=-100.0), TypeError, "ignore_index"),
        (lambda: fastdpo.token_logps(logits, labels, outputs="entropy"), TypeError, "tuple of names"),
        (lambda: fastdpo.dpo_loss(logits, labels, beta=math.inf, reference_free=True), ValueError, "beta"),
        (lambda: fastdpo.sequence_logps(logits, labels, pairs=torch.tensor([[0, 1]], device=device)), ValueError,
         "without ld_alpha"),
        (lambda: fastdpo.dpo_loss(logits, labels, reference_free=True, pairs=torch.ones(1, 2, dtype=torch.bool,
                                                                                        device=device)),
         ValueError, "pairs must be an int64"),
        (lambda: fastdpo.sequence_logps(logits, labels, temperature=0.0), ValueError, "temperature"),
        (lambda: fastdpo.sequence_logps(logits, labels, temperature=math.inf), ValueError, "temperature"),
        (lambda: fastdpo.sequence_logps(logits, labels, temperature=math.nan), ValueError, "temperature"),
        (lambda: fastdpo.sequence_logps(logits.detach().cpu().numpy(), labels), TypeError, "tensors"),
        (lambda: fastdpo.sequence_logps(logits[:, :1], labels[:, :1]), ValueError, "T >= 2"),
        # no position is an error on one device (context parallelism alone allows a rank none)
        (lambda: fastdpo.sequence_logps(logits[:, :0], labels[:, :0], shift=False), ValueError, "T >= 1"),
        (lambda: fastdpo.dpo_loss(logits, labels, beta=-1.0, reference_free=True), ValueError, "beta"),
        (lambda: fastdpo.dpo_loss(logits, labels, beta=math.nan, reference_free=True), ValueError, "beta"),
        (lambda: fastdpo.dpo_loss(logits, labels, loss_type="robust", label_smoothing=-0.1, reference_free=True),
         ValueError, "label_smoothing"),
        (lambda: fastdpo.dpo_loss(logits, labels, torch.zeros(1, device="meta"), torch.zeros(1, device=device)),
         ValueError, "ref_chosen_logps must be on"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_inplace_backward_refuses_overlapping_views(device):
    """An expanded view would have several gradient values written to one element (silently wrong before this
    check)."""
    w = make_logits(1, 5, 10, torch.float32, device).requires_grad_()
    labels = make_labels(3, 5, 10, device)
    with pytest.raises(ValueError, match="do not share memory"):
        fastdpo.sequence_logps((w * 1.0).expand(3, 5, 10), labels, inplace_backward=True)
    with pytest.raises(ValueError, match="do not share memory"):
        fastdpo.dpo_loss((w * 1.0).expand(2, 5, 10), labels[:2], reference_free=True, inplace_backward=True)
    # overlap without a zero stride: sliding windows, sequence n + 1 is sequence n one position on
    with pytest.raises(ValueError, match="do not share memory"):
        fastdpo.sequence_logps((w * 1.0).as_strided((3, 3, 10), (10, 10, 1)), labels[:, :3], inplace_backward=True)
    # views that do not overlap stay accepted: a slice along T, a transposed batch
    base = make_logits(5, 3, 10, torch.float32, device).requires_grad_()
    for view in ((base * 1.0)[:, :2], (base * 1.0).transpose(0, 1)):
        lab = make_labels(*view.shape[:2], 10, device)
        x = view.detach().clone().requires_grad_()
        fastdpo.sequence_logps(x, lab).sum().backward()
        fastdpo.sequence_logps(view, lab, inplace_backward=True).sum().backward()
        assert torch.equal(base.grad[:, :2] if view.shape[1] == 2 else base.grad.transpose(0, 1), x.grad)
        base.grad = None


def test_double_backward_names_the_limitation(device):
    logits = make_logits(2, 5, 10, torch.float32, device).requires_grad_()
    labels = make_labels(2, 5, 10, device)
    (grad,) = torch.autograd.grad(fastdpo.dpo_loss(logits, labels, reference_free=True).loss, logits,
                                  create_graph=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="fastdpo does not support double backward"):
        grad.square().sum().backward()


def test_double_backward_refused_with_inplace_backward(backend, device):
    """With create_graph=True the gradient is not written over the logits (which would carry the forward's graph
    into a silently wrong second derivative): the double backward raises as without inplace_backward."""
    x = make_logits(2, 5, 10, torch.float32, device).requires_grad_()
    labels = make_labels(2, 5, 10, device)
    logp = fastdpo.token_logps(x * 1.0, labels, inplace_backward=True).log_probs
    (grad,) = torch.autograd.grad(logp.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fastdpo does not support double backward"):
        grad.square().sum().backward()


def test_vmap_over_token_logps(backend, device):
    """torch.func.vmap sees the op (its batching fallback), not the eager fast path: equal to a loop."""
    x = torch.randn(3, 2, 5, 17, device=device)  # 3 vmapped calls on [2, 5, 17] logits
    labels = make_labels(2, 5, 17, device)
    mapped = torch.vmap(lambda z: fastdpo.token_logps(z, labels).log_probs)(x)
    looped = torch.stack([fastdpo.token_logps(z, labels).log_probs for z in x])
    torch.testing.assert_close(mapped, looped)


def test_reference_token_logps_without_log_probs():
    logits = make_logits(2, 5, 10, torch.float64, "cpu")
    labels = make_labels(2, 5, 10, "cpu")
    out = reference.token_logps(logits, labels, outputs=("entropy",))
    expected = fastdpo.token_logps(logits, labels, outputs=("entropy",)).entropy
    assert out.log_probs is None
    torch.testing.assert_close(out.entropy, expected, rtol=1e-12, atol=1e-12)


def test_out_of_range_label_raises_on_cpu_and_names_position():
    logits = make_logits(2, 5, 10, torch.float32, "cpu")
    labels = make_labels(2, 5, 10, "cpu", prompt_frac=0)
    labels[1, 3] = 10
    with pytest.raises(ValueError, match=r"got 10 at labels\[1, 3\]"):
        fastdpo.sequence_logps(logits, labels)
    labels[1, 3] = -7
    with pytest.raises(ValueError, match=r"got -7 at labels\[1, 3\]"):
        fastdpo.dpo_loss(logits, labels, reference_free=True)
    labels[1, 3] = 0
    labels[0, 0] = 12345  # never scored with shift=True: accepted
    assert torch.isfinite(fastdpo.sequence_logps(logits, labels)).all()


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    "dtype,offset,scale",
    [(torch.float32, 1e4, 3.0), (torch.float32, -1e4, 3.0), (torch.bfloat16, 3e38, 1e37),
     (torch.float16, 6e4, 1e3), (torch.float32, 0.0, 300.0)],
    ids=["fp32+1e4", "fp32-1e4", "bf16-near-max", "fp16-near-max", "fp32-spread-300"],
)
def test_large_magnitudes(backend, dtype, offset, scale, device):
    logits = (torch.randn(2, 6, 500, device=device) * scale + offset).clamp(
        torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
    labels = make_labels(2, 6, 500, device)
    out, grad = _logps_and_grad(fastdpo.sequence_logps, logits, labels)
    truth, truth_grad = _logps_and_grad(reference.sequence_logps, logits.double(), labels)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    # One float32 rounding of the inputs' spread is all the error allowed (no cancellation at |z| ~ offset).
    assert_close_to_reference(out, truth, truth.float(), torch.float32, "logps", scale=1.0)
    assert_close_to_reference(grad, truth_grad, truth_grad.to(dtype), dtype, "grad", slack=2**-7)


def test_label_far_below_the_max_keeps_precision(backend, device):
    logits = make_logits(1, 3, 300, torch.float32, device)
    labels = torch.tensor([[-100, 5, 6]], device=device)
    logits[0, 0, 5] = -1e4  # log-prob ~ -1e4 - lse
    logits[0, 1, 6] = 1e4 - 0.5  # label 0.5 below a huge max: log-prob ~ -0.97
    logits[0, 1, 7] = 1e4
    out = token = fastdpo.sequence_logps(logits, labels)
    per_token = reference.token_logps(logits.double(), labels).log_probs
    assert abs(token.item() - per_token.sum().item()) <= 1e-6 * abs(per_token.sum().item())
    assert per_token[0, 1].item() == pytest.approx(-math.log1p(math.exp(0.5)), rel=1e-12)
    assert out.dtype == torch.float32


def test_inf_and_nan_policy(backend, device):
    """-inf entries are a masked vocabulary; a -inf label logit gives -inf; +inf or NaN in a row gives NaN."""
    V = 300
    logits = make_logits(5, 2, V, torch.float32, device)
    labels = torch.tensor([[0, 3], [0, 3], [0, 3], [0, 3], [0, 3]], device=device)
    logits[0, 0, 100:] = -math.inf  # masked vocabulary: finite result
    logits[1, 0, 3] = -math.inf  # the label's own logit is -inf
    logits[2, 0, 50] = math.inf
    logits[3, 0, 50] = math.nan
    logits[4, 0] = -math.inf  # nothing finite in the row
    out, grad = _logps_and_grad(fastdpo.sequence_logps, logits, labels)
    truth = reference.sequence_logps(logits[:1].double(), labels[:1])
    torch.testing.assert_close(out[:1].double(), truth, rtol=1e-6, atol=1e-6)
    assert torch.all(grad[0, 0, 100:] == 0) and torch.isfinite(grad[0]).all()
    assert out[1] == -math.inf and torch.isfinite(grad[1]).all()
    assert torch.isnan(out[2:]).all()


def test_32k_token_sequence_sum_matches_float64(backend, device):
    """The per-sequence sum is the same torch reduction on both backends; the interpreter would spend ~50 s
    on 32k programs, so on CPU the Triton case runs 4k tokens."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    T, V = (4096 if interpreted else 32768), 16
    logits = make_logits(1, T, V, torch.float32, device)
    labels = make_labels(1, T, V, device, prompt_frac=0)
    out = fastdpo.sequence_logps(logits, labels)
    truth = reference.sequence_logps(logits.double(), labels)
    assert_close_to_reference(out, truth, reference.sequence_logps(logits, labels), torch.float32, "sum")


# ---------------------------------------------------------------- scale edge cases
def test_offsets_past_2_31_elements(backend, device):
    """Rows 2^30 elements apart in a 4 GiB storage (lazily allocated on the CPU: only the touched pages become real):
    a 32-bit offset (row 2 starts past element 2^31) would read the wrong memory."""
    V, stride = 1000, (1 << 30) + 16
    storage = torch.empty(2 * stride + 2 * V, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((3, 2, V), (stride, V, 1))
    logits.copy_(torch.randn(3, 2, V))
    labels = torch.randint(0, V, (3, 2), device=device)
    out, grad = _logps_and_grad(fastdpo.sequence_logps, logits, labels, shift=False)
    truth, truth_grad = _logps_and_grad(reference.sequence_logps, logits.double(), labels, shift=False)
    torch.testing.assert_close(out.double(), truth, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), truth_grad, rtol=2**-7, atol=1e-6)
    with torch.no_grad():  # in-place backward writes through the same 64-bit offsets
        x = logits.detach().requires_grad_()
    (fastdpo.sequence_logps(x, labels, shift=False, inplace_backward=True).sum()).backward()
    torch.testing.assert_close(x.grad.double(), truth_grad, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("V", [1, 2, 1 << 18])
def test_vocab_sizes(backend, V, device):
    N, T = (2, 3) if V > 1000 else (4, 5)
    logits = make_logits(N, T, V, torch.float32, device)
    labels = make_labels(N, T, V, device)
    out, grad = _logps_and_grad(fastdpo.sequence_logps, logits, labels)
    truth, truth_grad = _logps_and_grad(reference.sequence_logps, logits.double(), labels)
    assert_close_to_reference(out, truth, truth.float(), torch.float32, "logps", scale=1.0)
    assert_close_to_reference(grad, truth_grad, truth_grad.float(), torch.float32, "grad")
    if V == 1:
        assert torch.all(out == 0) and torch.all(grad == 0)
