"""The per-sequence sums kernel (``fastdpo.kernels.sums``) against the PyTorch tree it replaces: the same bits."""

import itertools

import pytest
import torch

from fastdpo import sequences
from fastdpo.kernels import sums


def torch_tree(x: torch.Tensor) -> torch.Tensor:
    """The balanced float64 tree of ``sequences.pairwise_sums``, written out level by level."""
    acc = x.double()
    width = 1 << max(acc.shape[-1] - 1, 0).bit_length()
    acc = torch.nn.functional.pad(acc, (0, width - acc.shape[-1]))
    while acc.shape[-1] > 1:
        acc = acc[..., 0::2] + acc[..., 1::2]
    return acc[..., 0].to(x.dtype)


def wide_range_rows(R: int, L: int, device) -> torch.Tensor:
    """Values over 11 decades in random order: a sum whose bits depend on the order of its adds."""
    x = torch.randn(R, L, device=device) * torch.logspace(-8, 3, L, device=device)
    return x[:, torch.randperm(L, device=device)]


# one value, a pair, odd lengths, one chunk exactly, one past it (a second launch over chunk partials, the last of
# them all padding), several chunks
@pytest.mark.parametrize("L", [1, 2, 7, 1000, sums.MAX_CHUNK, sums.MAX_CHUNK + 1, 2 * sums.MAX_CHUNK + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_as_the_torch_tree(L, dtype, device):
    x = wide_range_rows(3, L, device).to(dtype)
    out = sums.pairwise_sums(x)
    assert out.dtype == dtype and out.shape == (3,)
    assert torch.equal(out, torch_tree(x))


def test_strided_rows_and_no_rows(device):
    x = wide_range_rows(6, 300, device)
    assert torch.equal(sums.pairwise_sums(x[::2, 1::3]), torch_tree(x[::2, 1::3].contiguous()))
    assert sums.pairwise_sums(x[:0]).shape == (0,)


def test_each_row_alone_gives_the_same_bits(device):
    x = wide_range_rows(5, 2 * sums.MAX_CHUNK + 3, device)
    together = sums.pairwise_sums(x)
    assert all(torch.equal(sums.pairwise_sums(x[i : i + 1])[0], together[i]) for i in range(5))


def test_sequences_use_the_kernel_where_triton_runs(backend, monkeypatch, device):
    """``sequences.pairwise_sums`` launches the kernel on the Triton backend, and both backends give the same bits."""
    calls = []
    monkeypatch.setattr(sums, "pairwise_sums", lambda x: calls.append(x.shape) or torch_tree(x))
    x = wide_range_rows(4, 50, device)
    out = sequences.pairwise_sums(x)
    assert torch.equal(out, torch_tree(x))
    assert calls == ([(4, 50)] if backend == "triton" else [])


def test_packed_sequence_sums_equal_each_sequence_alone(backend, device):
    """A packed row's sums (``SequenceLayout.sums``: trees over SUM_BLOCK-row blocks, then a tree over the block
    sums) give every sequence the bits of its own padded row's tree, also for sequences spanning several blocks:
    the block sums stay float64 between the levels (one rounding to float32 at the end, as padded)."""
    B = sequences.SUM_BLOCK
    # 24 sequences of 2 to 3 blocks: a rounding between the levels changes about a third of them
    lengths = [7, B] + torch.randint(B + 1, 3 * B, (24,)).tolist()
    x = wide_range_rows(1, sum(lengths), device)
    cu = torch.nn.functional.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0))
    labels = torch.zeros(x.shape, dtype=torch.long, device=device)
    packed = sequences.SequenceLayout(labels, shift=False, cu_seq_lens=cu).sums(x)
    alone = torch.stack([torch_tree(x[:, a:b])[0] for a, b in itertools.pairwise(cu.tolist())])
    assert packed.dtype == torch.float32 and torch.equal(packed, alone)
