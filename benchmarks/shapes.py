"""Every size the benchmarks use: named vocabularies, token sweeps and the small CPU sizes.

No other benchmark file holds a size. N is the number of scored tokens; the logits are laid out as
``[N / T, T, V]`` sequences of ``T = min(N, SEQ_LEN)`` tokens, every token scored (``shift=False``), and every
implementation gets that same tensor (a 2-D view ``[N, V]`` where its API wants rows).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from fastdpo._testing import make_labels

# Vocabulary sizes of the model families DPO is run on (the sweep).
VOCABS = {"llama2": 32000, "llama3": 128256, "qwen2": 151936, "gemma": 256000}
# Scored tokens per call: 256 leaves most of a GPU idle with one program per row; 32k is a large DPO batch.
TOKENS = (256, 2048, 8192, 32768)
# bf16 over the whole sweep, fp32 at this one (N, V) point.
FULL_DTYPES = ("bfloat16",)
FP32_POINT = (8192, VOCABS["llama3"])

# `--quick`: sizes a 2-core CPU sweeps in under a minute with the eager and fastdpo providers.
QUICK_VOCABS = (1000, 8000, 32000)
QUICK_TOKENS = (256, 1024)
QUICK_DTYPES = ("bfloat16",)

# Tokens per sequence: a typical DPO completion budget; TRL's PyTorch path loops over these sequences.
SEQ_LEN = 1024
# Tokens of the first sequence that the float64 accuracy check runs on (a slice; the full size would not fit).
CHECK_TOKENS = 64
# Random logits are N(0, LOGIT_SCALE^2): a peaked but not saturated softmax, like trained LM heads.
LOGIT_SCALE = 3.0

# The (N, V) each plot holds fixed while the other axis varies (the headline size), when present.
PLOT_N = 8192
PLOT_V = VOCABS["llama3"]

# pytest-benchmark sizes (N, V): tiny on CPU so `pytest benchmarks/ --benchmark-disable` is a seconds-long
# smoke test; the headline size on a GPU.
PYTEST_SIZES_CPU = ((128, 1000),)
PYTEST_SIZES_GPU = ((2048, VOCABS["llama2"]), (PLOT_N, PLOT_V))

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Size:
    """One benchmark size: N scored tokens of V-way logits in ``dtype`` (a key of ``DTYPES``)."""

    N: int
    V: int
    dtype: str

    def layout(self) -> tuple[int, int]:
        """(sequences S, tokens per sequence T) with S * T = N."""
        T = min(self.N, SEQ_LEN)
        if self.N % T:
            raise ValueError(f"N = {self.N} must be a multiple of {SEQ_LEN} (tokens per sequence) or below it")
        return self.N // T, T

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def sweep(quick: bool, Ns=None, Vs=None, dtypes=None) -> list[Size]:
    """The sizes of one run: the quick or full sweep, with any of N, V and dtype overridden.

    The full sweep is bf16 over TOKENS x VOCABS plus fp32 at FP32_POINT; naming dtypes replaces both with the
    plain product of the N, V and dtype lists.
    """
    Ns = tuple(Ns or (QUICK_TOKENS if quick else TOKENS))
    Vs = tuple(Vs or (QUICK_VOCABS if quick else tuple(VOCABS.values())))
    sizes = [Size(N, V, d) for d, V, N in itertools.product(dtypes or (QUICK_DTYPES if quick else FULL_DTYPES), Vs, Ns)]
    if not (quick or dtypes):
        N, V = FP32_POINT
        if N in Ns and V in Vs:
            sizes.append(Size(N, V, "float32"))
    for size in sizes:
        size.layout()  # raises on an N that does not split into sequences, before anything runs
    return sizes


def priority(sizes: list[Size]) -> list[Size]:
    """The order a time-limited run measures ``sizes`` in, most telling first: the headline size (the issue's
    target, PLOT_N x PLOT_V in bf16), the fp32 point, then the plots' two axes (N = PLOT_N across V, then
    V = PLOT_V across N), then the rest in sweep order. A sweep cut short still has its table and plots."""

    def rank(size: Size) -> int:
        if (size.N, size.V, size.dtype) == (PLOT_N, PLOT_V, "bfloat16"):
            return 0
        if size.dtype == "float32" and (size.N, size.V) == FP32_POINT:
            return 1
        return 2 if size.N == PLOT_N else 3 if size.V == PLOT_V else 4

    return sorted(sizes, key=rank)  # stable: sweep order within a rank


def make_inputs(size: Size, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [S, T, V] ~ N(0, LOGIT_SCALE^2) drawn in the size's dtype (no float32 staging copy: at the largest
    size that copy alone is 34 GB), labels [S, T] all scored, upstream gradient [S] float32."""
    S, T = size.layout()
    logits = torch.empty(S, T, size.V, dtype=size.torch_dtype, device=device).normal_(std=LOGIT_SCALE)
    labels = make_labels(S, T, size.V, device, prompt_frac=0.0)
    return logits, labels, torch.randn(S, device=device)
