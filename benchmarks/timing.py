"""Timing, peak memory and the bandwidth floor, on a CUDA device or on the CPU.

GPU: warm-up, then at least ``GPU_MIN_REPS`` calls, each bracketed by CUDA events with L2 flushed before it
(a write over ``L2_FLUSH_FACTOR`` times the L2 size), so every call reads its inputs from HBM as a training
step would. Flushing rather than rotating several copies of the inputs through more memory than L2 holds: the
effect on the timed call is the same, and at the largest size one copy of the logits is 16.8 GB.
Like ``triton.testing.do_bench``, but with a fixed minimum count of reps rather than a time budget,
because the big sizes take tens of milliseconds a call. Peak memory: ``torch.cuda.max_memory_allocated``
during one call minus what was allocated before it (the inputs).

CPU: ``time.perf_counter`` around each call after a warm-up; no allocator statistics exist for CPU tensors
(tracemalloc does not see torch's allocations), so peak memory is reported as None.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP = 2
GPU_MIN_REPS, GPU_MAX_REPS = 20, 200
CPU_MIN_REPS, CPU_MAX_REPS = 3, 30
# Reps are added up to this much measured time per case (ms): a cheap case gets more reps, an expensive one
# keeps the minimum.
GPU_TARGET_MS, CPU_TARGET_MS = 200.0, 600.0
L2_FLUSH_FACTOR = 4
MB = 2**20
# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_BYTES = 2**30


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call at the 20th, 50th and 80th percentiles, and the number of timed reps."""

    p20: float
    p50: float
    p80: float
    reps: int


def device_name(device: torch.device) -> str:
    """torch's name for a GPU; the processor's name for the CPU (platform's, else /proc/cpuinfo's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name or platform.machine() or "cpu"


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, as torch's CUDA caching allocator does; True if it took effect.

    glibc hands every allocation above 32 MB back to the OS when it is freed, so on the CPU each call
    page-faults its float32 working copies in again: the eager forward at N = 1024, V = 8000 took 18 ms that
    way against 2.7 ms once memory is reused. Serving all allocations from the heap (no mmap) and trimming it
    only above 1 GiB of free space times the steady state a training loop sees. No-op outside glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(samples: list[float]) -> Timing:
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], 1)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(q[1], statistics.median(samples), q[7], len(samples))


def bench(fn: Callable[[], object], device: torch.device) -> Timing:
    """Time ``fn`` (which need not synchronise: this does); its result is dropped after each call."""
    for _ in range(WARMUP):
        fn()
    synchronize(device)
    if device.type != "cuda":
        first = time.perf_counter()
        fn()
        estimate = (time.perf_counter() - first) * 1e3
        reps = int(min(CPU_MAX_REPS, max(CPU_MIN_REPS, CPU_TARGET_MS // max(estimate, 1e-3))))
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return _quantiles(samples)

    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    flush = torch.empty(L2_FLUSH_FACTOR * l2, dtype=torch.int8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    reps = int(min(GPU_MAX_REPS, max(GPU_MIN_REPS, GPU_TARGET_MS // max(start.elapsed_time(end), 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """MB allocated at the peak of one call of ``fn`` (its outputs included) beyond what was live before it."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - before) / MB


@dataclass(frozen=True)
class Floor:
    """The measured floor for one size: ms of one read (a sum) and of one read + one write (a copy)."""

    read_ms: float
    copy_ms: float
    nbytes: int

    def ms(self, mode: str) -> float:
        """Forward: one read. Forward + backward: one read, then one read and one write."""
        return self.read_ms if mode == "fwd" else self.read_ms + self.copy_ms

    @property
    def read_gbps(self) -> float:
        return self.nbytes / self.read_ms / 1e6

    @property
    def copy_gbps(self) -> float:
        return 2 * self.nbytes / self.copy_ms / 1e6


def measure_floor(numel: int, dtype: torch.dtype, device: torch.device) -> Floor:
    """Time a plain sum over, and a ``copy_`` between, buffers of ``numel`` elements of ``dtype``: the best
    this device does for one read and for one read + one write of the logits, measured in the same run."""
    src = torch.empty(numel, dtype=dtype, device=device).normal_()
    read = bench(lambda: src.sum(), device)
    dst = torch.empty_like(src)
    copy = bench(lambda: dst.copy_(src), device)
    return Floor(read.p50, copy.p50, numel * torch.empty((), dtype=dtype).element_size())
