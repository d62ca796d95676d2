"""From per-token rows to per-sequence values, for padded and packed (padding-free) batches.

Padded: logits ``[N, T, V]``, one sequence per row. Packed: logits ``[1, total_T, V]`` holding S sequences back
to back, delimited by ``cu_seq_lens`` ``[S + 1]`` (0, end of sequence 0, ..., total_T) or by ``position_ids``
``[1, total_T]`` restarting at 0 on each sequence (as TRL's padding-free collator and flash-attention use).
In a packed row the shifted logits at a sequence's last position would score the next sequence's first token;
that label is masked, so every sequence is scored exactly as in its own padded row.

Per-token rows are ``[N, T - shift]``: row t scores label t + shift.

Sums are batch invariant: a sequence's sum is the same bits alone, in any batch, at any row, with any right
padding, padded or packed. Each sequence is summed by a balanced binary tree of float64 adds over its own rows,
counted from its first row (``pairwise_sums``); elementwise adds have one defined result on every device, unlike
``torch.sum``, whose order follows the shape (CPU threads split a long single output; CUDA picks a block layout
from the number of outputs). Packed rows are cut into blocks of ``SUM_BLOCK`` rows aligned at each sequence's
start, so the tree is the one its padded row gets.
"""

from __future__ import annotations

import torch

from fastdpo.ops import logps as logps_op

SUM_BLOCK = 256  # rows per first-level block of a packed sum (a power of two)
SUM_DTYPES = (torch.float32, torch.float64)  # per-token values: float32, float64 for float64 logits


class _PairwiseSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        if x.ndim == 2 and logps_op.plain_eager(x) and logps_op.select_backend(x, SUM_DTYPES) == "triton":
            return logps_op.triton_sums.pairwise_sums(x)  # the same tree in one launch
        acc = x.to(torch.float64)
        width = 1 << max(acc.shape[-1] - 1, 0).bit_length()
        acc = torch.nn.functional.pad(acc, (0, width - acc.shape[-1]))
        while acc.shape[-1] > 1:
            acc = acc[..., 0::2] + acc[..., 1::2]
        # a copy even for float64 input: torch 2.11's Dynamo gave zero gradients to a Function whose output is a
        # view of its forward's intermediates (acc[..., 0] alone)
        return acc[..., 0].to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.unsqueeze(-1).expand(ctx.shape)


def pairwise_sums(x: torch.Tensor) -> torch.Tensor:
    """``[R, L]`` -> ``[R]``, each row summed by a balanced binary tree of float64 adds over positions
    ``0 .. 2^k - 1`` (zeros past L), cast back to ``x.dtype``. Batch invariant: a row's bits depend on its own
    values only, not on R. Right-padding a row with zeros changes nothing either: the larger tree's left half is the
    smaller tree, and its right half adds +0 at the root. Differentiable (the gradient is broadcast). Where the Triton
    kernels run (CUDA, or the interpreter), one launch of ``fastdpo.kernels.sums`` computes the same tree, same bits;
    under torch.compile the PyTorch tree, which inductor fuses."""
    return _PairwiseSums.apply(x)


class SequenceLayout:
    """Maps per-token rows ``[N, T - shift]`` to S sequences (S = N when padded).

    ``positions``/``total`` (context parallel, ``shift=False``): row t is position ``positions[t]`` of a packed row
    of ``total`` positions, whose boundaries ``cu_seq_lens`` gives; only the packed sums use them here
    (``fastdpo.context_parallel`` handles the rest). Default: the rows are the whole row."""

    def __init__(self, labels: torch.Tensor, *, shift: bool, cu_seq_lens: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, total: int | None = None):  # fmt: skip
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
        rows = torch.arange(self.T_rows, device=labels.device) if positions is None else positions
        self.row_sequence = torch.searchsorted(self.ends, rows + self.shift, right=True)  # sequence of each row's label
        self._block_sums_index(rows, cu, T if total is None else total)

    def _block_sums_index(self, rows: torch.Tensor, cu: torch.Tensor, T: int) -> None:
        """Where each row goes in the two-level packed sums. Row p of sequence i, q = p - start_i rows after the
        sequence's first scored row, lands in block ``block_start_i + q // SUM_BLOCK``, column ``q % SUM_BLOCK``
        (with shift, row start_i - 1 reads the masked first label: it goes to a dropped block); block k of sequence
        i is column k of its row in the second level. Sizes are static (no host sync): sum_i ceil(len_i / B) <=
        T // B + S blocks, at most T // B + 1 per sequence."""
        S, B = self.num_sequences, SUM_BLOCK
        blocks = (cu[1:] - cu[:-1] + B - 1) // B
        block_end = blocks.cumsum(0)
        block_start = block_end - blocks
        self.num_blocks = T // B + S + 1  # the last one collects the dropped rows
        self.blocks_per_sequence = T // B + 1
        sequence = self.row_sequence.clamp(max=S - 1)
        q = rows - self.starts[sequence]
        keep = (q >= 0) & (self.row_sequence < S)
        self.token_block = torch.where(keep, block_start[sequence] + q // B, self.num_blocks - 1)
        self.token_column = torch.where(keep, q % B, 0)
        b = torch.arange(self.num_blocks, device=cu.device)
        self.block_sequence = torch.searchsorted(block_end, b, right=True)  # S for unused blocks: a dropped row
        self.block_column = torch.where(
            self.block_sequence < S, b - block_start[self.block_sequence.clamp(max=S - 1)], 0
        )

    def mask_labels(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Labels with each packed sequence's first token unscored (shifted, it would read the previous one)."""
        if not (self.packed and self.shift):
            return labels
        return labels.index_fill(1, self.starts, ignore_index)

    def sums(self, per_token: torch.Tensor) -> torch.Tensor:
        """``[N, T - shift]`` -> ``[S]`` sums per sequence (differentiable)."""
        if not self.packed:
            return pairwise_sums(per_token)
        values = per_token[0].double()  # float64 throughout: the block sums are not rounded between the levels
        first = values.new_zeros(self.num_blocks, SUM_BLOCK).index_put((self.token_block, self.token_column), values)
        second = values.new_zeros(self.num_sequences + 1, self.blocks_per_sequence)
        second = second.index_put((self.block_sequence, self.block_column), pairwise_sums(first))
        return pairwise_sums(second[: self.num_sequences]).to(per_token.dtype)

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


def shift_labels(labels: torch.Tensor, *, ignore_index: int = -100, cu_seq_lens: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Labels ``[N, T]`` aligned with the input ids -> ``[N, T]`` aligned with the logits: position t holds label
    t + 1 (what ``logits[:, t]`` scores; transformers' ``shift_labels``), ``ignore_index`` at the last position and,
    in a packed row (``cu_seq_lens`` or ``position_ids``), at each sequence's last position, whose next token starts
    another sequence. Any entry point with ``shift=False`` on these equals ``shift=True`` on ``labels``.

    For context parallelism, shift the whole row first, then give each rank its slice: the last position of rank
    r's slice then carries its label, the first token of rank r + 1's slice (the boundary token).

    One difference: the token counts that IPO and ``sigmoid_norm`` divide by (TRL's ``completion_mask.sum()``) count
    the labels given, so a sequence whose very first token is a completion token counts one more with
    ``shift=True`` (that token is never scored). DPO sequences start with a prompt token, and then the two agree."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
    if position_ids is not None:
        cu_seq_lens = cu_seq_lens_from_position_ids(position_ids)
    if cu_seq_lens is not None:
        shifted[:, cu_seq_lens[1:].to(labels.device) - 1] = ignore_index
    return shifted


def cu_seq_lens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[1, total_T]`` positions restarting at 0 per sequence -> ``cu_seq_lens`` ``[S + 1]`` (one host sync,
    for the number of sequences; passing ``cu_seq_lens`` saves it, though its values are still validated)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).squeeze(1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([starts, end])
