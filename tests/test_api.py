"""Public API: ``dpo_loss`` / ``DPOLoss`` against ``fastdpo.reference`` in float64, and argument errors."""

import dataclasses
import inspect
import math

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

LOSS_SETTINGS = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.2),  # label_smoothing is ignored by sigmoid, as in TRL
    ("robust", 0.1, 0.1),
    ("robust", 2.0, 0.3),
    ("ipo", 0.1, 0.0),
    ("ipo", 1.0, 0.0),
    ("hinge", 0.1, 0.0),
    ("hinge", 5.0, 0.0),
]


def _loss_and_grads(fn, logits, labels, ref_c, ref_r, **kw):
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels, ref_c, ref_r, **kw)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,beta,eps", LOSS_SETTINGS)
def test_dpo_loss_matches_reference(backend, loss_type, beta, eps, dtype, device):
    B, T, V = 3, 8, 1000
    logits = make_logits(2 * B, T, V, dtype, device)
    labels = make_labels(2 * B, T, V, device)
    ref_c, ref_r = torch.randn(B, device=device) * 20 - 60, torch.randn(B, device=device) * 20 - 60
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps)

    out, grad = _loss_and_grads(fastdpo.dpo_loss, logits, labels, ref_c, ref_r, **kw)
    truth, truth_grad = _loss_and_grads(reference.dpo_loss, logits.double(), labels, ref_c.double(),
                                        ref_r.double(), **kw)
    base, base_grad = _loss_and_grads(reference.dpo_loss, logits.float(), labels, ref_c, ref_r, **kw)

    # Rewards, margins and the loss are differences of log-probs: errors relative to beta * |log-probs|.
    scale = beta * float(torch.cat([truth.chosen_logps, truth.rejected_logps]).detach().abs().max())
    for field in fastdpo.DPOOutput._fields[:-1]:  # all but metrics (None unless return_metrics)
        got, want, baseline = getattr(out, field), getattr(truth, field), getattr(base, field)
        assert_close_to_reference(got.detach(), want.detach(), baseline.detach(), dtype, field, scale=scale)
    slack = downcast_slack(dtype, triton_path=select_backend(logits) == "triton")
    slack += propagated_slack(beta, truth.chosen_logps, truth.rejected_logps)
    assert_close_to_reference(grad, truth_grad, base_grad.to(dtype), dtype, "grad", slack=slack)
    assert out.loss.shape == () and out.chosen_logps.shape == (B,)
    assert not out.chosen_rewards.requires_grad and not out.reward_accuracy.requires_grad


def test_reference_free_equals_zero_reference(device):
    logits = make_logits(4, 6, 100, torch.float32, device)
    labels = make_labels(4, 6, 100, device)
    zeros = torch.zeros(2, device=device)
    free = fastdpo.dpo_loss(logits, labels, reference_free=True)
    explicit = fastdpo.dpo_loss(logits, labels, zeros, zeros)
    assert torch.equal(free.loss, explicit.loss)


def test_a_tied_pair_is_not_a_reward_accuracy_hit(backend, device):
    """Reward accuracy counts chosen_rewards > rejected_rewards strictly (TRL): a pair whose rejected sequence and
    reference equal its chosen ones ties, and is a miss. Random batches never tie."""
    logits = make_logits(4, 6, 100, torch.float32, device)
    labels = make_labels(4, 6, 100, device)
    logits[2], labels[2] = logits[0], labels[0]  # pair 0: rejected = chosen
    ref = torch.randn(2, device=device)
    out = fastdpo.dpo_loss(logits, labels, ref, ref, return_metrics=True)
    assert out.chosen_rewards[0] == out.rejected_rewards[0]
    expected = float(out.chosen_rewards[1] > out.rejected_rewards[1]) / 2
    assert out.reward_accuracy.item() == out.metrics["rewards/accuracies"].item() == expected


def test_module_equals_function(backend, device):
    logits = make_logits(4, 6, 300, torch.bfloat16, device)
    labels = make_labels(4, 6, 300, device)
    ref_c, ref_r = torch.randn(2, device=device), torch.randn(2, device=device)
    criterion = fastdpo.DPOLoss(beta=0.3, loss_type="robust", label_smoothing=0.1)
    got = criterion(logits, labels, ref_c, ref_r)
    want = fastdpo.dpo_loss(logits, labels, ref_c, ref_r, beta=0.3, loss_type="robust", label_smoothing=0.1)
    assert all(torch.equal(a, b) for a, b in zip(got[:-1], want[:-1])) and got.metrics is want.metrics is None
    assert "robust" in repr(criterion)
    with_metrics = fastdpo.DPOLoss(return_metrics=True, ld_alpha=0.5)(logits, labels, ref_c, ref_r)
    assert with_metrics.metrics.keys() >= {"rewards/accuracies", "entropy", "mean_token_accuracy"}


def test_worked_example_by_hand(device):
    """One pair, V = 2, no reference (reference_free), beta = 1, shift=False.

    chosen row:   logits [0, ln 3] -> p = [1/4, 3/4]; label 1 -> logp_c = ln(3/4)
    rejected row: logits [0, 0]    -> p = [1/2, 1/2]; label 0 -> logp_r = ln(1/2)
    Δ = ln(3/4) − ln(1/2) = ln(3/2);  loss = −log σ(ln 1.5) = −log(1.5 / 2.5) = ln(5/3) ≈ 0.5108
    dL/dlogp_c = −(1 − σ(Δ)) = −0.4, so dL/dz_c = −0.4 · (onehot(1) − p) = −0.4 · [−1/4, 1/4] = [0.1, −0.1]
    """
    logits = torch.tensor([[[0.0, math.log(3)]], [[0.0, 0.0]]], device=device, requires_grad=True)
    labels = torch.tensor([[1], [0]], device=device)
    out = fastdpo.dpo_loss(logits, labels, beta=1.0, reference_free=True, shift=False)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(math.log(5 / 3), rel=1e-6)
    assert out.reward_accuracy.item() == 1.0
    torch.testing.assert_close(logits.grad[0, 0], torch.tensor([0.1, -0.1], device=device))
    torch.testing.assert_close(logits.grad[1, 0], torch.tensor([-0.4 * 0.5, 0.4 * 0.5], device=device) * -1)


def test_ipo_normalises_by_label_tokens(device):
    """IPO divides each log-ratio by the sequence's label-token count, as TRL divides by completion_mask.sum."""
    logits = make_logits(2, 6, 50, torch.float64, device)
    labels = torch.full((2, 6), -100, device=device)
    labels[0, 2:] = torch.randint(0, 50, (4,))  # 4 label tokens, all scored
    labels[1, 3:] = torch.randint(0, 50, (3,))  # 3 label tokens
    logps = reference.sequence_logps(logits, labels)
    out = fastdpo.dpo_loss(logits, labels, beta=0.5, loss_type="ipo", reference_free=True)
    expected = (logps[0] / 4 - logps[1] / 3 - 1 / (2 * 0.5)) ** 2
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("fn", [fastdpo.dpo_loss, reference.dpo_loss], ids=["fastdpo", "reference"])
def test_bad_arguments_raise_clear_errors(fn, device):
    logits = make_logits(4, 5, 20, torch.float32, device)
    labels = make_labels(4, 5, 20, device)
    ref = torch.zeros(2, device=device)
    cases = [
        (dict(logits=logits[0]), ValueError, "3-D"),
        (dict(logits=logits.int()), TypeError, "dtype"),
        (dict(logits=logits.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "unit-stride"),
        (dict(labels=labels.float()), TypeError, "int64 or int32"),
        (dict(labels=labels[:, :-1]), ValueError, "labels must have shape"),
        (dict(logits=logits[:3], labels=labels[:3]), ValueError, "2B rows"),
        (dict(logits=logits[:, :1], labels=labels[:, :1]), ValueError, "T >= 2"),
        (dict(ref_chosen_logps=torch.zeros(3)), ValueError, "ref_chosen_logps must have shape"),
        (dict(ref_rejected_logps=torch.zeros(2, dtype=torch.long)), TypeError, "ref_rejected_logps"),
        (dict(ref_chosen_logps=None), ValueError, "reference_free"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
        (dict(loss_type="kto"), ValueError, "sigmoid"),
    ]
    for overrides, exc, match in cases:
        args = dict(logits=logits, labels=labels, ref_chosen_logps=ref, ref_rejected_logps=ref) | overrides
        with pytest.raises(exc, match=match):
            fn(**args)
    with pytest.raises(ValueError, match="loss_type"):
        fastdpo.DPOLoss(loss_type="nope")


class _Built(Exception):
    pass


def _capture_config(**keywords):
    raise _Built(keywords)


# a value for every loss keyword, none its default
LOSS_KEYWORD_VALUES = dict(beta=0.37, loss_type=["hinge", "sft"], loss_weights=[0.5, 2.0], label_smoothing=0.2,
                           reference_free=True, f_divergence_type="js_divergence", f_alpha_divergence_coef=0.3,
                           ld_alpha=0.7, use_weighting=True, discopop_tau=0.11, simpo_gamma=0.9)  # fmt: skip


@pytest.mark.parametrize("module, name", [("functional", "dpo_loss"), ("fused_linear", "fused_linear_dpo_loss"),
                                          ("reference", "dpo_loss")])  # fmt: skip
def test_every_loss_keyword_reaches_the_config(module, name, monkeypatch):
    """The API functions name each of the config's eleven keywords (no ``locals()``, which torch.compile before 2.13
    cannot trace): each one is a parameter with the config's default and is passed on as given."""
    mod = getattr(fastdpo, module)
    fn = getattr(mod, name)
    config_fields = {f.name: f.default for f in dataclasses.fields(fastdpo.losses.LossConfig)}
    assert set(LOSS_KEYWORD_VALUES) == set(config_fields)
    params = inspect.signature(fn).parameters
    assert {k: params[k].default for k in config_fields} == config_fields
    monkeypatch.setattr(mod, "LossConfig", _capture_config)
    labels = torch.zeros(2, 3, dtype=torch.long)
    inputs = (torch.randn(2, 3, 4), torch.randn(5, 4), labels) if module == "fused_linear" else (torch.randn(2, 3, 5),
                                                                                                labels)  # fmt: skip
    with pytest.raises(_Built) as built:
        fn(*inputs, **LOSS_KEYWORD_VALUES)
    assert built.value.args[0] == LOSS_KEYWORD_VALUES
