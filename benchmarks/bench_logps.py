"""pytest-benchmark for the log-prob implementations: provider x size x mode, on identical inputs.

    pytest benchmarks/ -q                          # time them (GPU: PYTEST_SIZES_GPU; CPU: tiny sizes)
    pytest benchmarks/ -q --benchmark-disable      # smoke test: one checked call per case (what CI runs)

Each case is checked against the float64 reference before it is timed; the timed call synchronises the device
inside itself; ``benchmark.extra_info`` records bytes (``traffic.bytes_moved``), the floor measured in the same
session, GB/s and the floor fraction (when timing is on), the reference errors, and peak extra MB (GPU).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import shapes, timing
from benchmarks.providers import NAMES, check_accuracy, get_providers, run, shutdown
from benchmarks.traffic import MODES, bytes_moved

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = shapes.PYTEST_SIZES_GPU if DEVICE.type == "cuda" else shapes.PYTEST_SIZES_CPU
PROVIDERS = get_providers(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    """fastdpo-tp1's process group lives for the module, then is destroyed (a live NCCL group can hang the exit)."""
    yield
    shutdown()


@pytest.fixture(scope="module", params=SIZES, ids=[f"N{N}-V{V}" for N, V in SIZES])
def case(request):
    """(size, inputs, floor) for one bf16 size, shared by every provider and mode."""
    if DEVICE.type == "cpu":
        timing.keep_freed_memory()
    torch.manual_seed(0)
    N, V = request.param
    size = shapes.Size(N, V, "bfloat16")
    floor = timing.measure_floor(N * V, size.torch_dtype, DEVICE)
    return size, shapes.make_inputs(size, DEVICE), floor


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", NAMES)
def test_logps(benchmark, impl, mode, case):
    provider = PROVIDERS[impl]
    if provider.unavailable:
        pytest.skip(provider.unavailable)
    size, inputs, floor = case
    err, grad_err = check_accuracy(provider, mode, *inputs)

    def call():
        out = run(provider, mode, *inputs)
        timing.synchronize(DEVICE)
        return out

    benchmark(call)
    nbytes = bytes_moved(impl, mode, size.N, size.V, size.torch_dtype)
    info = {"bytes": nbytes, "floor_ms": floor.ms(mode), "err_logps": err, "err_grad": grad_err}
    if benchmark.stats is not None:  # None under --benchmark-disable
        ms = benchmark.stats.stats.median * 1e3
        info |= {"ms_p50": ms, "gbps": nbytes / ms / 1e6, "floor_fraction": floor.ms(mode) / ms}
    info["peak_extra_mb"] = timing.peak_extra_mb(call, DEVICE)
    benchmark.extra_info.update(info)
    if provider.clobbers_logits:
        inputs[0].normal_(std=shapes.LOGIT_SCALE)
