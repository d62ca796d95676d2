"""Public functions of the fused-linear path: DPO from the last hidden states and the LM head, logits never
materialised (see ``fastdpo.ops.fused_linear`` for the tiling and the FLOP/byte counts).

Shapes: hidden ``[N, T, D]`` (TRL's concatenated batch, N = 2B; or ``[1, total_T, D]`` packed), weight ``[V, D]``
(the LM head's, tied to the embeddings or not), bias ``[V]`` or None, labels ``[N, T]`` as for
``fastdpo.dpo_loss``. The logits these functions score are ``f(hidden @ weight.T + bias)`` with
f(x) = c tanh(a x / c) / temperature (``logit_scale`` a, ``final_logit_softcapping`` c; without softcapping
f(x) = a x / temperature), which is how transformers' causal LMs and TRL's fused LM head define them.
Gradients flow to ``hidden``, ``weight`` and ``bias``; dW is accumulated in float32 across tiles.

Sharded LM heads are gathered for the call, as TRL does: a DTensor weight (FSDP2) through ``full_tensor()``
(differentiable: its backward hands each rank its shard of the gradient), a DeepSpeed ZeRO-3 partitioned
parameter inside ``deepspeed.zero.GatheredParameters`` in the forward and again in the backward. A head sharded
over the vocabulary for tensor parallelism (``vocab_parallel_group``) is not gathered: each rank scores its rows
(``fastdpo.ops.vocab_parallel``).
"""

from __future__ import annotations

import math

import torch

from fastdpo import _pipeline, _validation
from fastdpo._collectives import process_group
from fastdpo._logps_outputs import TokenLogps, check_outputs
from fastdpo.functional import make_layout, token_outputs
from fastdpo.losses import DPOOutput, LossConfig
from fastdpo.ops import vocab_parallel as vocab_parallel_op
from fastdpo.ops.fused_linear import FusedLinearOptions, fused_linear_logps
from fastdpo.ops.logps import TokenOutputs

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None

HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (FSDP2, tensor parallel) gathered into a plain tensor, differentiably; anything else as is."""
    if DTensor is not None and isinstance(param, DTensor):
        return param.full_tensor()
    return param


def _local(param: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor; anything else as is."""
    return param.to_local() if DTensor is not None and isinstance(param, DTensor) else param


def _check_head(name: str, hidden: torch.Tensor, weight, bias) -> None:
    prefix = "ref_" if name.startswith("ref_") else ""
    D = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != D or weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight must be a (V, D) = (V, {D}) tensor matching {name}, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")  # fmt: skip
    if weight.dtype not in HIDDEN_DTYPES or weight.device != hidden.device:
        raise ValueError(f"{prefix}weight must be float16/bfloat16/float32 on {name}'s device {hidden.device}, "
                         f"got {weight.dtype} on {weight.device}")  # fmt: skip
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or not bias.dtype.is_floating_point or bias.device != hidden.device):  # fmt: skip
        raise ValueError(f"{prefix}bias must be None or a floating ({weight.shape[0]},) tensor on {hidden.device}, "
                         f"got {getattr(bias, 'shape', type(bias).__name__)}")  # fmt: skip


def _check_inputs(hidden, weight, bias, labels, *, ndim: int, shift: bool, ignore_index: int,
                  vocab_parallel=None, context_parallel: bool = False) -> None:  # fmt: skip
    """Shapes, dtypes and devices of a fused-linear call; label values as ``fastdpo.dpo_loss`` checks them (against
    the global vocab size when the head is a vocab shard). A context-parallel rank may hold no position."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"hidden and labels must be tensors, got {type(hidden).__name__} and {type(labels).__name__}")
    shape = "(N, T, D)" if ndim == 3 else "(N, D)"
    # per-token calls may have no rows (TRL passes only the scored rows, and a micro-batch can have none)
    empty = hidden.shape[-1] == 0 if ndim == 2 else (hidden.shape[0] == 0 or hidden.shape[-1] == 0
                                                     or (hidden.shape[1] == 0 and not context_parallel))
    if hidden.ndim != ndim or hidden.dtype not in HIDDEN_DTYPES or empty:
        raise ValueError(f"hidden must be a non-empty {shape} float16/bfloat16/float32 tensor, got shape "
                         f"{tuple(hidden.shape)} and dtype {hidden.dtype}")  # fmt: skip
    _check_head("hidden", hidden, weight, bias)
    name = "labels" if ndim == 3 else "targets"
    _validation.check_label_dtype(name, labels)
    _validation.check_ignore_index(ignore_index)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]) or labels.device != hidden.device:
        raise ValueError(f"{name} must have shape {tuple(hidden.shape[:-1])} on {hidden.device} to match hidden, "
                         f"got {tuple(labels.shape)} on {labels.device}")  # fmt: skip
    if ndim == 3 and hidden.shape[1] < (0 if context_parallel else 1 + int(shift)):
        raise ValueError(f"hidden needs T >= {1 + int(shift)} positions with shift={shift}, got {tuple(hidden.shape)}")
    rows = labels if ndim == 3 else labels.unsqueeze(0)
    V = weight.shape[0] if vocab_parallel is None else vocab_parallel[2]
    _validation.check_label_values(rows, V, ignore_index, first_scored=int(shift) if ndim == 3 else 0)


def _lm_head(weight, bias, group, start, hidden=None, labels=None):
    """(weight, bias, vocab_parallel) of a call. Without ``group`` a DTensor head is gathered: under FSDP2 each rank
    holds a slice of the parameter but scores its own batch. With ``group`` the weight is this rank's rows of the head
    and the hidden states are replicated over the group: a plain ``[V_s, D]`` tensor (first row ``start``, default
    rank * V_s), or a ``Shard(0)`` DTensor on a 1-D mesh (pass the mesh, or its group, as ``group``). Every rank of
    the group must pass hidden states of the same leading dimensions and the same ``labels`` (checked with the
    layout). ``vocab_parallel`` is ``(group, start, V)``, or None."""
    if group is None or not isinstance(weight, torch.Tensor):
        if start is not None:
            raise ValueError("vocab_start_index needs vocab_parallel_group")
        return _full(weight), _full(bias), None
    if DTensor is not None and isinstance(weight, DTensor):
        if start is not None:
            raise ValueError("a DTensor weight carries its own offsets: do not pass vocab_start_index with it")
        weight, group, start, V_total = vocab_parallel_op.head_from_dtensor(weight, group)
        bias = bias.to_local() if DTensor is not None and isinstance(bias, DTensor) else bias
        return weight, bias, (group, start, V_total)
    group = process_group(group, "vocab_parallel_group")  # a 1-D DeviceMesh: its group
    start, V_total = vocab_parallel_op.shard_layout(weight.shape[0], group, start, weight.device, hidden, labels,
                                                    vocab_parallel_op.vocab_sample(weight, 0))  # fmt: skip
    return weight, bias, (group, start, V_total)


def _options(ignore_index, temperature, logit_scale, final_logit_softcapping, tile_elements, stats=()):
    def positive(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf

    for name, value in (("temperature", temperature), ("logit_scale", logit_scale)):
        if not positive(value):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if final_logit_softcapping is not None and not positive(final_logit_softcapping):
        raise ValueError(f"final_logit_softcapping must be None or finite and > 0, got {final_logit_softcapping}")
    if tile_elements is not None and (not isinstance(tile_elements, int) or tile_elements < 1):
        raise ValueError(f"tile_elements must be None or a positive int (logits per tile), got {tile_elements!r}")
    return FusedLinearOptions(
        ignore_index=ignore_index, temperature=float(temperature), logit_scale=float(logit_scale),
        softcap=None if final_logit_softcapping is None else float(final_logit_softcapping), stats=stats,
        tile_elements=tile_elements,
    )  # fmt: skip


def _project(hidden, weight, bias, targets, options: FusedLinearOptions, vocab_parallel):
    """The fused-linear op on rows ``hidden [R, D]``, over the whole head or (``vocab_parallel``) this rank's shard."""
    if vocab_parallel is None:
        return fused_linear_logps(hidden, weight, bias, targets, options)
    return vocab_parallel_op.fused_linear_logps(hidden, weight, bias, targets, options, *vocab_parallel)


def hidden_source(hidden, weight, bias, options: FusedLinearOptions, *, shift: bool, reference=None,
                  vocab_parallel=None):  # fmt: skip
    """A ``_pipeline.TokenSource`` projecting ``hidden [N, T, D]`` through the head (or this rank's vocab shard of it);
    ``reference``: ``(ref_hidden, ref_weight, ref_bias)`` scored forward-only in the same call."""
    N, T, D = hidden.shape

    def per_token(h, w, b, targets, stats):
        call_options = options.with_stats(stats)
        logp, entropy, stat = _project(h.reshape(N * T, D), w, b, targets, call_options, vocab_parallel)
        rows = slice(0, T - int(shift))
        return (logp.view(N, T)[:, rows], None if entropy is None else entropy.view(N, T)[:, rows],
                None if stat is None else stat.view(stat.shape[0], N, T)[:, :, rows])  # fmt: skip

    def run(labels: torch.Tensor, stats: tuple[str, ...], with_reference: bool) -> TokenOutputs:
        # Row t of hidden scores labels[:, t + shift]; the last `shift` rows have no label.
        targets = torch.nn.functional.pad(labels[:, int(shift) :], (0, int(shift)), value=options.ignore_index)
        targets = targets.reshape(N * T)
        logp, entropy, stat = per_token(hidden, weight, bias, targets, stats)
        ref_logp = None
        if with_reference:
            with torch.no_grad():
                ref_logp = per_token(*reference, targets, ())[0]
        return TokenOutputs(logp, entropy, stat, ref_logp, None)

    return run


def _reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight, bias, vocab_parallel=None):
    """(ref_hidden, ref_weight, ref_bias) checked, the head defaulting to the policy's (a frozen shared head). Under
    vocab parallelism a separate reference head is sharded as the policy's: its local rows (a DTensor's
    ``to_local``)."""
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight/ref_bias need ref_hidden (the reference model's last hidden states)")
        return None
    if (not isinstance(ref_hidden, torch.Tensor) or ref_hidden.shape != hidden.shape
            or ref_hidden.device != hidden.device):  # fmt: skip
        raise ValueError(f"ref_hidden must be a tensor of hidden's shape {tuple(hidden.shape)} on {hidden.device}, got "
                         f"{getattr(ref_hidden, 'shape', type(ref_hidden).__name__)}")  # fmt: skip
    if ref_hidden.dtype not in HIDDEN_DTYPES:
        raise ValueError(f"ref_hidden must be float16/bfloat16/float32, got {ref_hidden.dtype}")
    if ref_weight is None:  # the policy's head, frozen for the reference (PEFT over a shared head)
        ref_weight = weight
        ref_bias = bias if ref_bias is None else ref_bias
    resolve = _full if vocab_parallel is None else _local
    ref_weight, ref_bias = resolve(ref_weight), resolve(ref_bias)
    _check_head("ref_hidden", ref_hidden, ref_weight, ref_bias)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the policy head's vocab size {weight.shape[0]}, "
                         f"got {ref_weight.shape[0]}")  # fmt: skip
    return ref_hidden.detach(), ref_weight.detach(), None if ref_bias is None else ref_bias.detach()


def fused_linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    outputs: tuple[str, ...] = ("log_probs",),
    tile_elements: int | None = None,
    vocab_parallel_group=None,
    vocab_start_index: int | None = None,
) -> TokenLogps:
    """Per-token outputs of ``f(hidden @ weight.T + bias)`` at ``targets``, one sweep per tile of scored rows.

    hidden ``[N, D]``, targets ``[N]`` (already aligned: no shift) -> ``TokenLogps`` fields ``[N]`` float32, 0
    (False) where the target is ``ignore_index``; any of ``log_probs``, ``entropy``, ``mean_logits``,
    ``is_top1``, ``log_sum_sq_probs`` (what TRL's ``ChunkedLogProbFunction`` returns). ``log_probs`` and
    ``entropy`` carry gradients. ``tile_elements`` bounds the logits held at once (default: 2^26 on CUDA).

    Vocab parallel: ``weight`` (and ``bias``) are this rank's rows of the head, ``hidden`` is replicated over
    ``vocab_parallel_group``; see ``fused_linear_dpo_loss``.
    """
    weight, bias, vocab_parallel = _lm_head(weight, bias, vocab_parallel_group, vocab_start_index, hidden, targets)
    _check_inputs(hidden, weight, bias, targets, ndim=2, shift=False, ignore_index=ignore_index,
                  vocab_parallel=vocab_parallel)  # fmt: skip
    check_outputs(outputs)
    options = _options(ignore_index, temperature, logit_scale, final_logit_softcapping, tile_elements,
                       _pipeline.ordered_stats(outputs))  # fmt: skip
    logp, entropy, stats = _project(hidden, weight, bias, targets, options, vocab_parallel)
    return token_outputs(TokenOutputs(logp, entropy, stats, None, None), outputs)


def fused_linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    average: bool = False,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    pairs: torch.Tensor | None = None,
    tile_elements: int | None = None,
    context_parallel_group=None,
    context_parallel_positions: torch.Tensor | None = None,
    vocab_parallel_group=None,
    vocab_start_index: int | None = None,
) -> torch.Tensor:
    """``fastdpo.sequence_logps`` of ``f(hidden @ weight.T + bias)``: hidden ``[N, T, D]`` -> ``[S]`` float32.

    Under ``torch.no_grad()`` (a reference model) it is one forward pass over tiles of scored tokens."""
    labels = _validation.empty_share_as_ids(labels, context_parallel_group is not None)
    weight, bias, vocab_parallel = _lm_head(weight, bias, vocab_parallel_group, vocab_start_index, hidden, labels)
    _check_inputs(hidden, weight, bias, labels, ndim=3, shift=shift, ignore_index=ignore_index,
                  vocab_parallel=vocab_parallel, context_parallel=context_parallel_group is not None)  # fmt: skip
    options = _options(ignore_index, temperature, logit_scale, final_logit_softcapping, tile_elements)
    layout = make_layout(hidden, labels, shift=shift, cu_seq_lens=cu_seq_lens, position_ids=position_ids,
                         context_parallel_group=context_parallel_group,
                         context_parallel_positions=context_parallel_positions, name="hidden")  # fmt: skip
    source = hidden_source(hidden, weight, bias, options, shift=shift, vocab_parallel=vocab_parallel)
    return _pipeline.sequence_sums(source, labels, layout, ignore_index=ignore_index, average=average,
                                   ld_alpha=ld_alpha, pairs=pairs)  # fmt: skip


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
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
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    pairs: torch.Tensor | None = None,
    return_metrics: bool = False,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    tile_elements: int | None = None,
    context_parallel_group=None,
    context_parallel_positions: torch.Tensor | None = None,
    vocab_parallel_group=None,
    vocab_start_index: int | None = None,
) -> DPOOutput:
    """``fastdpo.dpo_loss`` of ``f(hidden @ weight.T + bias)`` without the logits; the same loss family,
    metrics, packing and pairing keywords.

    The reference is ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]``, or ``ref_hidden`` (the reference
    model's last hidden states, scored forward-only in the same call through ``ref_weight``/``ref_bias``,
    default: the policy's head, as with a PEFT adapter over a frozen head), or ``reference_free=True``.
    ``dpo_loss``'s ``ref_logits`` and ``inplace_backward`` have no meaning here (there are no logits).

    Vocab (tensor) parallel: ``weight`` ``[V_s, D]`` (and ``bias`` ``[V_s]``) are this rank's rows of the head,
    first row ``vocab_start_index`` (default: equal shards in rank order), or a ``Shard(0)`` DTensor with
    ``vocab_parallel_group`` its 1-D mesh; ``hidden`` and the global label ids are replicated over the group. Every
    rank gets the unsharded loss; the gradients of ``weight``/``bias`` are this rank's slices of the full ones, and
    the gradient of ``hidden`` is the full gradient on every rank (all-reduced inside, as Megatron's
    ``ColumnParallelLinear`` and torch's ``ColwiseParallel`` do for their replicated input). Without
    ``vocab_parallel_group`` a DTensor head is gathered instead (FSDP2). Combines with ``context_parallel_group``.
    """
    cfg = LossConfig(
        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
        reference_free=reference_free, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha, use_weighting=use_weighting,
        discopop_tau=discopop_tau, simpo_gamma=simpo_gamma,
    )  # fmt: skip
    labels = _validation.empty_share_as_ids(labels, context_parallel_group is not None)
    weight, bias, vocab_parallel = _lm_head(weight, bias, vocab_parallel_group, vocab_start_index, hidden, labels)
    _check_inputs(hidden, weight, bias, labels, ndim=3, shift=shift, ignore_index=ignore_index,
                  vocab_parallel=vocab_parallel, context_parallel=context_parallel_group is not None)  # fmt: skip
    reference = _reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight, bias, vocab_parallel)
    options = _options(ignore_index, temperature, logit_scale, final_logit_softcapping, tile_elements)
    layout = make_layout(hidden, labels, shift=shift, cu_seq_lens=cu_seq_lens, position_ids=position_ids,
                         context_parallel_group=context_parallel_group,
                         context_parallel_positions=context_parallel_positions, name="hidden")  # fmt: skip
    source = hidden_source(hidden, weight, bias, options, shift=shift, reference=reference,
                           vocab_parallel=vocab_parallel)  # fmt: skip
    return _pipeline.preference(source, labels, layout, ref_chosen_logps, ref_rejected_logps, cfg,
                                ignore_index=ignore_index, has_inline_reference=reference is not None, pairs=pairs,
                                return_metrics=return_metrics)  # fmt: skip
