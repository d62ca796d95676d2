"""Context parallel: every rank of a group holds some of the positions of every row, with labels already aligned
to them (``shift=False``; ``fastdpo.shift_labels`` before sharding).

Which positions: by default contiguous slices in group-rank order (rank 0 the first positions; slices may be
uneven). Any other assignment is given by ``positions`` ``[T_r]``, the position in the whole row of each of this
rank's positions: the layout of torch's load-balanced ``context_parallel`` (rank r holds chunks r and 2 CP - 1 - r
of 2 CP), which shards a ``torch.arange(T)`` buffer into exactly that. A packed batch ``[1, total_T, V]`` gives the
whole row's boundaries in ``cu_seq_lens``, or this rank's share of ``position_ids``; its sequences may cross ranks.

What crosses ranks (nothing of size V):
    sum_i = all_reduce_SUM(partial sum of sequence i over this rank's positions)   ([S] floats: log-probs, token
            counts, statistics; the order of positions does not matter)
    LD-DPO's rank of a token in its sequence = cumsum of the whole row's scored mask, which one all-reduce of
            ``[N, total_T]`` int32 assembles (4 bytes a position, only with ``ld_alpha``)
    packed or LD-DPO: the slice lengths (default layout: an integer per rank), or for given ``positions`` their
            range and count (three integers per rank) and a check that each position is held once (4 bytes a
            position); the ``position_ids`` shares when they replace ``cu_seq_lens`` (8 bytes a position)
Padded batches without LD-DPO use no position at all (the sums do not depend on the order), so ``positions`` is
not checked there. A rank may hold no position (``T_r = 0``, e.g. a row shorter than the group): it adds nothing
to the sums but joins every collective, so the other ranks are not left waiting.
The sums' backward passes the gradient through unchanged: every rank back-propagates the same (replicated) loss,
so each rank's logits gradient is its slice of the unsharded one, with nothing scaled by the group size.

Sums are all-reduced partial sums, so a sequence spread over ranks differs from its single-device sum by float32
rounding (the order of additions changes), not bitwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from fastdpo import _validation
from fastdpo._collectives import collective_device, gather_ints
from fastdpo.sequences import SequenceLayout


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce SUM of per-sequence partial sums; the backward is the identity (see the module docstring). A
    functional collective, not an in-place ``dist.all_reduce`` of a clone: under ``torch.compile`` torch 2.11's
    Dynamo traced the in-place one into a graph whose backward gave every logit a zero gradient."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(partial, "sum", group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ContextParallelLayout(SequenceLayout):
    """A ``SequenceLayout`` over this rank's positions whose per-sequence values are those of whole sequences.
    ``positions``/``total``: this rank's positions in the whole row and its length; resolved on first use when
    None (padded batches need them for LD-DPO only)."""

    def __init__(self, labels: torch.Tensor, *, group, cu_seq_lens: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, total: int | None = None):  # fmt: skip
        super().__init__(labels, shift=False, cu_seq_lens=cu_seq_lens, positions=positions, total=total)
        self.group = group
        self.positions, self.total = positions, total

    def sums(self, per_token: torch.Tensor) -> torch.Tensor:
        return _SumAcrossRanks.apply(super().sums(per_token), self.group)

    def label_counts(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        is_label = (labels != ignore_index).long()
        if self.packed:
            local = is_label.new_zeros(self.num_sequences).index_add_(0, self.row_sequence, is_label[0])
        else:
            local = is_label.sum(1)
        return _SumAcrossRanks.apply(local, self.group)

    def rank(self, scored: torch.Tensor) -> torch.Tensor:
        if self.total is None:
            self.positions, self.total = resolve_positions(self.positions, scored.shape[1], self.group, scored.device)
        whole = _whole_rows(scored.to(torch.int32), self.positions, self.total, self.group)  # the scored mask
        running = whole.long().cumsum(1)
        if self.packed:  # count from each sequence's start
            sequence = torch.searchsorted(self.ends, torch.arange(self.total, device=scored.device), right=True)
            before = torch.nn.functional.pad(running, (1, 0))[:, self.starts]
            running = running - before[:, sequence]
        return running[:, self.positions]


def resolve_positions(positions: torch.Tensor | None, T_local: int, group, device) -> tuple[torch.Tensor, int]:
    """(this rank's positions ``[T_r]`` in the whole row, the row's length). Default: contiguous slices in rank
    order, from the slice lengths (one all-gather of an integer per rank, one host sync). Given positions are
    checked on every rank alike: in range and as many as the row's length (one all-gather of three integers per
    rank), then each held by exactly one rank (one all-reduce of 4 bytes a position); two host syncs."""
    if positions is None:
        sizes = [n for (n,) in gather_ints([T_local], group, device)]
        offset = sum(sizes[: dist.get_rank(group)])
        return torch.arange(offset, offset + T_local, device=device), sum(sizes)
    held = positions.numel() > 0  # a rank holding no position widens no range
    low, high = (positions.min(), positions.max()) if held else (0, -1)
    lows, highs, sizes = zip(*gather_ints([low, high, T_local], group, device))
    total = sum(sizes)
    if min(lows) < 0 or max(highs) >= total:  # every rank sees the same numbers, so every rank raises
        raise ValueError(f"context_parallel_positions must lie in [0, {total}) (the group holds {total} positions), "
                         f"got positions from {min(lows)} to {max(highs)}")  # fmt: skip
    cdev = collective_device(group, device)
    covered = torch.zeros(total, dtype=torch.int32, device=cdev)
    covered.index_add_(0, positions.to(cdev), torch.ones(T_local, dtype=torch.int32, device=cdev))
    dist.all_reduce(covered, group=group)
    if bool((covered != 1).any()):
        wrong = (covered != 1).nonzero().flatten().tolist()
        raise ValueError(f"context_parallel_positions must hold every position of [0, {total}) on exactly one rank; "
                         f"positions held by no rank or by several: {wrong}")  # fmt: skip
    return positions, total


def _check_positions(positions: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    T_local = tensor.shape[1]
    positions = _validation.empty_share_as_ids(positions, context_parallel=True)
    is_tensor = isinstance(positions, torch.Tensor)
    wrong_dtype = is_tensor and (positions.dtype.is_floating_point or positions.dtype == torch.bool)
    if not is_tensor or wrong_dtype or tuple(positions.shape) not in ((T_local,), (1, T_local)):
        what = f"{tuple(positions.shape)} {positions.dtype}" if is_tensor else type(positions).__name__
        raise ValueError(f"context_parallel_positions must be an integer tensor of shape ({T_local},) (or (1, "
                         f"{T_local})), the position in the whole row of each of this rank's positions; got {what}")
    if positions.device != tensor.device:
        raise ValueError(f"context_parallel_positions must be on the logits' device {tensor.device}, got "
                         f"{positions.device}")  # fmt: skip
    return positions.reshape(-1).long()


def _whole_rows(values: torch.Tensor, positions: torch.Tensor, total: int, group) -> torch.Tensor:
    """This rank's share ``[N, T_r]`` of rows -> the whole rows ``[N, total]``, in ``values``' dtype (one all-reduce
    of ``N * total`` values: every position is held by exactly one rank)."""
    device = collective_device(group, values.device)
    whole = values.new_zeros((values.shape[0], total), device=device)
    whole[:, positions.to(device)] = values.to(device)
    dist.all_reduce(whole, group=group)
    return whole.to(values.device)


def make_layout(tensor: torch.Tensor, labels: torch.Tensor, *, group, cu_seq_lens, position_ids, positions=None,
                name: str = "logits") -> ContextParallelLayout:  # fmt: skip
    """The layout of this rank's share ``tensor`` ``[N, T_r, ...]`` of the positions (see the module docstring).
    A packed batch costs one host sync more than on one device."""
    if positions is not None:
        positions = _check_positions(positions, tensor)
    if cu_seq_lens is None and position_ids is None:
        return ContextParallelLayout(labels, group=group, positions=positions)
    positions, total = resolve_positions(positions, tensor.shape[1], group, tensor.device)
    if position_ids is not None:
        position_ids = _validation.empty_share_as_ids(position_ids, context_parallel=True)
        _validation.check_position_ids(position_ids, tensor, name=name, what="this rank's share: ")
        position_ids = _whole_rows(position_ids.long(), positions, total, group)
    cu_seq_lens = _validation.check_packing(tensor, cu_seq_lens, position_ids, name=name, total_T=total)
    return ContextParallelLayout(labels, group=group, cu_seq_lens=cu_seq_lens, positions=positions, total=total)
