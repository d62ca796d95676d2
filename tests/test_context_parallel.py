"""Context parallel on torch.distributed (gloo): every sequence's positions split in contiguous slices across
ranks (labels aligned, ``shift=False``); per-sequence sums all-reduced inside the graph. Loss and metrics equal the
unsharded float64 reference on every rank, each rank's gradient is its slice of the unsharded one (logits path and
fused-linear path, CP alone and CP x TP on a 2 x 2 grid of 4 processes)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdpo
from fastdpo import reference

B, T, V, D = 2, 12, 96, 16
KW = dict(beta=0.3, shift=False, return_metrics=True)


def _inputs():
    gen = torch.Generator().manual_seed(99)
    logits = torch.randn(2 * B, T, V, generator=gen) * 3
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :3] = -100  # prompts
    labels[1, 9:] = -100  # right padding, all in the second slice
    hidden = torch.randn(2 * B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    # references near the policy's own log-probs, so the sigmoid is not saturated and gradients are not tiny
    seq = reference.sequence_logps(logits.double(), labels, shift=False).float()
    ref = seq.view(2, B) + torch.randn(2, B, generator=gen)
    return logits, labels, hidden, weight, ref


def _close(got, want, name, atol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def _check(out, truth, grad, truth_grad, what):
    _close(out.loss, truth.loss, f"{what} loss")
    for name, value in truth.metrics.items():
        _close(out.metrics[name], value, f"{what} {name}")
    assert float(truth_grad.abs().max()) > 1e-3  # a gradient that a wrong scale cannot hide in the tolerance
    _close(grad, truth_grad, f"{what} grad", atol=1e-6)


def _worker(rank, world, store, tp):
    os.environ["FASTDPO_BACKEND"] = "torch"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cp = world // tp
        cp_rank, tp_rank = rank // tp, rank % tp
        # rank = cp_rank * tp + tp_rank: CP groups hold one TP rank each, TP groups one CP slice each
        cp_groups = [dist.new_group([c * tp + t for c in range(cp)]) for t in range(tp)]
        tp_groups = [dist.new_group([c * tp + t for t in range(tp)]) for c in range(cp)]
        cp_group, tp_group = cp_groups[tp_rank], tp_groups[cp_rank]
        logits, labels, hidden, weight, ref = _inputs()
        t0, t1 = T * cp_rank // cp, T * (cp_rank + 1) // cp
        v0, v1 = V * tp_rank // tp, V * (tp_rank + 1) // tp
        x = logits[:, t0:t1, v0:v1].clone().requires_grad_()
        vocab = dict(vocab_parallel_group=tp_group) if tp > 1 else {}
        out = fastdpo.dpo_loss(x, labels[:, t0:t1], *ref, context_parallel_group=cp_group, **vocab, **KW)
        out.loss.backward()
        full = logits.double().requires_grad_()
        truth = reference.dpo_loss(full, labels, *ref.double(), **KW)
        truth.loss.backward()
        _check(out, truth, x.grad, full.grad[:, t0:t1, v0:v1], "logits")
        # fused-linear path: each rank projects its own positions through its rows of the head
        h = hidden[:, t0:t1].clone().requires_grad_()
        w = weight[v0:v1].clone().requires_grad_()
        out = fastdpo.fused_linear_dpo_loss(h, w, labels[:, t0:t1], *ref, context_parallel_group=cp_group, **vocab,
                                            **KW)  # fmt: skip
        out.loss.backward()
        hf, wf = hidden.double().requires_grad_(), weight.double().requires_grad_()
        truth = reference.fused_linear_dpo_loss(hf, wf, labels, *ref.double(), **KW)
        truth.loss.backward()
        _check(out, truth, h.grad, hf.grad[:, t0:t1], "fused")
        # the head is replicated over CP: each rank holds its positions' share of its rows' dW; the sum is the full
        # gradient of those rows
        dist.all_reduce(w.grad, group=cp_group)
        _close(w.grad, wf.grad[v0:v1], "fused dW (summed over CP ranks)", atol=1e-6)
        dist.barrier()  # no rank tears its groups down while another still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=["cp2", "cp2xtp2"])
def test_context_parallel_matches_unsharded(world, tp, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), tp), nprocs=world, join=True)


def test_context_parallel_needs_aligned_labels():
    with pytest.raises(ValueError, match="context_parallel_group needs shift=False"):
        fastdpo.dpo_loss(torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.long), reference_free=True,
                         context_parallel_group=object())  # fmt: skip
