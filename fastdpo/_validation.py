"""Argument checks shared by ``fastdpo.functional`` and ``fastdpo.reference``, so both reject the same inputs
with the same message: each error names the argument, what was expected and what was received.

Label values are checked against ``[0, V)`` where that costs no host sync: always for CPU tensors, and for
CUDA tensors only with ``FASTDPO_CHECK_LABELS=1`` (a debugging switch; it synchronises). Unchecked, an
out-of-range label is never dereferenced: its token's log-prob is NaN, so the loss is NaN, not silently wrong.

Under ``torch.compile`` the checks of tensor *values* (labels, ``cu_seq_lens``, ``pairs``) are skipped: they
branch on data, which a compiled graph cannot. Shapes, dtypes and devices are still checked at trace time.
"""

from __future__ import annotations

import os

import torch

from fastdpo.sequences import cu_seq_lens_from_position_ids

LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logits_labels(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool, temperature: float, ignore_index: int,
    label_vocab: int | None = None, context_parallel: bool = False,
) -> None:
    """``label_vocab``: the vocabulary scored labels must index, default the logits' V (a vocab shard's logits
    pass the global V). ``context_parallel``: this rank may hold no position (``T == 0``); it still joins its
    group's sums, so the other ranks are not left waiting."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"logits and labels must be tensors, got {type(logits).__name__} and {type(labels).__name__}"
        )
    if logits.ndim != 3:
        raise ValueError(f"logits must be 3-D (N, T, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must have a dtype in {LOGITS_DTYPES}, got {logits.dtype}")
    N, T, V = logits.shape
    if N == 0 or V == 0:
        raise ValueError(f"logits must have at least one sequence and one vocab entry, got shape {(N, T, V)}")
    if T < (0 if context_parallel else 1 + int(shift)):
        raise ValueError(f"logits need T >= {1 + int(shift)} positions with shift={shift}, got shape {(N, T, V)}")
    if logits.stride(-1) != 1:
        raise ValueError(
            f"logits must be unit-stride in the vocab dimension, got strides {logits.stride()}; "
            "views along N and T are fine, a transposed vocab dimension needs .contiguous()"
        )
    check_label_dtype("labels", labels)
    if tuple(labels.shape) != (N, T):
        raise ValueError(f"labels must have shape (N, T) = {(N, T)} to match logits, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    check_ignore_index(ignore_index)
    check_label_values(labels, V if label_vocab is None else label_vocab, ignore_index, first_scored=int(shift))


LABEL_DTYPES = (torch.int64, torch.int32)


def empty_share_as_ids(ids, context_parallel: bool):
    """A context-parallel rank holding no position may build its empty share of ids (labels, ``position_ids``,
    ``context_parallel_positions``) by hand, and ``torch.empty((N, 0))`` or ``torch.tensor([])`` is float32:
    refusing it on that rank alone would leave the others waiting in the collectives, so it is read as int64.
    Anything else is returned as given, for the usual checks."""
    empty_float = isinstance(ids, torch.Tensor) and ids.numel() == 0 and ids.dtype.is_floating_point
    return ids.long() if context_parallel and empty_float else ids


def check_label_dtype(name: str, labels: torch.Tensor) -> None:
    """Token ids are int64 (as tokenizers and TRL's collators give them) or int32; narrower integers are refused
    rather than widened, since a vocabulary of > 127 (or 32767) ids does not fit them."""
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got dtype {labels.dtype}")


def check_ignore_index(ignore_index) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_inplace_backward(logits: torch.Tensor) -> None:
    """``inplace_backward=True`` writes the gradient over ``logits``: refused for views whose elements share memory
    (an ``expand``: several gradient values would land on one element). Non-overlap is proven the usual way: with
    the dimensions sorted by stride, each stride reaches past the span of the smaller ones."""
    dims = sorted((s, n) for s, n in zip(logits.stride(), logits.shape) if n > 1)
    extent = 1  # the elements spanned by the dimensions of smaller stride
    for stride, size in dims:
        if stride < extent:
            raise ValueError(f"inplace_backward=True needs logits whose elements do not share memory, got shape "
                             f"{tuple(logits.shape)} with strides {logits.stride()} (an expanded or overlapping "
                             "view); pass inplace_backward=False")  # fmt: skip
        extent = stride * size


def check_label_values(labels: torch.Tensor, V: int, ignore_index: int, first_scored: int) -> None:
    """Raise if a scored label (``labels[:, first_scored:]``) is neither ``ignore_index`` nor a vocab id, where
    that needs no host sync (see above)."""
    on_request = labels.device.type != "cpu" and os.environ.get("FASTDPO_CHECK_LABELS") != "1"
    if torch.compiler.is_compiling() or on_request:
        return
    scored = labels[:, first_scored:]
    bad = (scored != ignore_index) & ((scored < 0) | (scored >= V))
    if bad.any():
        n, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels must be in [0, V) = [0, {V}) or equal ignore_index={ignore_index} where scored; "
            f"got {int(scored[n, t])} at labels[{n}, {t + first_scored}]"
        )


def check_pairs(N: int) -> int:
    """Number of pairs B for a chosen-then-rejected batch of N rows."""
    if N % 2:
        raise ValueError(f"the batch must hold 2B rows or packed sequences (chosen [0, B), then rejected [B, 2B)), "
                         f"got {N}")  # fmt: skip
    return N // 2


def check_reference_logps(name: str, value: torch.Tensor | None, B: int, device: torch.device) -> None:
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({B},), got {type(value).__name__}")
    if tuple(value.shape) != (B,):
        raise ValueError(f"{name} must have shape ({B},) (one value per pair), got {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {value.device}")


def check_packing(
    logits: torch.Tensor, cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None, name: str = "logits",
    total_T: int | None = None,
) -> torch.Tensor | None:
    """``cu_seq_lens`` ``[S + 1]`` of a packed batch (derived from ``position_ids`` if given), or None if padded.
    ``total_T``: the packed row's length when ``logits`` is a context-parallel slice of it (``cu_seq_lens`` and
    ``position_ids`` then cover the whole row); default ``logits.shape[1]``.

    The value checks (starts at 0, ends at total_T, strictly increasing) cost one host sync per call, and
    ``position_ids`` one more; explicit ``pairs`` are checked with one more."""
    if cu_seq_lens is None and position_ids is None:
        return None
    N, T = logits.shape[:2]
    T = T if total_T is None else total_T
    if cu_seq_lens is not None and position_ids is not None:
        raise ValueError("pass either cu_seq_lens or position_ids for a packed batch, not both")
    if N != 1:
        last = "D" if name == "hidden" else "V"
        raise ValueError(f"a packed batch has {name} of shape (1, total_T, {last}), got {tuple(logits.shape)}")
    given = "cu_seq_lens"
    if position_ids is not None:
        if total_T is None:
            check_position_ids(position_ids, logits, name=name)
        cu_seq_lens = cu_seq_lens_from_position_ids(position_ids)
        given = "position_ids (a sequence starts where its position is 0, so the first position must be 0): the "\
                "cu_seq_lens they give"
    if cu_seq_lens.ndim != 1 or cu_seq_lens.numel() < 2 or cu_seq_lens.dtype.is_floating_point:
        raise ValueError(f"{given} must be a 1-D integer tensor [0, end_0, ..., {T}], got shape "
                         f"{tuple(cu_seq_lens.shape)} {cu_seq_lens.dtype}")  # fmt: skip
    if cu_seq_lens.device != logits.device:
        raise ValueError(f"cu_seq_lens must be on the {name}' device {logits.device}, got {cu_seq_lens.device}")
    if not torch.compiler.is_compiling() and bool(
        (cu_seq_lens[0] != 0) | (cu_seq_lens[-1] != T) | (cu_seq_lens.diff() <= 0).any()
    ):
        raise ValueError(f"{given} must start at 0, end at total_T = {T} and increase strictly, got "
                         f"{cu_seq_lens.tolist()}")  # fmt: skip
    return cu_seq_lens


def check_position_ids(position_ids: torch.Tensor, logits: torch.Tensor, *, name: str, what: str = "") -> None:
    """``position_ids`` ``[1, T]`` integer on ``logits``' device (T = ``logits.shape[1]``)."""
    T = logits.shape[1]
    if tuple(position_ids.shape) != (1, T) or position_ids.dtype.is_floating_point:
        raise ValueError(f"position_ids must be {what}an integer tensor of shape (1, {T}), got "
                         f"{tuple(position_ids.shape)} {position_ids.dtype}")  # fmt: skip
    if position_ids.device != logits.device:
        raise ValueError(f"position_ids must be on the {name}' device {logits.device}, got {position_ids.device}")


def resolve_pairs(pairs: torch.Tensor | None, S: int, device: torch.device, *, distinct: bool = False) -> torch.Tensor:
    """``[B, 2]`` (chosen, rejected) sequence indices; by default sequence i pairs with sequence B + i.

    ``distinct``: no sequence may appear twice (LD-DPO weights a sequence by its pair's shared length)."""
    if pairs is None:
        B = check_pairs(S)
        return torch.stack([torch.arange(B, device=device), torch.arange(B, 2 * B, device=device)], dim=1)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0 or pairs.dtype not in LABEL_DTYPES:
        raise ValueError(f"pairs must be an int64 or int32 tensor of shape (B, 2) holding (chosen, rejected) sequence "
                         f"indices, got {tuple(pairs.shape)} {pairs.dtype}")  # fmt: skip
    if pairs.device != device:
        raise ValueError(f"pairs must be on the logits' device {device}, got {pairs.device}")
    if torch.compiler.is_compiling():
        return pairs.long()
    if bool(((pairs < 0) | (pairs >= S)).any()):
        raise ValueError(f"pairs must index the {S} sequences of the batch, got values outside [0, {S})")
    if distinct and pairs.unique().numel() != pairs.numel():
        raise ValueError("pairs must not reuse a sequence with ld_alpha: LD-DPO weights each sequence by the "
                         "shared length of its one pair")  # fmt: skip
    return pairs.long()


def check_ref_logits(ref_logits: torch.Tensor | None, logits: torch.Tensor) -> None:
    if ref_logits is None:
        return
    if not isinstance(ref_logits, torch.Tensor) or ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must be a tensor of the logits' shape {tuple(logits.shape)}, got "
                         f"{getattr(ref_logits, 'shape', type(ref_logits).__name__)}")  # fmt: skip
    if ref_logits.dtype not in LOGITS_DTYPES or ref_logits.device != logits.device or ref_logits.stride(-1) != 1:
        raise ValueError(f"ref_logits must be floating, on {logits.device}, unit-stride in vocab; got "
                         f"{ref_logits.dtype} on {ref_logits.device} with strides {ref_logits.stride()}")  # fmt: skip
