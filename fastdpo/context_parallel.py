"""Context parallel: every rank of a group holds a contiguous slice of the positions, in group-rank order (rank 0
the first positions), with labels already aligned to them (``shift=False``).

Padded batch ``[N, T, V]``: rank r holds positions ``[t_r, t_(r+1))`` of every row. Packed batch ``[1, total_T, V]``:
rank r holds positions ``[t_r, t_(r+1))`` of the packed row, a sequence may cross slices, and ``cu_seq_lens`` gives
the *whole* row's boundaries (``position_ids`` may be this rank's slice; the slices are all-gathered, total_T
integers). Slices may be uneven; their sizes are all-gathered (one integer per rank) when the batch is packed.

What crosses ranks (``[S]`` floats per reduction, nothing per token, nothing of size V):
    sum_i = all_reduce_SUM(partial sum of sequence i over this slice)       (log-probs, counts, statistics)
    rank of a token in its sequence (LD-DPO) = its rank within this slice + the sequence's scored tokens on the
        slices before it                                                    (one all-gather of ``[S]`` counts)
The sums' backward passes the gradient through unchanged: every rank back-propagates the same (replicated) loss,
so each rank's logits gradient is its slice of the unsharded one, with nothing scaled by the group size.

Sums are all-reduced partial sums, so a sequence split across slices differs from its single-device sum by float32
rounding (the order of additions changes), not bitwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastdpo import _validation
from fastdpo.sequences import SequenceLayout


def collective_device(group) -> torch.device:
    """Where a collective's host-built tensors live: the current CUDA device for NCCL, else the CPU."""
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce SUM of per-sequence partial sums; the backward is the identity (see the module docstring)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ContextParallelLayout(SequenceLayout):
    """A ``SequenceLayout`` over this rank's slice whose per-sequence values are those of the whole sequences."""

    def __init__(self, labels: torch.Tensor, *, group, cu_seq_lens: torch.Tensor | None = None, offset: int = 0,
                 total: int | None = None):  # fmt: skip
        super().__init__(labels, shift=False, cu_seq_lens=cu_seq_lens, offset=offset, total=total)
        self.group = group

    def sums(self, per_token: torch.Tensor) -> torch.Tensor:
        return _SumAcrossRanks.apply(super().sums(per_token), self.group)

    def label_counts(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        return _SumAcrossRanks.apply(super().label_counts(labels, ignore_index), self.group)

    def rank(self, scored: torch.Tensor) -> torch.Tensor:
        local = super().rank(scored)
        counts = SequenceLayout.sums(self, scored.double()).long()  # [S] scored tokens of each sequence here
        gathered = [torch.empty_like(counts) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, counts, group=self.group)
        me = dist.get_rank(self.group)
        before = torch.stack(gathered[:me]).sum(0) if me else torch.zeros_like(counts)
        return local + self.broadcast(before)


def slice_sizes(T_local: int, group) -> list[int]:
    """Every rank's slice length, in rank order (one all-gather of an integer per rank)."""
    mine = torch.tensor([T_local], dtype=torch.long, device=collective_device(group))
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _gather_slices(x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """``[1, T_r]`` on each rank r -> ``[1, sum(sizes)]``, the slices concatenated in rank order."""
    device = collective_device(group)
    padded = torch.nn.functional.pad(x.to(device), (0, max(sizes) - x.shape[1]))  # all-gather wants equal shapes
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:, :n] for part, n in zip(parts, sizes)], dim=1).to(x.device)


def make_layout(tensor: torch.Tensor, labels: torch.Tensor, *, group, cu_seq_lens, position_ids,
                name: str = "logits") -> ContextParallelLayout:  # fmt: skip
    """The layout of this rank's slice ``tensor`` ``[N, T_r, ...]`` (see the module docstring). A packed batch costs
    one host sync more than on one device (the slice sizes)."""
    if cu_seq_lens is None and position_ids is None:
        return ContextParallelLayout(labels, group=group)
    T_local = tensor.shape[1]
    sizes = slice_sizes(T_local, group)
    offset, total = sum(sizes[: dist.get_rank(group)]), sum(sizes)
    if position_ids is not None:
        _validation.check_position_ids(position_ids, tensor, name=name, what="this rank's slice: ")
        position_ids = _gather_slices(position_ids, group, sizes)
    cu_seq_lens = _validation.check_packing(tensor, cu_seq_lens, position_ids, name=name, total_T=total)
    return ContextParallelLayout(labels, group=group, cu_seq_lens=cu_seq_lens, offset=offset, total=total)
