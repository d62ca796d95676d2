"""``fastdpo.reference.dpo_loss`` on small hand-checkable float64 cases: the TRL 1.16 formulas written out as
scalars, LD-DPO and WPO weights rebuilt from first principles, packed batches against their padded twins, and
the logged metrics computed directly from the logits. (``tests/test_trl_parity.py`` compares with TRL itself.)

Batches are built as TRL's ``DataCollatorForPreference`` builds them: prompt + completion, right padding,
rows [0, B) chosen and [B, 2B) rejected; labels are the input ids with -100 outside the completion.
"""

import math

import pytest
import torch

from fastdpo import reference

V = 50
F64 = torch.float64


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def collate(B: int, *, T_extra: int = 0, empty_prompt: bool = False):
    """(logits [2B, T, V] float64, labels [2B, T]) with random prompt / completion lengths (TRL layout)."""
    prompts = [torch.randint(0, V, (0 if empty_prompt and i == 0 else int(torch.randint(1, 4, ())),))
               for i in range(B)]  # fmt: skip
    rows = [torch.cat([prompts[i % B], torch.randint(0, V, (int(torch.randint(1, 8, ())),))]) for i in range(2 * B)]
    T = max(len(r) for r in rows) + T_extra
    labels = torch.full((2 * B, T), -100)
    for i, row in enumerate(rows):
        n_prompt = len(prompts[i % B])
        labels[i, n_prompt : len(row)] = row[n_prompt:]
    return torch.randn(2 * B, T, V, dtype=F64) * 2, labels


def refs_for(logits, labels, spread=2.0):
    """Reference sums near the policy's, so that log-ratios are O(1)."""
    logps = reference.sequence_logps(logits, labels)
    return (logps + torch.randn_like(logps) * spread).chunk(2)


def scalar_pair(logp_c, logp_r, ref_c, ref_r, **kw):
    """One pair, V = 2, one scored token per row (shift=False), whose log-probs are exactly logp_c / logp_r."""
    def logits_for(logp):  # label 0 on logits [a, 0]: log p = log sigmoid(a)
        return [math.log(math.exp(logp) / (1 - math.exp(logp))), 0.0]

    logits = torch.tensor([[logits_for(logp_c)], [logits_for(logp_r)]], dtype=F64)
    labels = torch.zeros(2, 1, dtype=torch.long)
    out = reference.dpo_loss(logits, labels, torch.tensor([ref_c], dtype=F64), torch.tensor([ref_r], dtype=F64),
                             shift=False, **kw)  # fmt: skip
    torch.testing.assert_close(out.chosen_logps, torch.tensor([logp_c], dtype=F64))
    return out


def test_worked_sigmoid_example():
    """Chosen logits [0, ln 3], label 1: logp_c = ln(3/4); rejected [0, 0], label 0: logp_r = ln(1/2).
    beta = 1, no reference: loss = -log sigmoid(ln 1.5) = ln(5/3); rewards are the log-probs."""
    logits = torch.tensor([[[0.0, math.log(3)]], [[0.0, 0.0]]], dtype=F64, requires_grad=True)
    labels = torch.tensor([[1], [0]])
    out = reference.dpo_loss(logits, labels, beta=1.0, reference_free=True, shift=False)
    assert out.loss.item() == pytest.approx(math.log(5 / 3), rel=1e-14)
    assert out.chosen_rewards.item() == pytest.approx(math.log(0.75), rel=1e-14)
    assert out.reward_accuracy.item() == 1.0 and out.reward_margin.item() == pytest.approx(math.log(1.5), rel=1e-14)
    out.loss.backward()  # dL/dlogp_c = -(1 - sigmoid(ln 1.5)) = -0.4 = -dL/dlogp_r; dlogp/dz = onehot - p
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.1, -0.1]], [[0.2, -0.2]]], dtype=F64))


# log-probs and references of one pair: rho_c = 0.7, rho_r = -0.4 (so Δ = 1.1)
PAIR = dict(logp_c=-1.3, logp_r=-2.1, ref_c=-2.0, ref_r=-1.7)
RHO_C, RHO_R = 0.7, -0.4


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_scalar_formulas(beta):
    d, eps, tau = RHO_C - RHO_R, 0.2, 0.05
    z = beta * d
    expected = {
        "sigmoid": -log_sig(z),
        "hinge": max(0.0, 1 - z),
        "robust": (-(1 - eps) * log_sig(z) + eps * log_sig(-z)) / (1 - 2 * eps),
        "exo_pair": sig(z) * (log_sig(z) - math.log(1 - eps)) + sig(-z) * (log_sig(-z) - math.log(eps)),
        "nca_pair": -log_sig(beta * RHO_C) - 0.5 * log_sig(-beta * RHO_C) - 0.5 * log_sig(-beta * RHO_R),
        "bco_pair": -log_sig(beta * RHO_C) - log_sig(-beta * RHO_R),
        "sppo_hard": (RHO_C - 0.5 / beta) ** 2 + (RHO_R + 0.5 / beta) ** 2,
        "apo_zero": 1 - sig(beta * RHO_C) + sig(beta * RHO_R),
        "apo_down": sig(beta * RHO_C) + 1 - sig(beta * (RHO_C - RHO_R)),
        "discopop": -log_sig(z) * (1 - sig(z / tau)) + math.exp(-z) * sig(z / tau),
        "ipo": (d - 1 / (2 * beta)) ** 2,  # one completion token per row
        "sigmoid_norm": -log_sig(z),
        "aot": -(1 - eps) * log_sig(z) - eps * log_sig(-z),  # one pair: sorting is the identity
        "aot_unpaired": -(1 - eps) * log_sig(z) - eps * log_sig(-z),
        "sft": 1.3,
        "simpo": -(1 - eps) * log_sig(beta * (-1.3 + 2.1 - 0.5 / beta)) - eps * log_sig(-beta * (0.8 - 0.5 / beta)),
    }
    for loss_type, value in expected.items():
        out = scalar_pair(**PAIR, beta=beta, loss_type=loss_type, label_smoothing=eps, discopop_tau=tau)
        assert out.loss.item() == pytest.approx(value, rel=1e-12, abs=1e-14), loss_type
        if loss_type == "simpo":  # CPO's rewards: beta * average log-prob
            assert out.chosen_rewards.item() == pytest.approx(beta * -1.3, rel=1e-12)
        else:
            assert out.chosen_rewards.item() == pytest.approx(beta * RHO_C, rel=1e-12)
            assert out.rejected_rewards.item() == pytest.approx(beta * RHO_R, rel=1e-12)


def test_large_margins_stay_exact():
    """-log sigmoid(z) for |z| > 20 to the last ulp (softplus's linear cut-off would be off by e^-|z|)."""
    for beta, want in ((25.0, -log_sig(-27.5)), (40.0, -log_sig(44.0))):  # z = beta * Δ with Δ = ∓1.1
        flipped = beta == 25.0
        pair = dict(logp_c=-2.1, logp_r=-1.3, ref_c=-1.7, ref_r=-2.0) if flipped else PAIR
        out = scalar_pair(**pair, beta=beta, loss_type="sigmoid")
        assert out.loss.item() == pytest.approx(want, rel=1e-14, abs=0)
        assert out.loss.item() != (27.5 if flipped else 0.0)


@pytest.mark.parametrize("kind,score", [
    ("forward_kl", lambda r: 1 - math.exp(-r)),
    ("js_divergence", lambda r: math.log(2 * math.exp(r) / (1 + math.exp(r)))),
    ("alpha_divergence", lambda r: (math.exp(r) ** (0.3 - 1) - 1) / (0.3 - 1)),
])  # fmt: skip
def test_f_divergence_scores(kind, score):
    out = scalar_pair(**PAIR, beta=0.5, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
    assert out.loss.item() == pytest.approx(-log_sig(0.5 * (score(RHO_C) - score(RHO_R))), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5 * RHO_C, rel=1e-12)  # rewards stay log-ratios


def test_sorting_losses_pair_across_the_batch():
    logits, labels = collate(4)
    ref_c, ref_r = refs_for(logits, labels)
    out = reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type="aot", beta=0.3, label_smoothing=0.1)
    d = (out.chosen_logps - out.rejected_logps).sort().values - (ref_c - ref_r).sort().values
    want = sum(-0.9 * log_sig(0.3 * x) - 0.1 * log_sig(-0.3 * x) for x in d.tolist()) / 4
    assert out.loss.item() == pytest.approx(want, rel=1e-12)
    out = reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type="aot_unpaired", beta=0.3)
    d = (out.chosen_logps - ref_c).sort().values - (out.rejected_logps - ref_r).sort().values
    assert out.loss.item() == pytest.approx(sum(-log_sig(0.3 * x) for x in d.tolist()) / 4, rel=1e-12)


def test_length_normalised_losses_count_unshifted_completion_tokens():
    """IPO, sigmoid_norm and SimPO divide by completion_mask.sum() (TRL's unshifted mask): with an empty prompt
    the first completion token counts although it is never scored."""
    logits, labels = collate(3, empty_prompt=True)
    ref_c, ref_r = refs_for(logits, labels)
    n = (labels != -100).sum(1).double()
    assert (labels[0, 0] != -100) and n[0] == (labels[0, 1:] != -100).sum() + 1
    logps = reference.sequence_logps(logits, labels)
    avg_c, avg_r = ((logps - torch.cat([ref_c, ref_r])) / n).chunk(2)
    beta = 0.4
    ipo = reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type="ipo", beta=beta)
    assert ipo.loss.item() == pytest.approx(((avg_c - avg_r - 1 / (2 * beta)) ** 2).mean().item(), rel=1e-12)
    norm = reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type="sigmoid_norm", beta=beta)
    assert norm.loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(beta * (avg_c - avg_r))).mean().item(),
                                             rel=1e-12)  # fmt: skip
    simpo = reference.dpo_loss(logits, labels, loss_type="simpo", beta=beta, simpo_gamma=0.3)
    a_c, a_r = (logps / n).chunk(2)
    u = beta * (a_c - a_r) - 0.3
    assert simpo.loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(u)).mean().item(), rel=1e-12)
    torch.testing.assert_close(simpo.chosen_rewards, beta * a_c)


def test_sft_and_weighted_loss_list():
    logits, labels = collate(3)
    ref_c, ref_r = refs_for(logits, labels)
    per_token = reference.token_logps(logits, labels).log_probs
    sft = reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type="sft")
    assert sft.loss.item() == pytest.approx(-per_token[:3].sum().item() / (labels[:3, 1:] != -100).sum().item())
    parts = {t: reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type=t, beta=0.2).loss
             for t in ("sigmoid", "sft", "bco_pair")}  # fmt: skip
    mixed = reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type=["sigmoid", "sft", "bco_pair"],
                               loss_weights=[0.8, 0.2, 1.5], beta=0.2)  # fmt: skip
    want = 0.8 * parts["sigmoid"] + 0.2 * parts["sft"] + 1.5 * parts["bco_pair"]
    assert mixed.loss.item() == pytest.approx(want.item(), rel=1e-12)
    unweighted = reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type=["sigmoid", "sft"], beta=0.2)
    assert unweighted.loss.item() == pytest.approx((parts["sigmoid"] + parts["sft"]).item(), rel=1e-12)


def shared_prefix_labels(labels):
    """Labels keeping, in each row, only the first min(n_c, n_r) scored completion tokens of its pair."""
    scored = labels[:, 1:] != -100
    n_c, n_r = scored.sum(1).chunk(2)
    shared = torch.minimum(n_c, n_r).repeat(2)
    out = labels.clone()
    out[:, 1:] = torch.where(scored & (scored.cumsum(1) > shared[:, None]), -100, labels[:, 1:])
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sppo_hard"])
def test_ld_alpha(loss_type):
    logits, labels = collate(4, T_extra=2)
    ref_c, ref_r = refs_for(logits, labels)
    kw = dict(loss_type=loss_type, return_metrics=True)
    plain = reference.dpo_loss(logits, labels, ref_c, ref_r, **kw)
    one = reference.dpo_loss(logits, labels, ref_c, ref_r, ld_alpha=1.0, **kw)
    assert one.loss.item() == pytest.approx(plain.loss.item(), rel=1e-13)
    full = reference.sequence_logps(logits, labels)
    shared = reference.sequence_logps(logits, shared_prefix_labels(labels))
    assert not torch.allclose(full, shared)  # some pair has unequal lengths
    zero = reference.dpo_loss(logits, labels, ref_c, ref_r, ld_alpha=0.0, **kw)
    torch.testing.assert_close(torch.cat([zero.chosen_logps, zero.rejected_logps]), shared)
    half = reference.dpo_loss(logits, labels, ref_c, ref_r, ld_alpha=0.25, **kw)
    torch.testing.assert_close(torch.cat([half.chosen_logps, half.rejected_logps]), shared + 0.25 * (full - shared))
    assert half.metrics["logps/chosen"].item() == pytest.approx(half.chosen_logps.mean().item(), rel=1e-13)
    # reference log-probs from ref_logits get the same weighting
    ref_logits = torch.randn_like(logits)
    via_logits = reference.dpo_loss(logits, labels, ref_logits=ref_logits, ld_alpha=0.25, loss_type=loss_type)
    r_full = reference.sequence_logps(ref_logits, labels)
    r_shared = reference.sequence_logps(ref_logits, shared_prefix_labels(labels))
    given = reference.dpo_loss(logits, labels, *(r_shared + 0.25 * (r_full - r_shared)).chunk(2), ld_alpha=0.25,
                               loss_type=loss_type)  # fmt: skip
    assert via_logits.loss.item() == pytest.approx(given.loss.item(), rel=1e-13)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sft"])
def test_wpo_weights(loss_type):
    """w = exp(mean over completion tokens of log p(label) - log sum_v p_v^2), loss = mean(l_i w_c w_r), with
    the weights held constant under autograd."""
    logits, labels = collate(3)
    ref_c, ref_r = refs_for(logits, labels)
    p = logits[:, :-1].softmax(-1)
    mask = labels[:, 1:] != -100
    logp_label = torch.log(p.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1))
    log_sum_sq = torch.log((p * p).sum(-1))
    w = torch.exp(torch.where(mask, logp_label - log_sum_sq, 0).sum(1) / mask.sum(1))
    w_pair = w[:3] * w[3:]
    assert not torch.allclose(w_pair, torch.ones(3, dtype=F64))

    x = logits.clone().requires_grad_()
    got = reference.dpo_loss(x, labels, ref_c, ref_r, loss_type=loss_type, use_weighting=True, beta=0.5)
    got.loss.backward()
    y = logits.clone().requires_grad_()
    logps = reference.sequence_logps(y, labels)
    if loss_type == "sigmoid":
        per_pair = -torch.nn.functional.logsigmoid(0.5 * ((logps[:3] - ref_c) - (logps[3:] - ref_r)))
    else:
        per_pair = (-logps[:3].sum() / mask[:3].sum()).expand(3)
    want = (per_pair * w_pair).mean()
    want.backward()
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-14)


def test_metrics_by_direct_computation():
    logits, labels = collate(3)
    mask = labels[:, 1:] != -100
    # make the label the top-1 on every rejected token but only on even positions of the chosen rows
    boost = (mask & ((torch.arange(mask.shape[1]) % 2 == 0) | (torch.arange(6) >= 3)[:, None])).double() * 8
    logits[:, :-1].scatter_add_(-1, labels[:, 1:].clamp(min=0)[..., None], boost[..., None])
    ref_c, ref_r = refs_for(logits, labels)
    out = reference.dpo_loss(logits, labels, ref_c, ref_r, beta=0.3, return_metrics=True)
    z = logits[:, :-1]
    p = z.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    top1 = (z.argmax(-1) == labels[:, 1:]) & mask
    rc, rr = 0.3 * (out.chosen_logps - ref_c), 0.3 * (out.rejected_logps - ref_r)
    want = {
        "rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (rc > rr).double().mean(),
        "rewards/margins": (rc - rr).mean(), "logps/chosen": out.chosen_logps.mean(),
        "logps/rejected": out.rejected_logps.mean(),
        "logits/chosen": z[:3].mean(-1)[mask[:3]].mean(), "logits/rejected": z[3:].mean(-1)[mask[3:]].mean(),
        "entropy": entropy[mask].mean(), "mean_token_accuracy": top1[:3].sum().double() / mask[:3].sum(),
    }  # fmt: skip
    assert set(out.metrics) == set(want)
    for name, value in want.items():
        got = out.metrics[name]
        assert got.shape == () and not got.requires_grad, name
        assert got.item() == pytest.approx(value.item(), rel=1e-12, abs=1e-14), name
    assert reference.dpo_loss(logits, labels, ref_c, ref_r).metrics is None


def test_reference_resolution():
    logits, labels = collate(2)
    zeros = torch.zeros(2, dtype=F64)
    free = reference.dpo_loss(logits, labels, reference_free=True)
    assert free.loss.item() == reference.dpo_loss(logits, labels, zeros, zeros).loss.item()
    ref_logits = torch.randn_like(logits)
    via_logits = reference.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type="apo_down")
    sums = reference.sequence_logps(ref_logits, labels).chunk(2)
    assert via_logits.loss.item() == pytest.approx(reference.dpo_loss(logits, labels, *sums,
                                                                      loss_type="apo_down").loss.item(), rel=1e-14)
    reference.dpo_loss(logits, labels, loss_type="simpo")  # reference-free by nature
    for kw in (dict(), dict(ref_chosen_logps=zeros), dict(loss_type=["simpo", "sigmoid"])):
        with pytest.raises(ValueError, match="ref_chosen_logps.*ref_logits"):
            reference.dpo_loss(logits, labels, **kw)


def pack(logits, labels, order):
    """Sequences ``order`` of a padded batch, unpadded and concatenated: ([1, total_T, V], [1, total_T], cu)."""
    lengths = [int((labels[i] != -100).nonzero().max()) + 1 for i in order]
    packed_logits = torch.cat([logits[i, :n] for i, n in zip(order, lengths)])[None]
    packed_labels = torch.cat([labels[i, :n] for i, n in zip(order, lengths)])[None]
    cu = torch.tensor([0] + lengths).cumsum(0)
    return packed_logits, packed_labels, cu


@pytest.mark.parametrize("options", [dict(loss_type="sigmoid"), dict(loss_type=["ipo", "sft"], ld_alpha=0.3),
                                     dict(loss_type="apo_zero", use_weighting=True)])  # fmt: skip
def test_packed_equals_padded(options):
    B = 3
    logits, labels = collate(B)
    labels[:, 0] = torch.randint(0, V, (2 * B,))  # a label on every sequence's first token: never scored
    ref_c, ref_r = refs_for(logits, labels)
    x = logits.clone().requires_grad_()
    padded = reference.dpo_loss(x, labels, ref_c, ref_r, return_metrics=True, **options)
    padded.loss.backward()

    order = [4, 0, 3, 5, 1, 2]  # sequence k of the pack is padded row order[k]
    packed_logits, packed_labels, cu = pack(logits, labels, order)
    pairs = torch.tensor([[order.index(i), order.index(B + i)] for i in range(B)])
    positions = torch.cat([torch.arange(int(n)) for n in cu.diff()])[None]
    for packing in (dict(cu_seq_lens=cu), dict(position_ids=positions)):
        y = packed_logits.clone().requires_grad_()
        out = reference.dpo_loss(y, packed_labels, ref_c, ref_r, pairs=pairs, return_metrics=True, **packing,
                                 **options)  # fmt: skip
        out.loss.backward()
        for field in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
            torch.testing.assert_close(getattr(out, field), getattr(padded, field), rtol=1e-13, atol=1e-13)
        for name, value in padded.metrics.items():
            torch.testing.assert_close(out.metrics[name], value, rtol=1e-13, atol=1e-13)
        want_grad = torch.cat([x.grad[i, : int(n)] for i, n in zip(order, cu.diff())])[None]
        torch.testing.assert_close(y.grad, want_grad, rtol=1e-13, atol=1e-15)
        assert (y.grad[0, cu[1:] - 1] == 0).all()  # a sequence's last position scores nothing

    # the same pairs given for the padded rows in another order
    rows = torch.tensor(order)
    out = reference.dpo_loss(logits[rows], labels[rows], ref_c, ref_r, pairs=pairs, **options)
    torch.testing.assert_close(out.loss, padded.loss.detach(), rtol=1e-13, atol=1e-13)


def test_packed_default_pairs_and_errors():
    B = 2
    logits, labels = collate(B)
    ref_c, ref_r = refs_for(logits, labels)
    packed_logits, packed_labels, cu = pack(logits, labels, [0, 1, 2, 3])
    padded = reference.dpo_loss(logits, labels, ref_c, ref_r)
    packed = reference.dpo_loss(packed_logits, packed_labels, ref_c, ref_r, cu_seq_lens=cu)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-13, atol=1e-13)
    total = packed_labels.shape[1]
    bad = [
        (dict(logits=logits, labels=labels, cu_seq_lens=cu), "(1, total_T, V)"),
        (dict(cu_seq_lens=cu[1:]), "cu_seq_lens must start at 0"),
        (dict(cu_seq_lens=torch.cat([cu[:-1], cu[-1:] - 1])), "cu_seq_lens must start at 0, end at total_T"),
        (dict(cu_seq_lens=torch.tensor([0, 3, 3, total])), "increase strictly"),
        (dict(cu_seq_lens=cu[None]), "cu_seq_lens must be a 1-D"),
        (dict(cu_seq_lens=torch.tensor([0, int(cu[1]), int(cu[2]), total])), "2B rows"),  # 3 sequences,
        (dict(cu_seq_lens=cu, position_ids=torch.zeros(1, total, dtype=torch.long)), "not both"),
        (dict(position_ids=torch.zeros(total, dtype=torch.long)), "position_ids must be"),
        (dict(cu_seq_lens=cu, pairs=torch.tensor([0, 1])), "pairs must be"),
        (dict(cu_seq_lens=cu, pairs=torch.tensor([[0, 4], [1, 2]])), "pairs must index"),
        (dict(cu_seq_lens=cu, ref_logits=logits), "ref_logits must be"),
    ]
    for overrides, match in bad:
        args = dict(logits=packed_logits, labels=packed_labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
        with pytest.raises(ValueError, match=match):
            reference.dpo_loss(**(args | overrides))
    with pytest.raises(ValueError, match="label_smoothing"):
        reference.dpo_loss(logits, labels, ref_c, ref_r, loss_type="exo_pair")
