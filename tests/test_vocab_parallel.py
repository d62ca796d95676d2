"""Vocab parallel on torch.distributed (gloo, 2 and 4 spawned processes): each rank holds a slice of the
vocabulary, of the logits or of the LM head's rows; log-probs, statistics, the DPO loss and metrics equal the
unsharded float64 reference on every rank, each rank's gradient of its shard is that slice of the unsharded
gradient, and (fused-linear path) every rank receives the full gradient of its replicated hidden states."""

import os

import pytest
import torch
import torch.distributed as dist

import fastdpo
from fastdpo import reference
from fastdpo._testing import spawn_group

B, T, V = 2, 7, 300
OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def _inputs():
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(2 * B, T, V, generator=gen) * 3
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :2] = -100
    labels[0, 3] = V - 1  # the first and last vocab ids are scored somewhere
    labels[1, 4] = 0
    # top-1 across shards: the global argmax (top-1), a later shard's local argmax (not top-1), and a tie with an
    # earlier shard (not top-1: the first argmax wins)
    labels[2, 2:] = logits[2, 1:-1].argmax(-1)
    labels[3, 2:] = logits[3, 1:-1, 200:].argmax(-1) + 200
    tie = logits[1, 5].argmax()
    logits[1, 5, 10], labels[1, 6] = logits[1, 5, tie] + 5, tie  # label sits past an equal, earlier maximum
    logits[1, 5, tie] = logits[1, 5, 10]
    ref_logits = torch.randn(2 * B, T, V, generator=gen) * 3
    ref = torch.randn(2, B, generator=gen) - 30
    return logits, labels, ref_logits, ref


def _close(got, want, name, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _outputs_close(tok, want, prefix=""):
    """Every field of ``OUTPUTS`` against the float64 reference: top-1 exactly, the rest to float32 rounding."""
    for name in OUTPUTS:
        got, exp = getattr(tok, name), getattr(want, name)
        if name == "is_top1":
            assert torch.equal(got, exp), (prefix + name, (got != exp).nonzero().tolist())
        else:
            _close(got, exp.detach(), prefix + name)


def _worker(rank, world, bounds, backend, use_dtensor):
    os.environ["FASTDPO_BACKEND"] = backend
    logits, labels, ref_logits, ref = _inputs()
    lo, hi = bounds[rank], bounds[rank + 1]
    sizes = {b - a for a, b in zip(bounds, bounds[1:])}
    # equal shards use the default offsets (rank * V_s); uneven ones pass theirs
    kw = {} if use_dtensor else dict(vocab_parallel_group=dist.group.WORLD,
                                     vocab_start_index=None if len(sizes) == 1 else lo)  # fmt: skip

    mesh = None
    if use_dtensor:  # one mesh per process: each init_device_mesh would create more process groups
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))

    def shard(x):
        x = x[..., lo:hi].clone().requires_grad_()
        if not use_dtensor:
            return x, x
        from torch.distributed.tensor import DTensor, Shard

        d = DTensor.from_local(x, mesh, [Shard(2)], run_check=False, shape=(*x.shape[:2], V),
                               stride=(T * V, V, 1))  # fmt: skip
        return x, d

    # per-token outputs and their gradients (log-probs and entropy)
    x, xin = shard(logits)
    tok = fastdpo.token_logps(xin, labels, outputs=OUTPUTS, **kw)
    full = logits.double().requires_grad_()
    want = reference.token_logps(full, labels, outputs=OUTPUTS)
    _outputs_close(tok, want)
    g1, g2 = torch.randn(2, 2 * B, T - 1, generator=torch.Generator().manual_seed(7))
    (tok.log_probs * g1 + tok.entropy * g2).sum().backward()
    ((want.log_probs * g1 + want.entropy * g2).sum()).backward()
    _close(x.grad, full.grad[..., lo:hi], "token grad")

    # the DPO loss with metrics, WPO weights and reference logits in the same call
    x, xin = shard(logits)
    r, rin = shard(ref_logits)
    out = fastdpo.dpo_loss(xin, labels, ref_logits=rin.detach(), beta=0.2, use_weighting=True,
                           return_metrics=True, **kw)  # fmt: skip
    full = logits.double().requires_grad_()
    truth = reference.dpo_loss(full, labels, ref_logits=ref_logits.double(), beta=0.2, use_weighting=True,
                               return_metrics=True)  # fmt: skip
    _close(out.loss, truth.loss, "loss")
    for name, value in truth.metrics.items():
        _close(out.metrics[name], value, name)
    out.loss.backward()
    truth.loss.backward()
    _close(x.grad, full.grad[..., lo:hi], "loss grad", atol=1e-6)

    # sequence sums with precomputed references
    seq = fastdpo.sequence_logps(shard(logits)[1], labels, **kw)
    _close(seq, reference.sequence_logps(logits.double(), labels), "sequence_logps")


@pytest.mark.parametrize(
    "world,bounds,use_dtensor",
    [
        (2, [0, 150, V], False),  # equal shards, default offsets
        (2, [0, 41, V], False),  # uneven, explicit vocab_start_index
        (4, [0, 75, 150, 225, V], False),
        (2, [0, 150, V], True),  # DTensor Shard(2)
    ],
    ids=["tp2", "tp2-uneven", "tp4", "dtensor2"],
)
def test_vocab_parallel_matches_unsharded(world, bounds, use_dtensor, cpu_backend, tmp_path):
    spawn_group(world, tmp_path, _worker, bounds, cpu_backend, use_dtensor)


D = 24
HEAD = dict(temperature=0.9, logit_scale=1.5, final_logit_softcapping=12.0)


def _head_inputs():
    gen = torch.Generator().manual_seed(4321)
    hidden = torch.randn(2 * B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 2 / D**0.5
    bias = torch.randn(V, generator=gen) * 0.5
    ref_hidden = hidden + 0.3 * torch.randn(2 * B, T, D, generator=gen)
    labels = torch.randint(0, V, (2 * B, T), generator=gen)
    labels[:, :2] = -100
    labels[0, 3], labels[1, 4] = V - 1, 0  # the first and last vocab ids are scored somewhere
    return hidden, weight, bias, ref_hidden, labels


def _fused_worker(rank, world, bounds, backend, use_dtensor):
    os.environ["FASTDPO_BACKEND"] = backend
    hidden, weight, bias, ref_hidden, labels = _head_inputs()
    lo, hi = bounds[rank], bounds[rank + 1]
    equal = len({b - a for a, b in zip(bounds, bounds[1:])}) == 1
    h = hidden.clone().requires_grad_()
    w, b = weight[lo:hi].clone().requires_grad_(), bias[lo:hi].clone().requires_grad_()
    w_in, b_in = w, b
    kw = dict(vocab_parallel_group=dist.group.WORLD, vocab_start_index=None if equal else lo)
    if use_dtensor:  # lm_head.weight as ColwiseParallel leaves it: Shard(0) on a 1-D mesh
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh("cpu", (world,))
        w_in = DTensor.from_local(w, mesh, [Shard(0)], run_check=False, shape=(V, D), stride=(D, 1))
        b_in = DTensor.from_local(b, mesh, [Shard(0)], run_check=False, shape=(V,), stride=(1,))
        kw = dict(vocab_parallel_group=mesh)
    full = [x.double().requires_grad_() for x in (hidden, weight, bias)]

    # the DPO loss with metrics and the reference's hidden states through the same (sharded) head, over several
    # tiles per call (WPO's log sum p^2 is checked per token below: its weights would make the loss vanish here)
    out = fastdpo.fused_linear_dpo_loss(h, w_in, labels, bias=b_in, ref_hidden=ref_hidden, beta=0.2,
                                        return_metrics=True, tile_elements=16 * V, **HEAD, **kw)  # fmt: skip
    truth = reference.fused_linear_dpo_loss(*full[:2], labels, bias=full[2], ref_hidden=ref_hidden.double(),
                                            beta=0.2, return_metrics=True, **HEAD)  # fmt: skip
    _close(out.loss, truth.loss, "fused loss")
    for name, value in truth.metrics.items():
        _close(out.metrics[name], value, f"fused {name}")
    out.loss.backward()
    truth.loss.backward()
    assert float(full[0].grad.abs().max()) > 1e-3
    _close(h.grad, full[0].grad, "fused d hidden (full on every rank)", atol=1e-6)
    _close(w.grad, full[1].grad[lo:hi], "fused d weight (this rank's rows)", atol=1e-6)
    _close(b.grad, full[2].grad[lo:hi], "fused d bias (this rank's rows)", atol=1e-6)

    # per-token outputs, entropy gradient included
    h2 = hidden.reshape(-1, D).clone().requires_grad_()
    targets = labels.reshape(-1)
    tok = fastdpo.fused_linear_token_logps(h2, w_in.detach(), targets, bias=b_in.detach(), outputs=OUTPUTS,
                                           **HEAD, **kw)  # fmt: skip
    hf = hidden.reshape(-1, D).double().requires_grad_()
    want = reference.fused_linear_token_logps(hf, weight.double(), targets, bias=bias.double(), outputs=OUTPUTS,
                                              **HEAD)  # fmt: skip
    _outputs_close(tok, want, "fused ")
    (tok.log_probs.sum() + tok.entropy.sum()).backward()
    (want.log_probs.sum() + want.entropy.sum()).backward()
    _close(h2.grad, hf.grad, "fused token d hidden")

    seq = fastdpo.fused_linear_sequence_logps(hidden, w_in.detach(), labels, bias=b_in.detach(), **HEAD, **kw)
    _close(seq, reference.fused_linear_sequence_logps(hidden.double(), weight.double(), labels,
                                                      bias=bias.double(), **HEAD), "fused sequence_logps")  # fmt: skip


@pytest.mark.parametrize(
    "world,bounds,use_dtensor",
    [(2, [0, 150, V], False), (4, [0, 41, 150, 151, V], False), (2, [0, 150, V], True)],
    ids=["tp2", "tp4-uneven", "dtensor2"],
)
def test_fused_linear_vocab_parallel_matches_unsharded(world, bounds, use_dtensor, cpu_backend, tmp_path):
    spawn_group(world, tmp_path, _fused_worker, bounds, cpu_backend, use_dtensor)


def _layout_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from fastdpo.ops import vocab_parallel as vp

    os.environ["FASTDPO_BACKEND"] = "torch"
    gen = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(2, 5, 10, generator=gen), torch.randint(0, 10, (2, 5), generator=gen)
    labels[0, 1:] = 9  # scored by the last shard
    want = reference.sequence_logps(logits.double(), labels)
    with pytest.raises(ValueError, match=r"vocab shards must tile \[0, V\).*\(0, 5\), \(3, 8\)"):
        fastdpo.sequence_logps(logits[..., [0, 3][rank] : [5, 8][rank]], labels.clamp(max=7),
                               vocab_parallel_group=dist.group.WORLD, vocab_start_index=[0, 3][rank])  # fmt: skip
    gathers = []
    all_gather = vp.dist.all_gather
    vp.dist.all_gather = lambda *a, **k: gathers.append(1) or all_gather(*a, **k)
    # the vocabulary grows on one rank only (rank 0 keeps [0, 4), rank 1 goes from [4, 8) to [4, 10)): every
    # rank checks the layout on every call, so rank 0 neither skips the collective nor keeps the old V
    sub = labels.clamp(max=7)
    got = fastdpo.sequence_logps(logits[..., :8][..., [0, 4][rank] : [4, 8][rank]], sub,
                                 vocab_parallel_group=dist.group.WORLD)  # fmt: skip
    _close(got, reference.sequence_logps(logits[..., :8].double(), sub), "V = 8")
    got = fastdpo.sequence_logps(logits[..., [0, 4][rank] : [4, 10][rank]], labels,
                                 vocab_parallel_group=dist.group.WORLD, vocab_start_index=[0, 4][rank])  # fmt: skip
    _close(got, want, "V = 10, uneven")
    assert len(gathers) == 2
    # a DTensor carries its layout: no collective to check it
    local = logits[..., 5 * rank : 5 * (rank + 1)]
    mesh = init_device_mesh("cpu", (world,))
    d = DTensor.from_local(local, mesh, [Shard(2)], run_check=False, shape=(2, 5, 10), stride=(50, 10, 1))
    _close(fastdpo.sequence_logps(d, labels), want, "DTensor")
    assert len(gathers) == 2, "a DTensor's layout needs no all-gather"


def test_shard_layout_checked_every_call_and_free_for_dtensors(tmp_path):
    spawn_group(2, tmp_path, _layout_worker)


@pytest.mark.gpu
def test_nccl_group_of_one_equals_plain_path():
    """On CUDA with NCCL: the vocab- and context-parallel paths over a group of one rank give the plain path's loss
    and gradient up to float32 rounding (the merge recomputes log l from e^(log l)): the loss within 1e-6, the bf16
    gradient within one bf16 ulp of its largest entry."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        group = dist.new_group([0])
        logits = (torch.randn(4, 64, 32000, device="cuda") * 3).to(torch.bfloat16)
        labels = torch.randint(0, 32000, (4, 64), device="cuda")
        labels[:, :10] = -100
        ref = torch.randn(2, 2, device="cuda") - 600
        results = []
        for kw in ({}, dict(vocab_parallel_group=group),
                   dict(vocab_parallel_group=group, context_parallel_group=group, shift=False)):  # fmt: skip
            x = logits.clone().requires_grad_()
            y = fastdpo.shift_labels(labels) if "context_parallel_group" in kw else labels
            out = fastdpo.dpo_loss(x, y, *ref, beta=0.1, return_metrics=True, **kw)
            out.loss.backward()
            results.append((out, x.grad))
        (plain, plain_grad), *others = results
        for out, grad in others:
            torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=0)
            for name, value in plain.metrics.items():
                torch.testing.assert_close(out.metrics[name], value, rtol=1e-6, atol=1e-6, msg=name)
            ulp = torch.finfo(torch.bfloat16).eps * float(plain_grad.abs().max())
            torch.testing.assert_close(grad.float(), plain_grad.float(), rtol=0, atol=ulp)
    finally:
        dist.destroy_process_group()


def _edge_values_worker(rank, world, backend):
    """3 uneven shards: a non-negative ignore_index (the pad id as label pad) on both paths, a shard whose logits
    are all -inf at scored tokens (masked vocab padding), and a double backward."""
    os.environ["FASTDPO_BACKEND"] = backend
    bounds = [0, 13, 30, 48]
    lo, hi = bounds[rank], bounds[rank + 1]
    kw = dict(vocab_parallel_group=dist.group.WORLD, vocab_start_index=lo)
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(4, 6, 48, generator=gen) * 3
    labels = torch.randint(0, 48, (4, 6), generator=gen)
    # ignore_index 3: ids 13 + 3 and 30 + 3 are local id 3 on ranks 1 and 2, and must still be scored there
    ignore = 3
    labels[:, :2] = ignore
    labels[0, 2:5] = torch.tensor([16, 33, 47])
    x = logits[..., lo:hi].clone().requires_grad_()
    tok = fastdpo.token_logps(x, labels, ignore_index=ignore, outputs=OUTPUTS, **kw)
    full = logits.double().requires_grad_()
    want = reference.token_logps(full, labels, ignore_index=ignore, outputs=OUTPUTS)
    _outputs_close(tok, want, f"ignore_index={ignore} ")
    (tok.log_probs.sum() + tok.entropy.sum()).backward()
    (want.log_probs.sum() + want.entropy.sum()).backward()
    _close(x.grad, full.grad[..., lo:hi], f"ignore_index={ignore} grad")
    hidden, weight = torch.randn(24, 8, generator=gen), torch.randn(48, 8, generator=gen)
    targets = labels.reshape(-1)
    got = fastdpo.fused_linear_token_logps(hidden, weight[lo:hi], targets, ignore_index=ignore, **kw).log_probs
    exp = reference.fused_linear_token_logps(hidden.double(), weight.double(), targets, ignore_index=ignore).log_probs
    _close(got, exp, f"fused ignore_index={ignore}")

    # the last shard is -inf at every scored token: it adds nothing (log sum p^2 was nan, and so was WPO's loss)
    logits[..., 30:] = -torch.inf
    labels = torch.randint(0, 30, (4, 6), generator=gen)
    labels[:, :2] = -100
    tok = fastdpo.token_logps(logits[..., lo:hi], labels, outputs=OUTPUTS, **kw)
    want = reference.token_logps(logits.double(), labels, outputs=OUTPUTS)
    for name in ("log_probs", "entropy", "log_sum_sq_probs"):
        _close(getattr(tok, name), getattr(want, name), f"-inf shard {name}")
    ref = torch.full((2,), -20.0)
    out = fastdpo.dpo_loss(logits[..., lo:hi], labels, ref, ref, use_weighting=True, **kw)
    truth = reference.dpo_loss(logits.double(), labels, ref.double(), ref.double(), use_weighting=True)
    _close(out.loss, truth.loss, "-inf shard WPO loss")

    # a gradient penalty (create_graph=True) is refused as on one device, not silently differentiated as a constant
    x = logits[..., lo:hi].nan_to_num(neginf=-50.0).requires_grad_()
    lp = fastdpo.sequence_logps(x, labels, **kw).sum()
    (g,) = torch.autograd.grad(lp, x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        (lp + g.square().sum()).backward()


def test_vocab_parallel_nonnegative_ignore_index_and_masked_shard(cpu_backend, tmp_path):
    spawn_group(3, tmp_path, _edge_values_worker, cpu_backend)


def _argument_errors_worker(rank, world):
    """Each misuse raises the same clear error on every rank (before: a gloo abort, a hang, or a silently wrong
    loss); a 1-D DeviceMesh is accepted wherever a group is."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ["FASTDPO_BACKEND"] = "torch"
    gen = torch.Generator().manual_seed(8)
    logits, labels = torch.randn(4, 5, 30, generator=gen), torch.randint(0, 30, (4, 5), generator=gen)
    lo, hi = 10 * rank, 10 * (rank + 1)
    group = dist.group.WORLD
    with pytest.raises(ValueError, match=r"same rows and positions.*\[\(4, 5\), \(4, 5\), \(3, 5\)\]"):
        n = 3 if rank == 2 else 4  # rank 2 has one row fewer: the merge's all-reduces would not match
        fastdpo.sequence_logps(logits[:n, :, lo:hi], labels[:n], vocab_parallel_group=group)
    with pytest.raises(ValueError, match=r"same rows and positions.*\(4, 4\)"):
        t = 4 if rank == 0 else 5
        fastdpo.fused_linear_sequence_logps(torch.randn(4, t, 6), torch.randn(10, 6), labels[:, :t],
                                            vocab_parallel_group=group)  # fmt: skip
    with pytest.raises(ValueError, match="must pass the same labels"):
        wrong = labels.clone()
        wrong[1, 3] = (wrong[1, 3] + rank) % 30  # a data loader seeded by global rank: one label differs per rank
        fastdpo.dpo_loss(logits[..., lo:hi], wrong, reference_free=True, vocab_parallel_group=group)
    with pytest.raises(ValueError, match="must pass the same labels"):
        wrong = labels.reshape(-1).clone()
        wrong[7] = 29 - rank
        fastdpo.fused_linear_token_logps(torch.randn(20, 6), torch.randn(10, 6), wrong, vocab_parallel_group=group)
    with pytest.raises(ValueError, match=r"non-empty vocab shard.*\[10, 20, 0\]"):
        start, end = [(0, 10), (10, 30), (30, 30)][rank]
        fastdpo.sequence_logps(logits[..., start:end], labels, vocab_parallel_group=group, vocab_start_index=start)
    with pytest.raises(ValueError, match="passed the same vocab values"):  # the whole logits on every rank
        fastdpo.dpo_loss(logits, labels, reference_free=True, vocab_parallel_group=group)
    with pytest.raises(ValueError, match="passed the same vocab values"):  # the whole head on every rank
        fastdpo.fused_linear_sequence_logps(torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1)),
                                            torch.randn(30, 6, generator=torch.Generator().manual_seed(2)), labels,
                                            vocab_parallel_group=group)  # fmt: skip
    # equal shards of a zero-initialised head are legitimate (and not judged): log-probs of -log(30)
    zeros = torch.zeros(4, 5, 30)
    _close(fastdpo.sequence_logps(zeros[..., lo:hi], labels, vocab_parallel_group=group),
           reference.sequence_logps(zeros.double(), labels), "equal constant shards")  # fmt: skip
    # NaN logits on every rank give NaN log-probs (a NaN guard's job), not the same-values error
    nan = torch.full((4, 5, 30), float("nan"))
    assert fastdpo.sequence_logps(nan[..., lo:hi], labels, vocab_parallel_group=group).isnan().all()
    with pytest.raises(TypeError, match="logits and labels must be tensors"):
        fastdpo.sequence_logps(logits[..., lo:hi].numpy(), labels, vocab_parallel_group=group)
    with pytest.raises(TypeError, match="vocab_start_index must be an int"):
        fastdpo.sequence_logps(logits[..., lo:hi], labels, vocab_parallel_group=group, vocab_start_index=float(lo))

    want = reference.sequence_logps(logits.double(), labels)
    mesh = init_device_mesh("cpu", (world,))
    _close(fastdpo.sequence_logps(logits[..., lo:hi], labels, vocab_parallel_group=mesh), want, "1-D mesh")
    aligned = fastdpo.shift_labels(labels)
    t0, t1 = [0, 2, 3, 5][rank], [0, 2, 3, 5][rank + 1]
    _close(fastdpo.sequence_logps(logits[:, t0:t1], aligned[:, t0:t1], shift=False, context_parallel_group=mesh),
           want, "1-D mesh, context parallel")  # fmt: skip
    mesh2 = init_device_mesh("cpu", (1, world))
    with pytest.raises(ValueError, match="vocab_parallel_group must be a process group or a 1-D DeviceMesh"):
        fastdpo.sequence_logps(logits[..., lo:hi], labels, vocab_parallel_group=mesh2)
    with pytest.raises(ValueError, match="vocab_parallel_group must be a process group or a 1-D DeviceMesh"):
        fastdpo.fused_linear_sequence_logps(torch.randn(4, 5, 6), torch.randn(10, 6), labels,
                                            vocab_parallel_group=mesh2)  # fmt: skip
    with pytest.raises(ValueError, match="context_parallel_group must be a process group or a 1-D DeviceMesh"):
        fastdpo.sequence_logps(logits[:, t0:t1], aligned[:, t0:t1], shift=False, context_parallel_group=mesh2)

    # reference logits sharded over the same ranks in another order: rank r holds another slice of the vocabulary
    reversed_mesh = DeviceMesh("cpu", list(range(world))[::-1])
    c = reversed_mesh.get_coordinate()[0]
    d = DTensor.from_local(logits[..., lo:hi], mesh, [Shard(2)], run_check=False, shape=logits.shape,
                           stride=logits.stride())  # fmt: skip
    r = DTensor.from_local(logits[..., 10 * c : 10 * (c + 1)], reversed_mesh, [Shard(2)], run_check=False,
                           shape=logits.shape, stride=logits.stride())  # fmt: skip
    with pytest.raises(ValueError, match="ref_logits must be sharded as the logits"):
        fastdpo.dpo_loss(d, labels, ref_logits=r)
    same = DTensor.from_local(logits[..., lo:hi], init_device_mesh("cpu", (world,)), [Shard(2)], run_check=False,
                              shape=logits.shape, stride=logits.stride())  # fmt: skip
    out = fastdpo.dpo_loss(d, labels, ref_logits=same)  # an equal mesh built twice is the same layout
    _close(out.loss, reference.dpo_loss(logits.double(), labels, ref_logits=logits.double()).loss, "DTensor ref")


def test_vocab_parallel_argument_errors_on_every_rank(tmp_path):
    spawn_group(3, tmp_path, _argument_errors_worker)
