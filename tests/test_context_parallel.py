"""Context parallel on torch.distributed (gloo): the positions split in contiguous slices across ranks (labels
aligned, ``shift=False``), padded rows or one packed row whose sequences cross slices; per-sequence sums all-reduced
inside the graph. Loss and metrics equal the unsharded float64 reference on every rank and each rank's gradient is
its slice of the unsharded one: logits path and fused-linear path, CP alone (2 and 4 ranks, uneven slices) and
CP x TP on a 2 x 2 grid (process groups, or torchtitan's 2-D DeviceMesh with DTensor vocab shards), LD-DPO (a
token's rank counts the scored tokens of the slices before it) and WPO."""

import os

import pytest
import torch
import torch.distributed as dist

import fastdpo
from fastdpo import reference
from fastdpo._testing import spawn_group

B, V, D = 2, 96, 16
T_PADDED = 12
LENGTHS = (7, 5, 9, 7)  # packed sequences: chosen 0, 1 then rejected 0, 1; 28 positions


def _float64_sequence_logps(logits, labels, **kw):
    """The single-device float64 sums (the PyTorch path, whatever backend the worker tests)."""
    backend = os.environ.pop("FASTDPO_BACKEND", None)
    try:
        return fastdpo.sequence_logps(logits.double(), labels, **kw)
    finally:
        if backend is not None:
            os.environ["FASTDPO_BACKEND"] = backend


def _inputs(seed: int, packed: bool):
    """(logits, labels as the collator gives them, hidden, weight, ref sums, cu_seq_lens or None); logits ``[2B, T,
    V]`` or ``[1, sum(LENGTHS), V]``."""
    gen = torch.Generator().manual_seed(seed)
    N, T = (1, sum(LENGTHS)) if packed else (2 * B, T_PADDED)
    logits = torch.randn(N, T, V, generator=gen) * 3
    labels = torch.randint(0, V, (N, T), generator=gen)
    cu = None
    if packed:
        cu = torch.tensor([0, *LENGTHS]).cumsum(0)
        for start, prompt in zip(cu[:-1].tolist(), (2, 0, 3, 1)):  # no prompt: the first token is a label
            labels[0, start : start + prompt] = -100
    else:
        labels[:, :3] = -100  # prompts
        labels[1, 9:] = -100  # right padding, all in the second slice
    hidden = torch.randn(N, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    # references near the policy's own log-probs, so the sigmoid is not saturated and gradients are not tiny
    seq = _float64_sequence_logps(logits, labels, cu_seq_lens=cu)
    ref = seq.float().view(2, B) + torch.randn(2, B, generator=gen)
    return logits, labels, hidden, weight, ref, cu


def _close(got, want, name, atol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def _check(out, truth, grad, truth_grad, what):
    _close(out.loss, truth.loss, f"{what} loss")
    for name, value in truth.metrics.items():
        _close(out.metrics[name], value, f"{what} {name}")
    if truth_grad.numel() == 0:  # a rank holding no position
        assert grad.shape == truth_grad.shape, f"{what} grad: shape {tuple(grad.shape)} != {tuple(truth_grad.shape)}"
        return
    scale = float(truth_grad.abs().max())
    assert scale > 1e-9  # a gradient a wrong scale could hide in: tolerances below are relative to its maximum
    _close(grad, truth_grad, f"{what} grad", atol=1e-5 * scale)


def _groups(rank, world, tp):
    """(CP group, TP group or None, CP rank, TP rank) on a CP x TP grid, rank = cp_rank * tp + tp_rank."""
    cp = world // tp
    cp_rank, tp_rank = rank // tp, rank % tp
    cp_groups = [dist.new_group([c * tp + t for c in range(cp)]) for t in range(tp)]
    tp_groups = [dist.new_group([c * tp + t for t in range(tp)]) for c in range(cp)]
    return cp_groups[tp_rank], tp_groups[cp_rank] if tp > 1 else None, cp_rank, tp_rank


def _mesh_groups(rank, world, tp):
    """The DTensor form of ``_groups``: a 2-D ("cp", "tp") mesh, as torchtitan builds it; (CP mesh, TP mesh, CP rank,
    TP rank), each 1-D mesh standing for its group."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("cp", "tp"))
    return mesh["cp"], mesh["tp"], rank // tp, rank % tp


def _positions(layout, cp_rank, cp, T, cp_mesh=None):
    """(this CP rank's positions, whether to pass them): contiguous ``[bounds]`` in rank order (the default layout),
    ``"torch"``: what torch's load-balanced ``context_parallel`` gives this rank (a sharded ``arange``) on
    ``cp_mesh`` (default: a 1-D mesh of the world), or explicit per-rank position lists."""
    if layout == "torch":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel

        positions = torch.arange(T)
        with context_parallel(cp_mesh or init_device_mesh("cpu", (cp,)), buffers=[positions], buffer_seq_dims=[0],
                              no_restore_buffers={positions}):  # fmt: skip
            return positions.clone(), True
    if isinstance(layout[0], int):
        return torch.arange(layout[cp_rank], layout[cp_rank + 1]), False
    return torch.tensor(layout[cp_rank]), True  # an empty list gives a float32 tensor: accepted as no position


def _worker(rank, world, seed, tp, layout, packing, backend, loss_kw, api="groups"):
    """``api``: "groups" passes process groups and plain shards; "dtensor" passes DeviceMeshes (a 2-D one's "cp"
    and "tp" dimensions), the logits' and the head's vocab shards as DTensors on the "tp" mesh."""
    os.environ["FASTDPO_BACKEND"] = backend
    if api == "dtensor":
        cp_group, tp_group, cp_rank, tp_rank = _mesh_groups(rank, world, tp)
    else:
        cp_group, tp_group, cp_rank, tp_rank = _groups(rank, world, tp)
    logits, labels, hidden, weight, ref, cu = _inputs(seed, packed=packing is not None)
    given, explicit = _positions(layout, cp_rank, world // tp, logits.shape[1], cp_group if api == "dtensor" else None)
    pos = given.long()  # for indexing here; the library gets the positions as given
    v0, v1 = V * tp_rank // tp, V * (tp_rank + 1) // tp
    kw = dict(shift=False, return_metrics=True, **loss_kw)
    # the single-device truth scores the collator's labels with shift=True; each rank gets its positions of the
    # shifted labels (fastdpo.shift_labels), boundary tokens included
    truth_kw = dict(kw, shift=True, cu_seq_lens=cu)
    aligned = fastdpo.shift_labels(labels, cu_seq_lens=cu)[:, pos]
    batch = dict(context_parallel_positions=given) if explicit else {}
    if packing == "cu_seq_lens":
        batch["cu_seq_lens"] = cu
    elif packing == "position_ids":  # this rank's share of the packed row's position ids
        batch["position_ids"] = torch.cat([torch.arange(n) for n in LENGTHS])[None, pos]
    if pos.numel() == 0:  # a rank with no position may build its empty shares by hand: torch.empty gives float32
        aligned = torch.empty(aligned.shape)
        batch.update({k: torch.empty(v.shape) for k, v in batch.items() if k != "cu_seq_lens"})
    vocab = dict(vocab_parallel_group=tp_group) if tp_group is not None else {}

    x = logits[:, pos, v0:v1].clone().requires_grad_()
    logits_in = x
    if api == "dtensor":  # what a loss-parallel lm_head gives (ColwiseParallel, Shard(-1), use_local_output=False)
        from torch.distributed.tensor import DTensor, Shard

        logits_in = DTensor.from_local(x, tp_group, [Shard(2)], run_check=False, shape=(*x.shape[:2], V),
                                       stride=(x.shape[1] * V, V, 1))  # fmt: skip
        vocab = {}  # the DTensor carries its group and offsets
    loss_module = fastdpo.DPOLoss(context_parallel_group=cp_group, **vocab, **kw)
    out = loss_module(logits_in, aligned, *ref, **batch)
    kw.update(batch)
    out.loss.backward()
    full = logits.double().requires_grad_()
    truth = reference.dpo_loss(full, labels, *ref.double(), **truth_kw)
    truth.loss.backward()
    _check(out, truth, x.grad, full.grad[:, pos, v0:v1], "logits")

    seq_kw = {k: v for k, v in kw.items() if k in ("shift", "ld_alpha", *batch)}
    seq = fastdpo.sequence_logps(logits_in.detach(), aligned, context_parallel_group=cp_group, **vocab,
                                 **seq_kw)  # fmt: skip
    want = _float64_sequence_logps(logits, labels, cu_seq_lens=cu, ld_alpha=kw.get("ld_alpha"))
    _close(seq, want, "sequence_logps")

    # fused-linear path: each rank projects its own positions through its rows of the head
    h = hidden[:, pos].clone().requires_grad_()
    w = weight[v0:v1].clone().requires_grad_()
    if api == "dtensor":  # ColwiseParallel's lm_head.weight: Shard(0) on the "tp" mesh, passed with that mesh
        head = DTensor.from_local(w, tp_group, [Shard(0)], run_check=False, shape=(V, D), stride=(D, 1))
        vocab = dict(vocab_parallel_group=tp_group)
    else:
        head = w
    if packing is None:
        out = fastdpo.fused_linear_dpo_loss(h, head, aligned, *ref, context_parallel_group=cp_group, **vocab, **kw)
    else:  # the module, the per-batch tensors given to forward
        config = {k: v for k, v in kw.items() if k not in batch}
        module = fastdpo.FusedLinearDPOLoss(context_parallel_group=cp_group, **vocab, **config)
        out = module(h, head, aligned, *ref, **batch)
    out.loss.backward()
    hf, wf = hidden.double().requires_grad_(), weight.double().requires_grad_()
    truth = reference.fused_linear_dpo_loss(hf, wf, labels, *ref.double(), **truth_kw)
    truth.loss.backward()
    _check(out, truth, h.grad, hf.grad[:, pos], "fused")
    # the head is replicated over CP: each rank holds its positions' share of its rows' dW; the sum is the full
    # gradient of those rows
    dist.all_reduce(w.grad, group=cp_group if api == "groups" else cp_group.get_group())
    _close(w.grad, wf.grad[v0:v1], "fused dW (summed over CP ranks)", atol=1e-5 * float(wf.grad.abs().max()))


LD = dict(ld_alpha=0.6)
# 4 ranks' positions in no rank order, each rank's own out of order too, a rank holding pieces of three sequences
SCATTERED = [[27, 0, 1, 14, 15], [2, 3, 4, 5, 6, 7, 20, 21], [8, 9, 10, 11, 12, 13],
             [16, 17, 18, 19, 22, 23, 24, 25, 26]]  # fmt: skip
SCATTERED_WITH_EMPTY = [SCATTERED[0] + SCATTERED[3], [], SCATTERED[1] + SCATTERED[2]]
CASES = {
    # id: (world, tp, layout: contiguous bounds, "torch" (load-balanced) or position lists, packing, backend, loss)
    "cp2-torch": (2, 1, [0, 6, T_PADDED], None, "torch", dict(beta=0.3)),
    "cp2-ld-triton": (2, 1, [0, 6, T_PADDED], None, "triton", dict(beta=0.3, **LD)),
    "cp2-torchlayout-ld-torch": (2, 1, "torch", None, "torch", dict(beta=0.3, **LD)),
    "cp2xtp2-ld-torch": (4, 2, [0, 5, T_PADDED], None, "torch", dict(beta=0.3, **LD)),
    "cp2-packed-ld-wpo-torch": (2, 1, [0, 10, 28], "cu_seq_lens", "torch", dict(beta=0.3, use_weighting=True, **LD)),
    "cp2-packed-ld-triton": (2, 1, [0, 13, 28], "cu_seq_lens", "triton", dict(beta=0.3, **LD)),
    "cp2-packed-torchlayout-posids-ld-triton": (2, 1, "torch", "position_ids", "triton", dict(beta=0.3, **LD)),
    # uneven slices; a slice (7..12) holding the end of one sequence and the start of the next, one inside a sequence
    "cp4-packed-posids-ld-torch": (4, 1, [0, 5, 13, 16, 28], "position_ids", "torch", dict(beta=0.5, **LD)),
    "cp4-packed-scattered-ld-torch": (4, 1, SCATTERED, "cu_seq_lens", "torch", dict(beta=0.5, **LD)),
    "cp2xtp2-packed-triton": (4, 2, [0, 14, 28], "cu_seq_lens", "triton", dict(beta=0.3, loss_type="robust",
                                                                           label_smoothing=0.1)),
    # a rank holding no position (last, first, middle): it joins every collective and gets an empty gradient
    "cp2-empty-rank-torch": (2, 1, [0, T_PADDED, T_PADDED], None, "torch", dict(beta=0.3)),
    "cp3-packed-empty-rank-ld-triton": (3, 1, [0, 0, 13, 28], "cu_seq_lens", "triton", dict(beta=0.3, **LD)),
    "cp3-packed-posids-empty-rank-ld-wpo-torch": (3, 1, [0, 10, 10, 28], "position_ids", "torch",
                                                  dict(beta=0.3, use_weighting=True, **LD)),
    "cp3-packed-scattered-empty-rank-ld-torch": (3, 1, SCATTERED_WITH_EMPTY, "cu_seq_lens", "torch",
                                                 dict(beta=0.5, **LD)),
    "cp2xtp2-empty-rank-ld-triton": (4, 2, [0, T_PADDED, T_PADDED], None, "triton", dict(beta=0.3, **LD)),
    # torchtitan's layout: a 2-D ("cp", "tp") mesh, torch's load-balanced CP on mesh["cp"], the logits a DTensor
    # vocab shard on mesh["tp"] (loss parallel), the head a Shard(0) DTensor
    "cp2xtp2-mesh-dtensor-torchlayout-packed-ld-torch": (4, 2, "torch", "position_ids", "torch",
                                                         dict(beta=0.3, **LD), "dtensor"),
    "cp2xtp2-mesh-dtensor-torchlayout-triton": (4, 2, "torch", None, "triton", dict(beta=0.3), "dtensor"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_matches_unsharded(case, tmp_path):
    world, tp, layout, packing, backend, loss_kw, *api = CASES[case]
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors through Triton need TRITON_INTERPRET=1 (set where no GPU is)")
    seed = int(torch.randint(2**31, ()))  # fresh inputs each run, replayable with FASTDPO_TEST_SEED
    spawn_group(world, tmp_path, _worker, seed, tp, layout, packing, backend, loss_kw, *api)


def test_shift_labels_equals_shift():
    """``shift=False`` on ``shift_labels(labels)`` is ``shift=True`` on ``labels``, padded and packed."""
    logits = torch.randn(1, sum(LENGTHS), V, dtype=torch.float64)
    labels = torch.randint(0, V, (1, sum(LENGTHS)))
    cu = torch.tensor([0, *LENGTHS]).cumsum(0)
    for packing in (None, cu):
        want = fastdpo.sequence_logps(logits, labels, cu_seq_lens=packing)
        got = fastdpo.sequence_logps(logits, fastdpo.shift_labels(labels, cu_seq_lens=packing), shift=False,
                                     cu_seq_lens=packing)  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    by_positions = fastdpo.shift_labels(labels, position_ids=position_ids)
    assert torch.equal(by_positions, fastdpo.shift_labels(labels, cu_seq_lens=cu))


def test_context_parallel_needs_aligned_labels():
    with pytest.raises(ValueError, match="context_parallel_group needs shift=False"):
        fastdpo.dpo_loss(torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.long), reference_free=True,
                         context_parallel_group=object())  # fmt: skip


def _layouts_worker(rank, world, seed, backend, result):
    """Every layout of 4 ranks scores the same batch: one device (each rank alone), TP 2, TP 4, CP 2, CP 2 x TP 2.
    Each rank records, per layout, the largest difference from the one-device result relative to its largest
    magnitude: sequence sums, loss, and its own slice of the logits gradient."""
    os.environ["FASTDPO_BACKEND"] = backend
    gen = torch.Generator().manual_seed(seed)
    N, T, W = 8, 40, 4 * 130
    logits = torch.randn(N, T, W, generator=gen) * 4
    labels = torch.randint(0, W, (N, T), generator=gen)
    labels[:, :5] = -100
    ref = torch.randn(2, N // 2, generator=gen) - 120
    pairs_of_ranks = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    crossed = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    layouts = {  # name: (CP group, CP rank, CP size, TP group, TP rank, TP size)
        "tp2": (None, 0, 1, pairs_of_ranks[rank // 2], rank % 2, 2),
        "tp4": (None, 0, 1, dist.group.WORLD, rank, 4),
        "cp2": (pairs_of_ranks[rank // 2], rank % 2, 2, None, 0, 1),
        "cp2xtp2": (crossed[rank % 2], rank // 2, 2, pairs_of_ranks[rank // 2], rank % 2, 2),
    }

    def run(x, labels, **kw):
        x = x.clone().requires_grad_()
        seq = fastdpo.sequence_logps(x.detach(), labels, **kw)
        out = fastdpo.dpo_loss(x, labels, *ref, beta=0.1, **kw)
        out.loss.backward()
        return seq, out.loss, x.grad

    seq1, loss1, grad1 = run(logits, labels)
    aligned = fastdpo.shift_labels(labels)
    diffs = []
    for cp_group, cp_rank, cp, tp_group, tp_rank, tp in layouts.values():
        t0, t1 = T * cp_rank // cp, T * (cp_rank + 1) // cp
        v0, v1 = W * tp_rank // tp, W * (tp_rank + 1) // tp
        kw = dict(vocab_parallel_group=tp_group)
        if cp_group is not None:
            kw.update(context_parallel_group=cp_group, shift=False)
            seq, loss, grad = run(logits[:, t0:t1, v0:v1], aligned[:, t0:t1], **kw)
        else:
            seq, loss, grad = run(logits[..., v0:v1], labels, **kw)
        want = grad1[:, t0:t1, v0:v1]  # aligned label t is what logits[:, t] scores: the same positions
        diffs.append([float((a - b).abs().max() / b.abs().max()) for a, b in ((seq, seq1), (loss, loss1),
                                                                              (grad, want))])  # fmt: skip
    worst = torch.tensor(diffs, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save(dict(zip(layouts, worst.tolist())), result)


def test_shard_layouts_agree_to_float32_rounding(cpu_backend, tmp_path):
    """TP 1/2/4 and CP 1/2 give the one-device results up to float32 rounding, not bitwise (the shards' log-sum-exps
    are merged, and partial sums added, in another order): sequence sums within 2 float32 ulps of the largest; the
    loss and its gradient within 64 ulps, because the loss reads differences of sums about 100x smaller than the
    sums (ulps of -250 become relative errors of the margin). Prints the measured gaps."""
    result = tmp_path / "gaps.pt"
    seed = int(torch.randint(2**31, ()))
    spawn_group(4, tmp_path, _layouts_worker, seed, cpu_backend, str(result))
    gaps = torch.load(result)
    print(f"\nlargest relative gap to one device ({cpu_backend}): sums, loss, grad:", gaps)
    ulp = torch.finfo(torch.float32).eps
    for layout, (sums, loss, grad) in gaps.items():
        assert sums <= 2 * ulp and loss <= 64 * ulp and grad <= 64 * ulp, (layout, sums, loss, grad)


def test_context_parallel_positions_errors():
    logits, labels = torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.long)
    # a rank may hold no position, but its hidden states still need rows and a hidden size
    for hidden, weight, rows in ((torch.randn(2, 4, 0), torch.randn(8, 0), labels),
                                 (torch.randn(0, 4, 6), torch.randn(8, 6), labels[:0])):  # fmt: skip
        with pytest.raises(ValueError, match="hidden must be a non-empty"):
            fastdpo.fused_linear_sequence_logps(hidden, weight, rows, shift=False, context_parallel_group=object())
    with pytest.raises(ValueError, match="context_parallel_positions needs context_parallel_group"):
        fastdpo.dpo_loss(logits, labels, reference_free=True, shift=False, context_parallel_positions=torch.arange(4))
    for bad in (torch.arange(5), torch.arange(4.0), torch.arange(8).view(2, 4)):
        with pytest.raises(ValueError, match=r"context_parallel_positions must be an integer tensor of shape \(4,\)"):
            fastdpo.dpo_loss(logits, labels, reference_free=True, shift=False, context_parallel_group=object(),
                             context_parallel_positions=bad)  # fmt: skip


def _overlap_worker(rank, world):
    os.environ["FASTDPO_BACKEND"] = "torch"
    logits, labels = torch.randn(1, 3, 8), torch.randint(0, 8, (1, 3))
    kw = dict(shift=False, cu_seq_lens=torch.tensor([0, 3, 6]), context_parallel_group=dist.group.WORLD)
    # every rank raises, whichever rank holds the bad position (no rank is left waiting in a collective)
    for bad, message in (([[0, 1, 2], [2, 3, 5]], r"held by no rank or by several: \[2, 4\]"),
                         ([[0, 1, 2], [3, 4, -1]], r"must lie in \[0, 6\).*from -1 to 4"),
                         ([[0, 1, 2], [3, 4, 60]], r"must lie in \[0, 6\).*from 0 to 60")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            fastdpo.sequence_logps(logits, labels, context_parallel_positions=torch.tensor(bad[rank]), **kw)


def test_context_parallel_positions_must_tile_the_row(tmp_path):
    spawn_group(2, tmp_path, _overlap_worker)
