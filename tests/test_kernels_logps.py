"""Launcher-level tests of the log-prob op: the Triton kernels (interpreted on CPU) and the chunked PyTorch
path share one contract, so every case runs on both against the float64 reference."""

from dataclasses import dataclass

import pytest
import torch

from fastdpo import chunked, reference
from fastdpo._logps_outputs import STATS
from fastdpo._testing import assert_close_to_reference, downcast_slack, make_labels, make_logits
from fastdpo.kernels import logps as triton_logps

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class Case:
    id: str
    N: int
    T: int
    V: int
    shift: bool = True
    block_v: int | None = None  # forced Triton block size, to get several blocks and a partial tail
    chunk_v: int | None = None  # forced Triton chunk (a multiple of block_v): several chunks per row
    split: bool | None = None  # forced: one Triton program per chunk of a row (CUDA picks this for few rows)
    temperature: float = 1.0
    special: str = ""


CASES = [
    Case("tiny-vocab-V7", 3, 5, 7),
    Case("partial-tail-V1000-block256", 2, 6, 1000, block_v=256),
    Case("default-block-tail-of-1-V4097", 2, 3, 4097),
    Case("T1-no-shift", 4, 1, 300, shift=False),
    Case("T2-shift", 4, 2, 300),
    Case("temperature-0.7", 2, 5, 500, block_v=128, temperature=0.7),
    Case("label-in-last-block", 2, 5, 1000, block_v=256, special="last_block_labels"),
    Case("+-20-shift-across-blocks", 2, 5, 1000, block_v=256, special="block_shift"),
    Case("all-ignored-row", 3, 6, 300, special="ignored_row"),
    Case("logits-near-+100-overflow-exp", 3, 6, 300, special="large"),
    Case("non-contiguous-view", 2, 5, 700, block_v=256, special="view"),
    Case("split-rows-V1000-chunk256", 2, 6, 1000, block_v=128, chunk_v=256, split=True),
    Case("split-rows-+-20-shift-across-chunks", 2, 5, 1000, block_v=128, chunk_v=256, split=True,
         special="block_shift"),
    Case("split-rows-label-in-last-chunk", 2, 5, 1000, block_v=128, chunk_v=384, split=True,
         special="last_block_labels"),
    Case("finfo-min-masked-vocab", 2, 5, 1000, block_v=128, chunk_v=256, split=True, special="finfo_min_mask"),
    # -inf masked vocabulary filling the row's first blocks and first chunk: every running max starts at -inf
    Case("-inf-masked-leading-chunk", 2, 5, 1000, block_v=128, chunk_v=256, special="inf_mask"),
]
TRITON_KNOBS = ("block_v", "chunk_v", "split")


def _launch_kw(impl, case: Case) -> dict:
    """The launcher keywords of a case; the Triton knobs for the Triton launchers only."""
    kw = dict(shift=case.shift, ignore_index=IGNORE, temperature=case.temperature)
    return kw | {k: getattr(case, k) for k in TRITON_KNOBS} if impl is triton_logps else kw


def _inputs(case: Case, dtype, device):
    N, T, V = case.N, case.T, case.V
    if case.special == "view":
        # A slice along T of a bigger buffer whose vocab is also narrowed: strides (T'*V', V', 1) with V' > V.
        big = make_logits(N, T + 2, V + 37, dtype, device)
        logits = big[:, 1 : T + 1].narrow(-1, 5, V)
        assert not logits.is_contiguous()
    else:
        logits = make_logits(N, T, V, dtype, device)
    if case.special == "block_shift":
        offsets = torch.where(torch.arange(V, device=device) < 256, 20.0, -20.0)
        logits = (logits.float() + offsets).to(dtype)
    if case.special == "finfo_min_mask":  # masked vocabulary as some models write it: the dtype's lowest finite value
        logits[..., :300] = torch.finfo(dtype).min
    if case.special == "inf_mask":
        logits[..., :300] = -torch.inf
    if case.special == "large":
        logits = (logits.float() + 100.0).to(dtype)  # exp(z - 0) overflows float32 on unscored rows
    labels = make_labels(N, T, V, device)
    if case.special == "last_block_labels":
        labels = torch.where(labels == IGNORE, labels, V - 1 - labels % 7)
    if case.special == "ignored_row":
        labels[1] = IGNORE
    if case.special in ("finfo_min_mask", "inf_mask"):
        labels = torch.where(labels == IGNORE, labels, 300 + labels % (V - 300))
    if case.special == "view":  # labels strided along T too (column-major storage)
        labels = labels.t().contiguous().t()
        assert labels.stride(1) != 1
    return logits, labels


def _run(impl, case, logits, labels, grad_logp):
    kw = _launch_kw(impl, case)
    out = impl.logps_fwd(logits, labels, **kw)
    grad = impl.logps_bwd(logits, labels, out.lse, grad_logp, **kw)
    return out.logp, out.lse, grad


def _reference(logits, labels, grad_logp, case, compute_dtype, grad_dtype):
    x = logits.detach().to(compute_dtype).requires_grad_()
    logp = reference.token_logps(
        x, labels, ignore_index=IGNORE, shift=case.shift, temperature=case.temperature
    ).log_probs
    (grad,) = torch.autograd.grad(logp, x, grad_logp.to(compute_dtype))
    return logp.detach(), grad.to(grad_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("impl", [triton_logps, chunked], ids=["triton", "torch"])
def test_logps_matches_float64_reference(impl, case, dtype, device):
    logits, labels = _inputs(case, dtype, device)
    T_rows = case.T - int(case.shift)
    grad_logp = torch.randn(case.N, T_rows, device=device)

    logp, lse, grad = _run(impl, case, logits, labels, grad_logp)
    truth_logp, truth_grad = _reference(logits, labels, grad_logp, case, torch.float64, torch.float64)
    base_logp, base_grad = _reference(logits, labels, grad_logp, case, torch.float32, dtype)

    assert logp.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    assert_close_to_reference(logp, truth_logp, base_logp, dtype, "logp")
    slack = downcast_slack(dtype, triton_path=impl is triton_logps)
    assert_close_to_reference(grad, truth_grad, base_grad, dtype, "grad", slack=slack)

    scored = (labels[:, int(case.shift):] != IGNORE)
    z = logits[:, :T_rows].double() / case.temperature
    truth_lse = torch.where(scored, torch.logsumexp(z, -1), 0.0)
    assert_close_to_reference(lse.sum(0), truth_lse, truth_lse.float(), dtype, "lse")
    # Unscored rows (ignored labels, and the last position when shifted) are exactly zero.
    unscored = torch.ones(case.N, case.T, dtype=torch.bool, device=device)
    unscored[:, :T_rows] = ~scored
    assert torch.all(grad[unscored] == 0)
    assert torch.all(logp[~scored] == 0)


@pytest.mark.parametrize("impl", [triton_logps, chunked], ids=["triton", "torch"])
def test_inplace_backward_overwrites_the_logits_view(impl, device):
    case = Case("inplace", 2, 5, 700, block_v=256)
    big = make_logits(2, 7, 701, torch.bfloat16, device)
    logits = big[:, 1:6, :700]
    labels = make_labels(2, 5, 700, device)
    grad_logp = torch.randn(2, 4, device=device)
    _, expected_lse, expected = _run(impl, case, logits.clone(), labels, grad_logp)
    untouched = big.clone()

    kw = dict(shift=True, ignore_index=IGNORE, temperature=1.0)
    grad = impl.logps_bwd(logits, labels, expected_lse, grad_logp, inplace=True, **kw)

    assert grad.data_ptr() == logits.data_ptr() and grad.stride() == logits.stride()
    assert torch.equal(grad, expected)
    # Everything outside the view is left alone.
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, 1:6, :700] = False
    assert torch.equal(big[outside], untouched[outside])


def test_out_of_vocab_label_gives_nan_not_a_read(device):
    logits = make_logits(1, 3, 50, torch.float32, device)
    labels = torch.tensor([[0, 50, 3]], device=device)
    for impl in (triton_logps, chunked):
        logp = impl.logps_fwd(logits, labels, shift=True, ignore_index=IGNORE, temperature=1.0).logp
        assert torch.isnan(logp[0, 0]) and torch.isfinite(logp[0, 1])


def test_launcher_rejects_bad_layout(device):
    logits = make_logits(2, 4, 8, torch.float32, device).transpose(1, 2)
    with pytest.raises(ValueError, match="unit-stride"):
        triton_logps.logps_fwd(logits, torch.zeros(2, 8, dtype=torch.long), shift=True, ignore_index=IGNORE,
                               temperature=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_rows_give_the_same_bits(dtype, device):
    """A row's chunks run in one program, or one program each and a fold launch (what CUDA picks for few rows):
    both fold the same chunk statistics in the same order, so every output is the same bits, which batch
    invariance rests on. The backward's split gives each program its own columns, in place too. Software
    pipelining (``num_stages``) reorders loads, never arithmetic (on CUDA; the interpreter ignores it)."""
    N, T, V = 3, 5, 1000
    logits, ref_logits = make_logits(N, T, V, dtype, device), make_logits(N, T, V, dtype, device)
    logits[0, :, 256:512] = float("-inf")  # a whole chunk of -inf (masked vocabulary) on one row
    labels = make_labels(N, T, V, device)
    labels[0] = torch.where(labels[0] == IGNORE, IGNORE, labels[0] % 256)  # keep row 0's labels finite
    kw = dict(shift=True, ignore_index=IGNORE, temperature=0.9, block_v=128, chunk_v=256)
    whole = triton_logps.logps_fwd(logits, labels, ref_logits=ref_logits, stats=STATS, split=False, **kw)
    split = triton_logps.logps_fwd(logits, labels, ref_logits=ref_logits, stats=STATS, split=True, **kw)
    unpipelined = triton_logps.logps_fwd(logits, labels, ref_logits=ref_logits, stats=STATS, split=False,
                                         num_stages=1, **kw)  # fmt: skip
    for name, a, b, c in zip(whole._fields, whole, split, unpipelined):
        assert torch.equal(a, b) and torch.equal(a, c), name
    # (the mean logit of row 0 is -inf, as it should be)
    assert torch.isfinite(whole.logp).all() and torch.isfinite(whole.stats[STATS.index("entropy")]).all()

    g = torch.randn_like(whole.logp)
    entropy = whole.stats[STATS.index("entropy")].contiguous()
    bwd = dict(kw, entropy=entropy, grad_entropy=torch.randn_like(g))
    expected = triton_logps.logps_bwd(logits, labels, whole.lse, g, split=False, **bwd)
    assert torch.equal(triton_logps.logps_bwd(logits, labels, whole.lse, g, split=True, **bwd), expected)
    assert torch.equal(triton_logps.logps_bwd(logits, labels, whole.lse, g, num_stages=1, **bwd), expected)
    in_place = triton_logps.logps_bwd(logits.clone(), labels, whole.lse, g, split=True, inplace=True, **bwd)
    assert torch.equal(in_place, expected)


def test_rows_are_split_below_four_per_sm(monkeypatch):
    """The row split follows the number of programs against the GPU's SMs (never the CPU's interpreter), and an
    explicit ``split`` wins."""
    from fastdpo.kernels import heuristics

    monkeypatch.setattr(heuristics, "_multiprocessor_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert heuristics.split_rows(4 * 132 - 1, cuda) and not heuristics.split_rows(4 * 132, cuda)
    assert not heuristics.split_rows(1, torch.device("cpu"))
    assert heuristics.split_rows(10**6, cuda, split=True) and not heuristics.split_rows(1, cuda, split=False)


def test_chunk_must_be_a_multiple_of_the_block(device):
    logits, labels = make_logits(1, 2, 300, torch.float32, device), make_labels(1, 2, 300, device)
    with pytest.raises(ValueError, match="chunk_v must be a positive multiple of block_v = 128, got 200"):
        triton_logps.logps_fwd(logits, labels, shift=True, ignore_index=IGNORE, temperature=1.0, block_v=128,
                               chunk_v=200)


STAT_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 5, 6, 7, 9, 10, 12, 13, 14, 15)], ids=lambda c: c.id)
@pytest.mark.parametrize("impl", [triton_logps, chunked], ids=["triton", "torch"])
def test_statistics_and_reference_logits_in_one_sweep(impl, case, dtype, device):
    logits, labels = _inputs(case, dtype, device)
    ref_logits = make_logits(case.N, case.T, case.V, dtype, device)
    kw = _launch_kw(impl, case)
    out = impl.logps_fwd(logits, labels, ref_logits=ref_logits, stats=STATS, **kw)

    for which, (x, logp, stats) in enumerate([(logits, out.logp, out.stats), (ref_logits, out.ref_logp, out.ref_stats)]):
        truth = reference.token_logps(x.double(), labels, ignore_index=IGNORE, shift=case.shift,
                                      temperature=case.temperature, outputs=("log_probs",) + STAT_OUTPUTS)
        base = reference.token_logps(x.float(), labels, ignore_index=IGNORE, shift=case.shift,
                                     temperature=case.temperature, outputs=("log_probs",) + STAT_OUTPUTS)
        assert_close_to_reference(logp, truth.log_probs, base.log_probs, dtype, f"logp[{which}]")
        for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
            got = stats[STATS.index(name)]
            assert_close_to_reference(got, getattr(truth, name), getattr(base, name), dtype, f"{name}[{which}]",
                                      scale=1.0)
        top1 = stats[STATS.index("is_top1")]
        assert torch.equal(top1 > 0.5, truth.is_top1), f"is_top1[{which}]"


@pytest.mark.parametrize("impl", [triton_logps, chunked], ids=["triton", "torch"])
def test_top1_ties_count_only_the_first_argmax(impl, device):
    logits = torch.zeros(1, 5, 1000, device=device)
    logits[0, :3, 2] = logits[0, :3, 5] = 4.0  # two maxima in one block: argmax is 2
    logits[0, 3:, 50] = logits[0, 3:, 700] = 4.0  # two maxima in different chunks (of 256): argmax is 50
    labels = torch.tensor([[2, 5, 3, 700, 50]], device=device)
    kw = dict(shift=False, ignore_index=IGNORE, temperature=1.0, stats=("is_top1",))
    for knobs in ([dict(block_v=128, chunk_v=256, split=s) for s in (False, True)] if impl is triton_logps else [{}]):
        out = impl.logps_fwd(logits, labels, **kw, **knobs)
        assert out.stats[STATS.index("is_top1")].tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0]], knobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", [triton_logps, chunked], ids=["triton", "torch"])
def test_entropy_gradient(impl, dtype, device):
    case = CASES[5]  # temperature 0.7, several blocks
    logits, labels = _inputs(case, dtype, device)
    kw = dict(shift=case.shift, ignore_index=IGNORE, temperature=case.temperature)
    out = impl.logps_fwd(logits, labels, stats=("entropy",), **kw)
    entropy = out.stats[STATS.index("entropy")].contiguous()
    g_logp, g_ent = torch.randn_like(out.logp), torch.randn_like(out.logp)
    for grad_logp in (g_logp, None):
        grad = impl.logps_bwd(logits, labels, out.lse, grad_logp, entropy=entropy, grad_entropy=g_ent, **kw)

        def reference_grad(compute_dtype):
            x = logits.detach().to(compute_dtype).requires_grad_()
            tok = reference.token_logps(x, labels, ignore_index=IGNORE, shift=case.shift,
                                        temperature=case.temperature, outputs=("log_probs", "entropy"))
            total = (tok.entropy * g_ent.to(compute_dtype)).sum()
            if grad_logp is not None:
                total = total + (tok.log_probs * grad_logp.to(compute_dtype)).sum()
            return torch.autograd.grad(total, x)[0]

        slack = downcast_slack(dtype, triton_path=impl is triton_logps)
        assert_close_to_reference(grad, reference_grad(torch.float64), reference_grad(torch.float32).to(dtype),
                                  dtype, "grad", slack=slack)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7])
def test_chunked_path_splits_rows_and_positions(chunk_rows, shift, device, monkeypatch):
    """Realistic V makes the PyTorch path split sequences along T; tiny chunks do the same at test sizes."""
    N, T, V = 3, 8, 100
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", chunk_rows * V)
    logits, labels = make_logits(N, T, V, torch.float32, device), make_labels(N, T, V, device)
    ref_logits = make_logits(N, T, V, torch.float32, device)
    kw = dict(shift=shift, ignore_index=IGNORE, temperature=1.0)
    out = chunked.logps_fwd(logits, labels, ref_logits=ref_logits, stats=STATS, **kw)
    g = torch.randn_like(out.logp)
    entropy = out.stats[STATS.index("entropy")].contiguous()
    grad = chunked.logps_bwd(logits, labels, out.lse, g, entropy=entropy, grad_entropy=g, **kw)
    x = logits.double().requires_grad_()
    truth = reference.token_logps(x, labels, ignore_index=IGNORE, shift=shift, outputs=("log_probs", "entropy"))
    (truth_grad,) = torch.autograd.grad(((truth.log_probs + truth.entropy) * g.double()).sum(), x)
    torch.testing.assert_close(out.logp.double(), truth.log_probs.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), truth.entropy.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-5, atol=1e-6)
    ref_truth = reference.token_logps(ref_logits.double(), labels, ignore_index=IGNORE, shift=shift)
    torch.testing.assert_close(out.ref_logp.double(), ref_truth.log_probs, rtol=1e-5, atol=1e-5)
