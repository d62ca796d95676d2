"""Batch invariance: on one device a sequence's log-prob is the same bits (``torch.equal``) whether it is scored
alone, in any batch, at any row, with any right padding, padded or packed, with or without the metrics' statistics,
on the logits path and on the fused-linear path, on both backends. This is what lets reference log-probs cached by
``sequence_logps`` equal the policy's own in ``dpo_loss`` at step 0."""

import pytest
import torch

import fastdpo
from fastdpo.ops import fused_linear as fused_op

IGNORE = -100


def _sequences(lengths, V, device, D=None, dtype=torch.float32):
    """One (inputs [L, V] logits or [L, D] hidden, labels [L]) per length: a random prompt, then the completion."""
    out = []
    for L in lengths:
        x = torch.randn(L, V) * 3 if D is None else torch.randn(L, D)
        labels = torch.randint(0, V, (L,))
        labels[: int(torch.randint(1, max(2, L // 2), ()))] = IGNORE
        out.append((x.to(device, dtype), labels.to(device)))
    return out


def _batch(seqs, order, T):
    """Rows ``order`` of ``seqs`` right-padded to T with random inputs and ignored labels."""
    width, dtype, device = seqs[0][0].shape[1], seqs[0][0].dtype, seqs[0][0].device
    x = (torch.randn(len(order), T, width, device=device) * 3).to(dtype)
    labels = torch.full((len(order), T), IGNORE, device=device)
    for row, k in enumerate(order):
        L = seqs[k][0].shape[0]
        x[row, :L], labels[row, :L] = seqs[k]
    return x, labels


def _packed(seqs, order):
    x = torch.cat([seqs[k][0] for k in order]).unsqueeze(0)
    labels = torch.cat([seqs[k][1] for k in order]).unsqueeze(0)
    lengths = torch.tensor([seqs[k][0].shape[0] for k in order], device=seqs[0][0].device)
    return x, labels, torch.nn.functional.pad(lengths.cumsum(0), (1, 0))


def _layouts(seqs):
    """(name, [(sequence order, padded length T)]) for each way of batching: each sequence alone without padding,
    all in one batch, and reversed with two repeats and more padding."""
    n = len(seqs)
    longest = max(x.shape[0] for x, _ in seqs)
    yield "alone", [([k], seqs[k][0].shape[0]) for k in range(n)]
    yield "batch", [(list(range(n)), longest)]
    yield "reversed+padding", [(list(reversed(range(n))) + [0, 1], longest + 37)]


def _per_sequence(score, seqs, *, packed_score=None):
    """{layout: [log-prob of sequence k for each k]} over every layout."""
    results = {}
    for name, batches in _layouts(seqs):
        got = [None] * len(seqs)
        for order, T in batches:
            values = score(*_batch(seqs, order, T))
            for row, k in enumerate(order):
                got[k] = values[row] if got[k] is None else got[k]
        results[name] = torch.stack(got)
    if packed_score is not None:
        order = [2, 0, 3, 1] + list(range(4, len(seqs)))
        x, labels, cu = _packed(seqs, order)
        values = packed_score(x, labels, cu)
        got = [None] * len(seqs)
        for i, k in enumerate(order):
            got[k] = values[i]
        results["packed"] = torch.stack(got)
    return results


def _assert_all_equal(results):
    base_name, base = next(iter(results.items()))
    for name, got in results.items():
        assert torch.equal(got, base), f"{name} != {base_name}: max diff {float((got - base).abs().max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_path_sequence_logps(backend, dtype, device):
    # V > 2048: several forward blocks per row, so a block size chosen by the statistics would change the bits
    seqs = _sequences([17, 40, 3, 29, 2, 33], V=3000, device=device, dtype=dtype)

    def plain(logits, labels):
        return fastdpo.sequence_logps(logits, labels)

    def with_metrics(logits, labels):  # dpo_loss's per-sequence sums, with the statistics in the same sweep
        if logits.shape[0] % 2:
            logits, labels = torch.cat([logits, logits[:1]]), torch.cat([labels, labels[:1]])
        out = fastdpo.dpo_loss(logits, labels, reference_free=True, return_metrics=True)
        return torch.cat([out.chosen_logps, out.rejected_logps]).detach()

    def packed(logits, labels, cu):
        return fastdpo.sequence_logps(logits, labels, cu_seq_lens=cu)

    results = _per_sequence(plain, seqs, packed_score=packed)
    results.update({f"dpo_loss {k}": v for k, v in _per_sequence(with_metrics, seqs).items()})
    _assert_all_equal(results)


def test_logits_path_token_logps(backend, device):
    seqs = _sequences([9, 21, 12, 15], V=2500, device=device)

    def tokens(logits, labels):  # the first 8 rows exist in every layout
        out = fastdpo.token_logps(logits, labels, outputs=("log_probs", "entropy"))
        return torch.cat([out.log_probs[:, :8], out.entropy[:, :8]], 1)

    _assert_all_equal(_per_sequence(tokens, seqs))


@pytest.mark.parametrize("tile_elements", [None, 32 * 700], ids=["one-tile", "tiles-of-32-rows"])
def test_fused_linear_path(backend, tile_elements, device):
    V, D = 700, 256
    seqs = _sequences([70, 9, 45, 100, 3, 60], V=V, D=D, device=device)
    weight = (torch.randn(V, D) * 2 / D**0.5).to(device)
    bias = (torch.randn(V) * 0.5).to(device)

    def score(hidden, labels):
        return fastdpo.fused_linear_sequence_logps(hidden, weight, labels, bias=bias, tile_elements=tile_elements)

    def packed(hidden, labels, cu):
        return fastdpo.fused_linear_sequence_logps(hidden, weight, labels, bias=bias, cu_seq_lens=cu,
                                                   tile_elements=tile_elements)  # fmt: skip

    _assert_all_equal(_per_sequence(score, seqs, packed_score=packed))


def test_fused_linear_gemm_height_is_fixed(monkeypatch):
    """Every forward GEMM has the fixed height, whatever the number of scored rows (a spy on torch.mm)."""
    heights = []
    mm = torch.mm

    def spy(a, b, **kw):
        heights.append(a.shape[0])
        return mm(a, b, **kw)

    hidden, labels = torch.randn(1, 150, 32), torch.randint(0, 300, (1, 150))
    monkeypatch.setattr(torch, "mm", spy)
    with torch.no_grad():
        fastdpo.fused_linear_sequence_logps(hidden, torch.randn(300, 32), labels)
    assert heights and set(heights) == {fused_op.CPU_GEMM_ROWS}


def test_torch_path_single_row_at_large_vocab(monkeypatch):
    """PyTorch's CPU reduction splits a lone output row longer than 32768 across threads; the chunked path must
    still give a one-token sequence the bits it gets in a batch."""
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    V = 40000
    logits = torch.randn(5, 3, V) * 3
    labels = torch.randint(0, V, (5, 3))
    batch = fastdpo.token_logps(logits, labels, shift=False, outputs=("log_probs", "entropy", "mean_logits"))
    for n in range(5):
        alone = fastdpo.token_logps(logits[n : n + 1, 1:2], labels[n : n + 1, 1:2], shift=False,
                                    outputs=("log_probs", "entropy", "mean_logits"))  # fmt: skip
        for name in ("log_probs", "entropy", "mean_logits"):
            assert torch.equal(getattr(alone, name)[0, 0], getattr(batch, name)[n, 1]), name
