"""The whole TRL loss family, its options, metrics, packed batches and reference logits: the fused path
(``fastdpo.dpo_loss``: kernels + ``fastdpo.losses``) against ``fastdpo.reference.dpo_loss`` (an independent
float64 transcription of TRL's ``DPOTrainer._compute_loss``), on both backends."""

import pytest
import torch

import fastdpo
from fastdpo import reference
from fastdpo._testing import (
    assert_close_to_reference,
    downcast_slack,
    make_labels,
    make_logits,
    propagated_slack,
)
from fastdpo.ops.logps import select_backend

SETTINGS = [
    dict(loss_type=t, **({"label_smoothing": 0.1} if t in ("exo_pair", "robust", "aot", "simpo") else {}))
    for t in fastdpo.LOSS_TYPES
] + [
    dict(loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.3, 0.01]),
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="ipo", f_divergence_type="js_divergence"),
    dict(loss_type="robust", label_smoothing=0.2, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sigmoid", ld_alpha=0.4),
    dict(loss_type="apo_zero", ld_alpha=0.0),
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type="bco_pair", use_weighting=True, ld_alpha=0.7),
    dict(loss_type="discopop", discopop_tau=0.5, beta=0.5),
    dict(loss_type="simpo", simpo_gamma=1.0, beta=2.0),
]


def _batch(B, T, V, dtype, device):
    logits = make_logits(2 * B, T, V, dtype, device)
    labels = make_labels(2 * B, T, V, device, prompt_frac=0.6)
    return logits, labels, torch.randn(B, device=device) * 3 - 20, torch.randn(B, device=device) * 3 - 20


def _run(api, logits, labels, refs, **kw):
    x = logits.detach().clone().requires_grad_()
    out = api.dpo_loss(x, labels, *refs, return_metrics=True, **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_family_matches_reference(backend, kw, dtype, device):
    logits, labels, ref_c, ref_r = _batch(3, 10, 300, dtype, device)
    out, grad = _run(fastdpo, logits, labels, (ref_c, ref_r), **kw)
    truth, truth_grad = _run(reference, logits.double(), labels, (ref_c.double(), ref_r.double()), **kw)
    base, base_grad = _run(reference, logits.float(), labels, (ref_c, ref_r), **kw)

    beta = kw.get("beta", 0.1)
    scale = beta * float(torch.cat([truth.chosen_logps, truth.rejected_logps]).detach().abs().max())
    loss_slack = propagated_slack(beta, truth.chosen_logps, truth.rejected_logps)
    for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_margin"):
        assert_close_to_reference(getattr(out, field).detach(), getattr(truth, field).detach(),
                                  getattr(base, field).detach(), dtype, field, scale=scale,
                                  slack=loss_slack if field == "loss" else 0.0)
    assert out.metrics.keys() == truth.metrics.keys()
    for name, value in out.metrics.items():
        assert_close_to_reference(value, truth.metrics[name], base.metrics[name], dtype, name, scale=max(scale, 1.0))
    slack = downcast_slack(dtype, triton_path=select_backend(logits) == "triton")
    slack += propagated_slack(beta, truth.chosen_logps, truth.rejected_logps)
    assert_close_to_reference(grad, truth_grad, base_grad.to(dtype), dtype, "grad", slack=slack)


@pytest.mark.parametrize("kw", [dict(), dict(ld_alpha=0.5, use_weighting=True, loss_type="ipo")], ids=["plain", "ld-wpo"])
def test_reference_logits_in_the_same_sweep_equal_precomputed(backend, kw, device):
    logits, labels, _, _ = _batch(2, 8, 200, torch.bfloat16, device)
    ref_logits = make_logits(4, 8, 200, torch.bfloat16, device)
    with torch.no_grad():
        fused = fastdpo.dpo_loss(logits, labels, ref_logits=ref_logits, **kw)
        truth = reference.dpo_loss(logits.double(), labels, ref_logits=ref_logits.double(), **kw)
    torch.testing.assert_close(fused.loss.double(), truth.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.chosen_rewards.double(), truth.chosen_rewards, rtol=1e-5, atol=1e-5)
    # The gradient too: the policy's backward must read the policy's log-sum-exps, not the reference's of the
    # same launch, so it equals the gradient given the same reference as precomputed sums.
    ref_c, ref_r = fastdpo.sequence_logps(ref_logits, labels, ld_alpha=kw.get("ld_alpha")).chunk(2)
    grads = []
    for refs in (dict(ref_logits=ref_logits), dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)):
        x = logits.clone().requires_grad_()
        grads.append(torch.autograd.grad(fastdpo.dpo_loss(x, labels, **refs, **kw).loss, x)[0])
    assert torch.equal(*grads)


def _pack(logits, labels, order):
    """Pack rows (cut at their last label) in ``order`` into one row; returns logits, labels, cu_seq_lens, pairs."""
    lengths = [int((labels[i] != -100).nonzero().max()) + 1 for i in range(labels.shape[0])]
    rows = [logits[i, : lengths[i]] for i in order]
    packed_labels = torch.cat([labels[i, : lengths[i]] for i in order])[None]
    cu = torch.tensor([0] + [lengths[i] for i in order], device=labels.device).cumsum(0)
    where = {row: k for k, row in enumerate(order)}
    B = labels.shape[0] // 2
    pairs = torch.tensor([[where[i], where[B + i]] for i in range(B)], device=labels.device)
    return torch.cat(rows)[None], packed_labels, cu, pairs


@pytest.mark.parametrize("kw", [dict(), dict(ld_alpha=0.3, use_weighting=True), dict(loss_type="ipo")],
                         ids=["sigmoid", "ld-wpo", "ipo"])
def test_packed_equals_padded(backend, kw, device):
    logits, labels, ref_c, ref_r = _batch(3, 9, 100, torch.float32, device)
    labels[:, -1] = torch.randint(0, 100, (6,), device=device)  # every row ends on a label: no padding to drop
    padded = fastdpo.dpo_loss(logits, labels, ref_c, ref_r, return_metrics=True, **kw)
    order = [3, 0, 4, 1, 5, 2]  # interleaved, so pairs are needed
    packed_logits, packed_labels, cu, pairs = _pack(logits, labels, order)
    positions = torch.cat([torch.arange(int(n), device=device) for n in cu.diff()])[None]
    for packing in (dict(cu_seq_lens=cu), dict(position_ids=positions)):
        packed = fastdpo.dpo_loss(packed_logits, packed_labels, ref_c, ref_r, pairs=pairs, return_metrics=True,
                                  **packing, **kw)
        torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed.chosen_logps, padded.chosen_logps, rtol=1e-5, atol=1e-5)
        for name in padded.metrics:
            torch.testing.assert_close(packed.metrics[name], padded.metrics[name], rtol=1e-5, atol=1e-5)
    seq = fastdpo.sequence_logps(packed_logits, packed_labels, cu_seq_lens=cu)
    torch.testing.assert_close(seq, fastdpo.sequence_logps(logits, labels)[order], rtol=1e-5, atol=1e-5)


def test_packed_gradient_equals_padded(backend, device):
    logits, labels, ref_c, ref_r = _batch(2, 7, 64, torch.float32, device)
    labels[:, -1] = 1
    packed_logits, packed_labels, cu, pairs = _pack(logits, labels, [0, 1, 2, 3])
    x = packed_logits.clone().requires_grad_()
    fastdpo.dpo_loss(x, packed_labels, ref_c, ref_r, cu_seq_lens=cu).loss.backward()
    y = logits.clone().requires_grad_()
    fastdpo.dpo_loss(y, labels, ref_c, ref_r).loss.backward()
    torch.testing.assert_close(x.grad[0], y.grad.reshape(-1, 64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss_type="exo_pair"), "exo_pair"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(f_divergence_type="chi2"), "f_divergence_type"),
        (dict(loss_type="aot", use_weighting=True), "use_weighting"),
        (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type=[]), "loss_type"),
        (dict(ld_alpha=1.5), "ld_alpha"),
        (dict(cu_seq_lens=torch.tensor([0, 3])), "packed batch"),
        (dict(pairs=torch.tensor([[0, 5]])), "pairs"),
        (dict(ref_logits=torch.zeros(4, 6, 7)), "ref_logits"),
    ],
)
def test_invalid_options_raise(kw, match, device):
    logits, labels, ref_c, ref_r = _batch(2, 6, 50, torch.float32, device)
    with pytest.raises(ValueError, match=match):
        fastdpo.dpo_loss(logits, labels, ref_c, ref_r, **kw)


def test_precomputed_ld_alpha_reference_sums_equal_ref_logits(backend, device):
    """TRL weights the reference log-probs with LD-DPO too: sequence_logps(..., ld_alpha) precomputes them."""
    logits, labels, _, _ = _batch(3, 9, 80, torch.float32, device)
    ref_logits = make_logits(6, 9, 80, torch.float32, device)
    with torch.no_grad():
        ref_sums = fastdpo.sequence_logps(ref_logits, labels, ld_alpha=0.3)
        truth = reference.sequence_logps(ref_logits.double(), labels, ld_alpha=0.3)
        via_logits = fastdpo.dpo_loss(logits, labels, ref_logits=ref_logits, ld_alpha=0.3)
        via_sums = fastdpo.dpo_loss(logits, labels, *ref_sums.chunk(2), ld_alpha=0.3)
    torch.testing.assert_close(ref_sums.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_sums.loss, via_logits.loss, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ref_sums, fastdpo.sequence_logps(ref_logits, labels))  # the weighting matters here


def test_ld_alpha_rejects_a_reused_sequence(device):
    logits, labels, ref_c, ref_r = _batch(2, 6, 50, torch.float32, device)
    pairs = torch.tensor([[0, 2], [0, 3]], device=device)
    assert fastdpo.dpo_loss(logits, labels, ref_c, ref_r, pairs=pairs).loss.isfinite()  # fine without LD-DPO
    with pytest.raises(ValueError, match="reuse a sequence"):
        fastdpo.dpo_loss(logits, labels, ref_c, ref_r, pairs=pairs, ld_alpha=0.5)
    with pytest.raises(ValueError, match="reuse a sequence"):  # rejected in one pair, chosen in the other
        fastdpo.dpo_loss(logits, labels, ref_c, ref_r, pairs=torch.tensor([[0, 2], [2, 3]], device=device),
                         ld_alpha=0.5)  # fmt: skip
