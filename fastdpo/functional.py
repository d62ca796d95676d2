"""Public functions: validate, run the fused log-prob op, reduce per sequence, apply the DPO loss.

Shapes: N rows (sequences), T positions, V vocab. A DPO batch is TRL's concatenated batch: rows [0, B) are the
chosen completions and rows [B, 2B) the rejected ones (N = 2B); a packed batch is one row of S = 2B sequences
(``cu_seq_lens`` or ``position_ids``, see ``fastdpo.sequences``), paired the same way or by ``pairs``. ``labels``
are aligned with the input ids (``shift=True``: logits[:, t] scores labels[:, t + 1]) and hold ``ignore_index`` on
unscored tokens, e.g. ``labels = input_ids.masked_fill(completion_mask == 0, -100)``.

The logits are read in place (any strides with a unit-stride vocab dimension): nothing of size N x T x V is
allocated in the forward, and the backward allocates one gradient buffer in the logits' dtype, or none with
``inplace_backward=True``.

``inplace_backward=True`` overwrites the logits with their gradient during backward. It is safe when the
logits feed nothing else whose backward reads them, which holds for the usual ``lm_head`` Linear output
(its backward reads the hidden states and weight, not the logits). It is unsafe, and silently wrong, when
(a) the same logits also feed another loss or metric that is back-propagated afterwards, (b) the op that
produced them saved its output for backward (e.g. ``tanh`` softcapping, ``softmax``), (c) you read the
logits after ``backward()``, or (d) you call backward twice (``retain_graph=True``). Logits whose elements share
memory (an expanded view) are refused.
"""

from __future__ import annotations

import torch

from fastdpo import _pipeline, _validation, context_parallel
from fastdpo._collectives import process_group
from fastdpo._logps_outputs import OUTPUTS, STATS, TokenLogps, check_outputs
from fastdpo.losses import DPOOutput, LossConfig
from fastdpo.ops import logps as logps_op
from fastdpo.ops import vocab_parallel as vocab_parallel_op

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None
from fastdpo.sequences import SequenceLayout


def logits_source(logits, ref_logits=None, *, shift, ignore_index, temperature=1.0, inplace_backward=False,
                  vocab_parallel=None):  # fmt: skip
    """A ``_pipeline.TokenSource`` reading per-token outputs from ``logits`` (and ``ref_logits`` in the same launch).
    ``vocab_parallel``: ``(group, first vocab id, global V)`` when the logits are this rank's vocab shard."""
    if inplace_backward and not torch.compiler.is_compiling():
        _validation.check_inplace_backward(logits)

    def run(labels: torch.Tensor, stats: tuple[str, ...], with_reference: bool) -> logps_op.TokenOutputs:
        options = logps_op.LogpsOptions(shift=shift, ignore_index=ignore_index, temperature=float(temperature),
                                        inplace_backward=inplace_backward, stats=stats)  # fmt: skip
        ref = ref_logits if with_reference else None
        if vocab_parallel is not None:
            return vocab_parallel_op.token_logps(logits, labels, options, *vocab_parallel, ref_logits=ref)
        return logps_op.token_logps(logits, labels, options, ref_logits=ref)

    return run


def make_layout(tensor, labels, *, shift, cu_seq_lens, position_ids, context_parallel_group,
                context_parallel_positions=None, name="logits"):  # fmt: skip
    """The ``SequenceLayout`` of a call: padded or packed, on one device or split along T over a context-parallel
    group (which needs labels already aligned with the positions, ``shift=False``)."""
    if context_parallel_group is None:
        if context_parallel_positions is not None:
            raise ValueError("context_parallel_positions needs context_parallel_group")
        return SequenceLayout(labels, shift=shift, cu_seq_lens=_validation.check_packing(
            tensor, cu_seq_lens, position_ids, name=name))  # fmt: skip
    if shift:
        raise ValueError("context_parallel_group needs shift=False: each rank's labels must already be aligned with "
                         "its positions (the boundary token's label comes from the next rank's slice; see "
                         "fastdpo.shift_labels)")  # fmt: skip
    group = process_group(context_parallel_group, "context_parallel_group")
    return context_parallel.make_layout(tensor, labels, group=group, cu_seq_lens=cu_seq_lens,
                                        position_ids=position_ids, positions=context_parallel_positions,
                                        name=name)  # fmt: skip


def _vocab_shard(logits, ref_logits, group, start, labels):
    """(logits, ref_logits, vocab_parallel) with a DTensor or a ``group``'s shard resolved (the layout, the rows and
    the labels checked alike on every rank). ``vocab_parallel`` is ``(group, first vocab id, global V)``, or None for
    unsharded logits."""
    if DTensor is not None and isinstance(logits, DTensor):
        if group is not None or start is not None:
            raise ValueError("a DTensor of logits carries its own group and offsets: do not pass "
                             "vocab_parallel_group / vocab_start_index with it")  # fmt: skip
        dlogits = logits
        logits, group, start, V_total = vocab_parallel_op.from_dtensor(logits)
        if ref_logits is not None and isinstance(ref_logits, DTensor):
            dref = ref_logits
            ref_logits = vocab_parallel_op.from_dtensor(ref_logits, "ref_logits")[0]
            # what every rank knows alike (so that all raise or none): the mesh's ranks and the global shape
            if not torch.compiler.is_compiling() and (
                dref.device_mesh.mesh.tolist() != dlogits.device_mesh.mesh.tolist() or dref.shape != dlogits.shape
            ):
                raise ValueError(f"ref_logits must be sharded as the logits: the same global shape "
                                 f"{tuple(dlogits.shape)} over a mesh of the same ranks "
                                 f"{dlogits.device_mesh.mesh.tolist()}, got {tuple(dref.shape)} over "
                                 f"{dref.device_mesh.mesh.tolist()}")  # fmt: skip
    elif group is None:
        if start is not None:
            raise ValueError("vocab_start_index needs vocab_parallel_group")
        return logits, ref_logits, None
    else:
        group = process_group(group, "vocab_parallel_group")
        start, V_total = vocab_parallel_op.shard_layout(logits.shape[-1], group, start, logits.device, logits, labels,
                                                        vocab_parallel_op.vocab_sample(logits, -1))  # fmt: skip
    return logits, ref_logits, (group, start, V_total)


def _global_vocab(vocab_parallel) -> int | None:
    """The vocabulary the labels index: the global one for a vocab shard, else (None) the logits' own."""
    return None if vocab_parallel is None else vocab_parallel[2]


def token_outputs(out: logps_op.TokenOutputs, outputs: tuple[str, ...]) -> TokenLogps:
    """The requested ``TokenLogps`` fields of the op's outputs (``is_top1`` as bool)."""
    values = {"log_probs": out.logp, "entropy": out.entropy}
    for name in ("mean_logits", "log_sum_sq_probs", "is_top1"):
        if name in outputs:
            values[name] = out.stats[STATS.index(name)]
    if "is_top1" in outputs:
        values["is_top1"] = values["is_top1"] > 0.5
    return TokenLogps(**{name: values[name] if name in outputs else None for name in OUTPUTS})


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    temperature: float = 1.0,
    outputs: tuple[str, ...] = ("log_probs",),
    inplace_backward: bool = False,
    vocab_parallel_group=None,
    vocab_start_index: int | None = None,
) -> TokenLogps:
    """Per-token outputs ``[N, T - shift]`` of one sweep over the logits: any of ``log_probs``, ``entropy``,
    ``mean_logits``, ``is_top1`` (bool), ``log_sum_sq_probs``; None for what was not requested, 0 (False) where
    the label is ignored. ``log_probs`` and ``entropy`` carry gradients. Float32 (float64 for float64 logits).

    Vocab parallel: ``logits`` is this rank's shard ``[N, T, V_s]`` with ``vocab_parallel_group`` and
    ``vocab_start_index`` (default: equal shards in rank order), or a DTensor sharded on the vocab dimension;
    labels are global ids. Every rank gets the full (replicated) outputs; see ``fastdpo.ops.vocab_parallel``."""
    logits, _, vocab_parallel = _vocab_shard(logits, None, vocab_parallel_group, vocab_start_index, labels)
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=temperature, ignore_index=ignore_index,
                                    label_vocab=_global_vocab(vocab_parallel))  # fmt: skip
    check_outputs(outputs)
    source = logits_source(logits, shift=shift, ignore_index=ignore_index, temperature=temperature,
                           inplace_backward=inplace_backward, vocab_parallel=vocab_parallel)  # fmt: skip
    return token_outputs(source(labels, _pipeline.ordered_stats(outputs), False), outputs)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    pairs: torch.Tensor | None = None,
    vocab_parallel_group=None,
    vocab_start_index: int | None = None,
    context_parallel_group=None,
    context_parallel_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum (or, with ``average=True``, mean over scored tokens) of each sequence's label log-probs.

    logits ``[N, T, V]`` float16/bfloat16/float32/float64, labels ``[N, T]`` integer -> ``[N]`` float32
    (float64 for float64 logits); packed (``cu_seq_lens``/``position_ids``, N = 1) -> ``[S]``. A sequence with
    no scored token gives 0. Under ``torch.no_grad()`` (a reference model) nothing of size N x T x V is
    allocated. With ``ld_alpha`` the batch is read as DPO pairs (``pairs``, default sequence i with B + i) and
    the sums are LD-DPO weighted, as ``dpo_loss`` weights them (what precomputed reference sums need).

    Scaling out: ``vocab_parallel_group`` (+ ``vocab_start_index``) or a vocab-sharded DTensor: the logits are this
    rank's vocab shard (``fastdpo.ops.vocab_parallel``). ``context_parallel_group`` (``shift=False``): they are
    this rank's positions, contiguous slices in rank order or ``context_parallel_positions`` ``[T_r]``; packed
    batches give the whole row's ``cu_seq_lens`` (``fastdpo.context_parallel``). The result is replicated.
    """
    labels = _validation.empty_share_as_ids(labels, context_parallel_group is not None)
    logits, _, vocab_parallel = _vocab_shard(logits, None, vocab_parallel_group, vocab_start_index, labels)
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=temperature, ignore_index=ignore_index,
                                    label_vocab=_global_vocab(vocab_parallel),
                                    context_parallel=context_parallel_group is not None)  # fmt: skip
    layout = make_layout(logits, labels, shift=shift, cu_seq_lens=cu_seq_lens, position_ids=position_ids,
                         context_parallel_group=context_parallel_group,
                         context_parallel_positions=context_parallel_positions)  # fmt: skip
    source = logits_source(logits, shift=shift, ignore_index=ignore_index, temperature=temperature,
                           inplace_backward=inplace_backward, vocab_parallel=vocab_parallel)  # fmt: skip
    return _pipeline.sequence_sums(source, labels, layout, ignore_index=ignore_index, average=average,
                                   ld_alpha=ld_alpha, pairs=pairs)  # fmt: skip


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    ignore_index: int = -100,
    shift: bool = True,
    ref_logits: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
    return_metrics: bool = False,
    inplace_backward: bool = False,
    vocab_parallel_group=None,
    vocab_start_index: int | None = None,
    context_parallel_group=None,
    context_parallel_positions: torch.Tensor | None = None,
) -> DPOOutput:
    """DPO-family loss over TRL's concatenated (or packed) batch, from the policy logits in one fused sweep.

    logits ``[2B, T, V]`` (or ``[1, total_T, V]`` packed), labels alike. The reference is one of:
    ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` (summed log-probs, e.g. from ``sequence_logps`` under
    ``torch.no_grad()``), ``ref_logits`` (read in the same launch as the policy logits), or
    ``reference_free=True``. The loss keywords are TRL ``DPOConfig``'s (see ``fastdpo.losses``). Per-token
    statistics for ``return_metrics`` (entropy, mean logits, top-1) and ``use_weighting`` (log sum p^2) come
    from the same sweep.

    Scaling out: ``vocab_parallel_group`` (+ ``vocab_start_index``) or a vocab-sharded DTensor: the logits are this
    rank's vocab shard (``fastdpo.ops.vocab_parallel``). ``context_parallel_group`` (``shift=False``): they are
    this rank's positions, contiguous slices in rank order or ``context_parallel_positions`` ``[T_r]``; packed
    batches give the whole row's ``cu_seq_lens`` (``fastdpo.context_parallel``). The result is replicated.
    """
    cfg = LossConfig(
        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
        reference_free=reference_free, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha, use_weighting=use_weighting,
        discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
    )  # fmt: skip
    labels = _validation.empty_share_as_ids(labels, context_parallel_group is not None)
    logits, ref_logits, vocab_parallel = _vocab_shard(
        logits, ref_logits, vocab_parallel_group, vocab_start_index, labels
    )
    _validation.check_logits_labels(logits, labels, shift=shift, temperature=1.0, ignore_index=ignore_index,
                                    label_vocab=_global_vocab(vocab_parallel),
                                    context_parallel=context_parallel_group is not None)  # fmt: skip
    _validation.check_ref_logits(ref_logits, logits)
    layout = make_layout(logits, labels, shift=shift, cu_seq_lens=cu_seq_lens, position_ids=position_ids,
                         context_parallel_group=context_parallel_group,
                         context_parallel_positions=context_parallel_positions)  # fmt: skip
    source = logits_source(logits, ref_logits, shift=shift, ignore_index=ignore_index,
                           inplace_backward=inplace_backward, vocab_parallel=vocab_parallel)  # fmt: skip
    return _pipeline.preference(source, labels, layout, ref_chosen_logps, ref_rejected_logps, cfg,
                                ignore_index=ignore_index, has_inline_reference=ref_logits is not None, pairs=pairs,
                                return_metrics=return_metrics)  # fmt: skip
