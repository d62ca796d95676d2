"""``fastdpo.integrations.liger`` against Liger-Kernel's own ``LigerFusedLinearDPOLoss`` (its PyTorch chunked loss,
``compiled=False``, on the CPU): the same call gives the same loss, outputs and gradients, for each of Liger's loss
types, with and without the reference model, the NLL term and averaged log-probs."""

import pytest
import torch

from fastdpo.integrations.liger import LigerFusedLinearDPOLoss

chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V = 3, 9, 16, 203
LIGER_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                    "apo_down", "discopop")  # fmt: skip
NAMES = ("chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
         "chosen_rewards", "rejected_rewards")  # fmt: skip


def _inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=gen)
    weight, bias = torch.randn(V, H, generator=gen) * 0.3, torch.randn(V, generator=gen)
    ref = (hidden + 0.1 * torch.randn(2 * B, T, H, generator=gen), weight + 0.05 * torch.randn(V, H, generator=gen),
           bias.clone())  # fmt: skip
    target = torch.randint(0, V, (2 * B, T), generator=gen)
    target[:, :2] = -100  # prompts
    target[1, 6:] = target[B + 2, 4:] = -100  # padding of unequal length
    return hidden, weight, bias, ref, target


def _run(cls, options, hidden, weight, bias, ref, target):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = ref if options.get("use_ref_model", True) else (None, None, None)
    loss, aux = cls(**options)(leaves[1], leaves[0], target, leaves[2], *refs)
    loss.backward()
    return loss, aux, [t.grad for t in leaves]


VARIANTS = ("ref", "ref-free+nll", "ref+nll+average")
# every loss type with the reference model, every variant with three of them
CASES = [(t, "ref") for t in LIGER_LOSS_TYPES]
CASES += [(t, v) for t in ("sigmoid", "robust", "apo_down") for v in VARIANTS[1:]]


@pytest.mark.parametrize("loss_type, variant", CASES, ids=[f"{t}-{v}" for t, v in CASES])
def test_matches_liger(loss_type, variant, cpu_backend):
    options = dict(loss_type=loss_type, beta=0.2, compiled=False, chunk_size=2,
                   label_smoothing=0.1 if loss_type in ("robust", "exo_pair") else 0.0)  # fmt: skip
    if variant != "ref":
        options.update(compute_nll_loss=True, alpha=0.7)
    options["use_ref_model"] = not variant.startswith("ref-free")
    options["average_log_prob"] = variant.endswith("average")
    inputs = _inputs(int(torch.randint(2**31, ())))
    want_loss, want_aux, want_grads = _run(chunked_loss.LigerFusedLinearDPOLoss, options, *inputs)
    loss, aux, grads = _run(LigerFusedLinearDPOLoss, options, *inputs)

    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert len(aux) == len(want_aux) == len(NAMES)
    for name, got, want in zip(NAMES, aux, want_aux):
        assert got.shape == want.shape, name
        assert not got.requires_grad, name
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name, got, want in zip(("input", "weight", "bias"), grads, want_grads):
        scale = float(want.abs().max())
        assert scale > 0, f"{name}: a zero gradient cannot tell implementations apart"
        # both float32 (Liger's log-softmax in float32, fastdpo's loss arithmetic in float64): rounding differences
        # reach a few 1e-5 of the largest element (discopop); a wrong formula or scaling is off by O(scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name} grad: {m}")


def test_options_are_checked():
    with pytest.raises(ValueError, match="label_smoothing"):
        LigerFusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="loss_type"):
        LigerFusedLinearDPOLoss(loss_type="dpo")
    hidden, weight, bias, _, target = _inputs(0)
    with pytest.raises(ValueError, match="ref_input"):
        LigerFusedLinearDPOLoss()(weight, hidden, target)
    with pytest.raises(ValueError, match=r"target must be a \[2B, T\]"):
        LigerFusedLinearDPOLoss(use_ref_model=False)(weight, hidden, target[:-1])
