"""From per-token rows to per-sequence values, for padded and packed (padding-free) batches.

Padded: logits ``[N, T, V]``, one sequence per row. Packed: logits ``[1, total_T, V]`` holding S sequences back
to back, delimited by ``cu_seq_lens`` ``[S + 1]`` (0, end of sequence 0, ..., total_T) or by ``position_ids``
``[1, total_T]`` restarting at 0 on each sequence (as TRL's padding-free collator and flash-attention use).
In a packed row the shifted logits at a sequence's last position would score the next sequence's first token;
that label is masked, so every sequence is scored exactly as in its own padded row.

Per-token rows are ``[N, T - shift]``: row t scores label t + shift. Segment sums run on a float64 running sum
(difference of two prefix sums): deterministic, no atomics, exact to float32 after the final cast.
"""

from __future__ import annotations

import torch


class SequenceLayout:
    """Maps per-token rows ``[N, T - shift]`` to S sequences (S = N when padded)."""

    def __init__(self, labels: torch.Tensor, *, shift: bool, cu_seq_lens: torch.Tensor | None = None):
        self.shift = int(shift)
        self.packed = cu_seq_lens is not None
        N, T = labels.shape
        self.T_rows = T - self.shift
        if not self.packed:
            self.num_sequences = N
            return
        cu = cu_seq_lens.to(device=labels.device, dtype=torch.long)
        self.num_sequences = cu.numel() - 1
        self.starts, self.ends = cu[:-1], cu[1:]  # label positions [start, end) of each sequence
        # rows scoring sequence i: label positions start..end-1, i.e. rows start - shift .. end - 1 - shift
        self.row_start = (self.starts - self.shift).clamp(0, self.T_rows)
        self.row_end = (self.ends - self.shift).clamp(0, self.T_rows)
        rows = torch.arange(self.T_rows, device=labels.device) + self.shift
        self.row_sequence = torch.searchsorted(self.ends, rows, right=True)  # sequence of each row's label

    def mask_labels(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Labels with each packed sequence's first token unscored (shifted, it would read the previous one)."""
        if not (self.packed and self.shift):
            return labels
        return labels.index_fill(1, self.starts, ignore_index)

    def sums(self, per_token: torch.Tensor) -> torch.Tensor:
        """``[N, T - shift]`` -> ``[S]`` sums per sequence (differentiable)."""
        if not self.packed:
            return per_token.sum(1)
        prefix = torch.nn.functional.pad(per_token[0].double().cumsum(0), (1, 0))
        return (prefix[self.row_end] - prefix[self.row_start]).to(per_token.dtype)

    def broadcast(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """``[S]`` -> ``[N, T - shift]``: each row gets its sequence's value."""
        if not self.packed:
            return per_sequence.unsqueeze(1).expand(-1, self.T_rows)
        return per_sequence[self.row_sequence].unsqueeze(0)

    def rank(self, scored: torch.Tensor) -> torch.Tensor:
        """1-based position of each scored token among its sequence's scored tokens (TRL's ``cumsum`` of the
        shifted completion mask), ``[N, T - shift]``."""
        if not self.packed:
            return scored.long().cumsum(1)
        running = scored[0].long().cumsum(0)
        before = torch.nn.functional.pad(running, (1, 0))[self.row_start]  # scored rows before each sequence
        return (running - before[self.row_sequence]).unsqueeze(0)

    def label_counts(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """``[S]`` label tokens per sequence over the unshifted labels (TRL's ``completion_mask.sum``)."""
        is_label = (labels != ignore_index).long()
        if not self.packed:
            return is_label.sum(1)
        prefix = torch.nn.functional.pad(is_label[0].cumsum(0), (1, 0))
        return prefix[self.ends] - prefix[self.starts]


def cu_seq_lens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[1, total_T]`` positions restarting at 0 per sequence -> ``cu_seq_lens`` ``[S + 1]`` (one host sync,
    for the number of sequences; passing ``cu_seq_lens`` saves it, though its values are still validated)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).squeeze(1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end])


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce SUM of per-sequence partial sums. The backward passes the gradient through unchanged: every rank
    back-propagates the same (replicated) loss, so reducing the gradients too would scale them by the group size."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ContextParallelLayout(SequenceLayout):
    """Padded rows split along T across a context-parallel group: each rank holds a contiguous slice of every
    sequence's positions (labels already aligned, ``shift=False``). Per-sequence sums are this rank's partial sums
    all-reduced inside the autograd graph (``[S]`` floats per reduction); each rank's gradient is its slice of the
    unsharded gradient."""

    def __init__(self, labels: torch.Tensor, *, group):
        super().__init__(labels, shift=False)
        self.group = group

    def sums(self, per_token: torch.Tensor) -> torch.Tensor:
        return _SumAcrossRanks.apply(super().sums(per_token), self.group)

    def label_counts(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        return _SumAcrossRanks.apply(super().label_counts(labels, ignore_index), self.group)

    def rank(self, scored: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("ld_alpha with context parallelism is not supported yet (a token's rank in its "
                                  "sequence needs the scored counts of the ranks before it)")  # fmt: skip
