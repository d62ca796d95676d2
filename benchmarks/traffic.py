"""Bytes each implementation moves through memory per call: the byte model behind the `gbps` column.

A model, not a measurement: it counts passes over the N x V logits from each implementation's source, assuming
every eager op reads each input once and writes its output once (a row that a kernel re-reads while it is
still in cache counts once). Check a figure on the GPU with Nsight Compute's ``dram__bytes`` before trusting
it to a few percent. ``benchmarks/NOTES.md`` derives each line.
"""

from __future__ import annotations

import torch

MODES = ("fwd", "fwd_bwd")
FLOAT32_BYTES = 4


def _passes(impl: str, mode: str, b: int) -> int:
    """Bytes per logit for ``impl`` in ``mode`` with ``b``-byte logits (see ``bytes_moved``)."""
    f = FLOAT32_BYTES
    up = 0 if b == f else b + f  # `.float()` of low-precision logits: read b, write f (backward: read f, write b)
    one_pass = {"fwd": b, "fwd_bwd": 3 * b}
    table = {
        "floor": one_pass,
        "fastdpo": one_pass,
        "fastdpo-inplace": one_pass,
        "fastdpo-tp1": one_pass,
        "trl-triton": one_pass,
        "quack": one_pass,
        "quack-inplace": one_pass,
        # Assumed: inductor fuses the graph to one online-softmax read (and one read + write backward).
        "compile": one_pass,
        "compile-max-autotune": one_pass,
        # fwd_bwd: the forward kernel reads each row twice and writes the gradient into the logits (3b), then
        # backward scales it by the upstream gradient out of place (read b, write b).
        "liger": {"fwd": b, "fwd_bwd": 5 * b},
        # .float() copy, log_softmax (read f, write f); backward: gather's zero-filled grad (write f),
        # log_softmax backward (read 2f, write f), cast back to the logits' dtype.
        "eager": {"fwd": up + 2 * f, "fwd_bwd": up + 2 * f + f + 3 * f + up},
    }
    if b == f:
        # fp32: gather + per-sequence logsumexp = amax (r), x - max (r, w), exp_ (r, w), sum (r); backward:
        # (x - lse) (r, w), exp (r, w), * grad (r, w), gather's zero-filled grad (w), sum of the two (r 2, w),
        # and the per-sequence loop's unbind backward stacks the sequences' gradients (r, w).
        table["trl-selective"] = {"fwd": 6 * f, "fwd_bwd": 6 * f + 6 * f + f + 3 * f + 2 * f}
    else:
        # bf16/fp16: per-sequence log_softmax in the logits' dtype (r, w); backward: gather's zero-filled grad
        # (w), log_softmax backward (read 2b, write b), unbind's backward stacking the sequences (r, w).
        table["trl-selective"] = {"fwd": 2 * b, "fwd_bwd": 2 * b + b + 3 * b + 2 * b}
    if impl not in table:
        raise KeyError(f"no byte model for implementation {impl!r}; known: {sorted(table)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return table[impl][mode]


def bytes_moved(impl: str, mode: str, N: int, V: int, dtype: torch.dtype) -> int:
    """Bytes read plus written over the logits by one call of ``impl`` in ``mode`` (labels and outputs of size
    O(N) are left out: under 0.01% of the total at V >= 1000).

    With b = bytes per logit (2 for bf16/fp16, 4 for fp32), f = 4 (a float32 copy) and
    u = b + f for bf16/fp16 logits (the `.float()` copy, read b + write f), u = 0 for fp32 logits::

        impl                                          fwd              fwd_bwd
        floor, fastdpo(-inplace), trl-triton,         N V b            3 N V b       (1 read; + 1 read, 1 write)
          quack(-inplace), compile(-max-autotune)*
        liger                                         N V b            5 N V b
        eager                                         N V (u + 2f)     N V (2u + 6f)
        trl-selective, bf16/fp16                      2 N V b          8 N V b
        trl-selective, fp32                           6 N V f          18 N V f

    (*) compile is assumed fused down to the floor; the model cannot see inductor's choices.
    The floor is what any exact implementation must move: read the logits once forward, then read them once
    and write the gradient once backward.
    """
    b = torch.empty((), dtype=dtype).element_size()
    return _passes(impl, mode, b) * N * V
