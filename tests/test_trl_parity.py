"""``fastdpo.reference.dpo_loss`` against TRL 1.16's own ``DPOTrainer._compute_loss`` (and CPO's SimPO loss).

TRL's method is called unbound on a stand-in for the trainer (the attributes ``_compute_loss`` reads) with a
fake policy model: it ignores its inputs except ``labels`` and returns the fused-LM-head outputs
(``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``, each ``[2B, T - 1]``, position t
scoring ``input_ids[:, t + 1]``) computed from a fixed float64 logits tensor by ``fastdpo.reference.token_logps``.
Batches come from TRL's own ``DataCollatorForPreference``. Loss, logged metrics and the logits' gradient must
agree to ~1e-10 in float64.
"""

import contextlib
import math
import os
import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402

from fastdpo import reference  # noqa: E402

V = 50
ALL_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")  # fmt: skip
TRL_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]  # fmt: skip


def make_batch(B: int, dtype=torch.float64, *, empty_completion: bool = False, tied_pair: bool = False):
    """TRL-collated batch (prompt + completion, right padding), fixed logits, and references near the policy.
    ``empty_completion``: pair 0 has an empty rejected completion and pair 1 an empty prompt (its completion
    starts at position 0, so the unshifted completion count is one more than the scored tokens). ``tied_pair``:
    pair 0's rejected completion, logits and reference equal its chosen ones (equal rewards)."""
    examples = []
    for i in range(B):
        rand = lambda lo, hi: torch.randint(0, V, (int(torch.randint(lo, hi, ())),)).tolist()  # noqa: E731
        example = {"prompt_ids": rand(1, 5), "chosen_ids": rand(1, 8), "rejected_ids": rand(1, 8)}
        if empty_completion and i == 0:
            example["rejected_ids"] = []
        if empty_completion and i == 1:
            example["prompt_ids"] = []
        if tied_pair and i == 0:
            example["rejected_ids"] = example["chosen_ids"]
        examples.append(example)
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = torch.randn(2 * B, labels.shape[1], V, dtype=torch.float64) * 2
    boost = ((labels[:, 1:] != -100) & (torch.rand(labels[:, 1:].shape) < 0.5)).double() * 6  # top-1 hits
    logits[:, :-1].scatter_add_(-1, labels[:, 1:].clamp(min=0)[..., None], boost[..., None])
    if tied_pair:
        assert torch.equal(labels[0], labels[B])
        logits[B] = logits[0]
    logits = logits.to(dtype)
    logps = reference.sequence_logps(logits.double(), labels)
    ref = (logps + torch.randn(2 * B, dtype=torch.float64) * 3).to(dtype)
    if tied_pair:
        ref[B] = ref[0]
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.chunk(2)
    return batch, logits, labels


class FakePolicy:
    """The fused-LM-head model: per-token outputs of fixed logits for the labels TRL passes."""

    def __init__(self, logits: torch.Tensor, expected_labels: torch.Tensor):
        self.logits, self.expected_labels = logits, expected_labels

    def __call__(self, *, labels, fused_lm_head, **kwargs):
        assert fused_lm_head and torch.equal(labels, self.expected_labels)
        out = reference.token_logps(self.logits, labels, ignore_index=-100, shift=True, outputs=ALL_OUTPUTS)
        return types.SimpleNamespace(**out._asdict())


def trl_trainer(*, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, ld_alpha=None,
                f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False,
                discopop_tau=0.05, ref_model=None):  # fmt: skip
    """The attributes ``DPOTrainer._compute_loss`` reads, as ``DPOTrainer.__init__`` sets them (TRL lines
    801-820, 965-975); single process, so every gather is the identity."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    identity = lambda x: x  # noqa: E731
    return types.SimpleNamespace(
        beta=beta, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types),
        label_smoothing=label_smoothing, ld_alpha=ld_alpha, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting,
        precompute_ref_logps=ref_model is None, ref_model=ref_model, aux_loss_enabled=False,
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_trl(batch, logits, labels, *, ref_logits=None, backward=True, **options):
    """TRL's loss, logged metrics and d loss / d logits. ``exo_pair`` builds its epsilon with ``torch.tensor``
    (float32 by default), which would round log(1 - eps) to float32 in a float64 run: the default dtype follows
    the logits so TRL's arithmetic stays in the batch's precision."""
    x = logits.clone().requires_grad_()
    ref_model = None if ref_logits is None else FakePolicy(ref_logits, labels)
    trainer = trl_trainer(ref_model=ref_model, **options)
    with default_dtype(logits.dtype):
        loss = DPOTrainer._compute_loss(trainer, FakePolicy(x, labels), dict(batch), return_outputs=False)
    if backward:
        loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert metrics.pop("num_tokens") == int(batch["attention_mask"].sum())
    return loss.detach(), metrics, x.grad


def run_reference(batch, logits, labels, *, ref_logits=None, **options):
    x = logits.clone().requires_grad_()
    refs = (None, None) if ref_logits is not None else (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    out = reference.dpo_loss(x, labels, *refs, ref_logits=ref_logits, return_metrics=True, **options)
    out.loss.backward()
    return out, x.grad


def assert_parity(B=4, dtype=torch.float64, tol=1e-10, *, use_ref_logits=False, empty_completion=False,
                  tied_pair=False, trl_backward=True, **options):  # fmt: skip
    batch, logits, labels = make_batch(B, dtype, empty_completion=empty_completion, tied_pair=tied_pair)
    ref_logits = (torch.randn_like(logits.double()) * 2).to(dtype) if use_ref_logits else None
    trl_loss, trl_metrics, trl_grad = run_trl(batch, logits, labels, ref_logits=ref_logits, backward=trl_backward,
                                              **options)  # fmt: skip
    out, grad = run_reference(batch, logits, labels, ref_logits=ref_logits, **options)
    assert set(out.metrics) == set(METRICS) == set(trl_metrics)
    # equal_nan: discopop's sigmoid(z / tau) * exp(-z) is 0 * inf = NaN in TRL for very negative margins (here
    # from forward-KL scores); parity then means NaN on both sides
    torch.testing.assert_close(out.loss.detach(), trl_loss, rtol=tol, atol=tol, equal_nan=True)
    for name in METRICS:
        assert out.metrics[name].item() == pytest.approx(trl_metrics[name], rel=tol, abs=tol), name
    if trl_backward:
        torch.testing.assert_close(grad, trl_grad, rtol=tol, atol=tol, equal_nan=True)
    return out


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_trl_loss_type(loss_type):
    eps = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.3}.get(loss_type, 0.0)
    assert_parity(loss_type=loss_type, beta=0.3, label_smoothing=eps)


@pytest.mark.parametrize("loss_type,eps,beta", [("exo_pair", 0.3, 1.0), ("robust", 0.45, 0.05), ("sigmoid", 0.2, 2.0),
                                                ("discopop", 0.0, 1.5), ("hinge", 0.0, 0.05)])  # fmt: skip
def test_label_smoothing_and_beta(loss_type, eps, beta):
    assert_parity(loss_type=loss_type, beta=beta, label_smoothing=eps, discopop_tau=0.2)


@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft",
                                       "sigmoid_norm"])  # fmt: skip
def test_f_divergences(f_divergence_type, loss_type):
    eps = {"exo_pair": 0.1, "robust": 0.1}.get(loss_type, 0.0)
    assert_parity(loss_type=loss_type, f_divergence_type=f_divergence_type, label_smoothing=eps, beta=0.5)


def test_alpha_divergence_limit_is_reverse_kl():
    assert_parity(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)


@pytest.mark.parametrize("coef", [0.5, 0.2, 1.5])
def test_alpha_divergence_in_float32(coef):
    """TRL's alpha branch looks its clamp up in a table without float64 (KeyError for float64 log-ratios) and
    computes in float32 anyway, so the comparison runs on float32 logits; the float64 reference is then checked
    against TRL's float32 result to float32 accuracy."""
    options = dict(loss_type=["sigmoid", "ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef)
    batch, logits, labels = make_batch(4, torch.float64)
    with pytest.raises(KeyError):
        run_trl(batch, logits, labels, **options)
    batch32 = dict(batch, ref_chosen_logps=batch["ref_chosen_logps"].float(),
                   ref_rejected_logps=batch["ref_rejected_logps"].float())  # fmt: skip
    trl_loss, trl_metrics, trl_grad = run_trl(batch32, logits.float(), labels, **options)
    out32, grad32 = run_reference(batch32, logits.float(), labels, **options)
    torch.testing.assert_close(out32.loss.detach(), trl_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad32, trl_grad, rtol=1e-5, atol=1e-7)
    out64, _ = run_reference(batch, logits, labels, **options)
    assert out64.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)
    assert out64.metrics["rewards/margins"].item() == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)


def test_loss_list_with_weights():
    assert_parity(loss_type=["sigmoid", "sft", "bco_pair", "ipo"], loss_weights=[0.8, 0.2, 0.5, 0.05], beta=0.2)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", ["apo_zero", "sft"]])
def test_ld_alpha(ld_alpha, loss_type):
    assert_parity(loss_type=loss_type, ld_alpha=ld_alpha)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["nca_pair", "sppo_hard"]])
def test_wpo_weighting(loss_type):
    assert_parity(loss_type=loss_type, use_weighting=True, beta=0.5)


def test_wpo_weighting_hinge():
    """TRL multiplies hinge's ReLU output in place by the WPO weights, which ReLU's backward needs: TRL's forward
    runs but its backward raises. Loss and metrics are compared; the gradient only on our side (finite)."""
    batch, logits, labels = make_batch(4)
    with pytest.raises(RuntimeError, match="inplace operation"):
        run_trl(batch, logits, labels, loss_type="hinge", use_weighting=True)
    out = assert_parity(loss_type="hinge", use_weighting=True, beta=0.5, trl_backward=False)
    assert out.loss.requires_grad


def test_wpo_weighting_sft():
    """TRL multiplies the expanded (stride-0) SFT loss in place by the WPO weights, which raises for B > 1; with
    B = 1 it runs. For B > 1 the intended value, mean over pairs of L_sft * w_c * w_r, is rebuilt from TRL runs:
    L_sft from the unweighted SFT loss, each pair's w_c * w_r as TRL's weighted / unweighted sigmoid loss of
    that pair alone."""
    assert_parity(B=1, loss_type="sft", use_weighting=True)
    B = 3
    batch, logits, labels = make_batch(B)
    with pytest.raises(RuntimeError, match="memory location"):
        run_trl(batch, logits, labels, loss_type="sft", use_weighting=True)
    sft_loss = run_trl(batch, logits, labels, loss_type="sft")[0]
    pair_weights = []
    for i in range(B):
        rows = torch.tensor([i, B + i])
        pair = {key: value[rows] if value.shape[0] == 2 * B else value[i : i + 1] for key, value in batch.items()}
        weighted = run_trl(pair, logits[rows], labels[rows], loss_type="sigmoid", use_weighting=True)[0]
        pair_weights.append(weighted / run_trl(pair, logits[rows], labels[rows], loss_type="sigmoid")[0])
    out, _ = run_reference(batch, logits, labels, loss_type="sft", use_weighting=True)
    torch.testing.assert_close(out.loss.detach(), sft_loss * torch.stack(pair_weights).mean(), rtol=1e-10, atol=1e-10)


def test_everything_together():
    assert_parity(loss_type=["sigmoid_norm", "discopop", "robust"], loss_weights=[1.0, 0.3, 0.1], ld_alpha=0.4,
                  use_weighting=True, f_divergence_type="js_divergence", beta=0.7, label_smoothing=0.2)  # fmt: skip


@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_reference_model_forward(ld_alpha):
    """``precompute_ref_log_probs=False``: TRL runs the reference model itself; here ``ref_logits``."""
    assert_parity(loss_type="sigmoid", use_ref_logits=True, ld_alpha=ld_alpha, use_weighting=ld_alpha is None)


def test_empty_completion():
    """An empty rejected completion (counts clamp at 1) and an empty prompt (IPO and sigmoid_norm divide by the
    unshifted completion count, one more than the scored tokens), as TRL's collator produces them."""
    assert_parity(loss_type=["ipo", "sigmoid_norm", "sigmoid"], empty_completion=True, ld_alpha=0.5)


def test_tied_pair_is_not_a_reward_accuracy_hit():
    """TRL's rewards/accuracies counts chosen_rewards > rejected_rewards, strictly: a pair with equal rewards is a
    miss (random batches never tie, so only a constructed tie tells > from >=)."""
    out = assert_parity(loss_type="sigmoid", tied_pair=True)
    assert out.chosen_rewards[0] == out.rejected_rewards[0]


def test_simpo_against_trl_cpo():
    """SimPO is not in TRL's DPO trainer: check against ``CPOTrainer.cpo_loss`` (TRL lines 715-722) given the
    average log-probs CPO's ``get_batch_logps(..., average_log_prob=True)`` computes (over the shifted mask,
    which equals the completion-token count here since every prompt is non-empty)."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    batch, logits, labels = make_batch(4)
    cpo_self = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.1,
                                     accelerator=types.SimpleNamespace(device=torch.device("cpu")))  # fmt: skip
    average = torch.cat([cpo.CPOTrainer.get_batch_logps(logits[:4], labels[:4], average_log_prob=True),
                         cpo.CPOTrainer.get_batch_logps(logits[4:], labels[4:], average_log_prob=True)])  # fmt: skip
    losses, chosen_rewards, rejected_rewards = cpo.CPOTrainer.cpo_loss(cpo_self, *average.chunk(2))
    out = reference.dpo_loss(logits, labels, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, losses.mean(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, rtol=1e-10, atol=1e-10)
    assert math.isfinite(out.loss.item())
