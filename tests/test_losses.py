"""The loss family against its formulas written out independently here, in float64, per pair.

``fastdpo.dpo_loss`` and ``fastdpo.reference.dpo_loss`` share ``fastdpo.losses``; this file is what checks
those formulas (TRL 1.16 ``DPOTrainer._compute_loss``) on their own.
"""

import math

import pytest
import torch

from fastdpo.losses import dpo_from_logps


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _expected(loss_type, beta, eps, lc, lr, rc, rr, nc, nr):
    d = (lc - rc) - (lr - rr)
    if loss_type == "sigmoid":
        return -_log_sigmoid(beta * d)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(beta * d) + eps * _log_sigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return ((lc - rc) / max(nc, 1) - (lr - rr) / max(nr, 1) - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


@pytest.mark.parametrize(
    "loss_type,beta,eps",
    [("sigmoid", 0.1, 0.3), ("robust", 0.1, 0.0), ("robust", 0.5, 0.2), ("robust", 1.0, 0.45),
     ("hinge", 0.1, 0.0), ("hinge", 3.0, 0.0), ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0)],
)
def test_losses_match_formulas(loss_type, beta, eps):
    B, T = 6, 5
    logps = torch.randn(2 * B, dtype=torch.float64) * 30 - 40
    ref_c, ref_r = (torch.randn(B, dtype=torch.float64) * 30 - 40 for _ in range(2))
    labels = torch.randint(0, 9, (2 * B, T))
    labels[0] = -100  # no label token: IPO divides by max(n, 1)
    labels[1, 1:] = -100  # one label token
    labels[B + 2, :3] = -100
    n = (labels != -100).sum(1).tolist()

    out = dpo_from_logps(logps, labels, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps,
                         reference_free=False, ignore_index=-100)

    per_pair = [
        _expected(loss_type, beta, eps, logps[i].item(), logps[B + i].item(), ref_c[i].item(), ref_r[i].item(),
                  n[i], n[B + i])
        for i in range(B)
    ]
    assert out.loss.item() == pytest.approx(sum(per_pair) / B, rel=1e-12)
    chosen_rewards = beta * (logps[:B] - ref_c)
    rejected_rewards = beta * (logps[B:] - ref_r)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards)
    assert out.reward_accuracy.item() == pytest.approx((chosen_rewards > rejected_rewards).double().mean().item())
    assert out.reward_margin.item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item())
