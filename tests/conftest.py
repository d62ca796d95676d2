"""Test setup. Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which is
chosen when a kernel is decorated, so TRITON_INTERPRET must be set before fastdpo is imported."""

import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

# Fresh inputs every run; the seed is printed in the header so a failure can be replayed with FASTDPO_TEST_SEED.
SESSION_SEED = int(os.environ.get("FASTDPO_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"fastdpo: FASTDPO_TEST_SEED={SESSION_SEED}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED + zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Run a test on the Triton kernels and on the chunked PyTorch path."""
    monkeypatch.setenv("FASTDPO_BACKEND", request.param)
    return request.param


@pytest.fixture(params=["triton", "torch"])
def cpu_backend(request, monkeypatch):
    """``backend`` for tests whose tensors are CPU tensors (gloo process groups): their Triton runs need the
    interpreter, which is on only where no GPU is (a CUDA session covers the kernels through ``device``)."""
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors through Triton need TRITON_INTERPRET=1 (set where no GPU is)")
    monkeypatch.setenv("FASTDPO_BACKEND", request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
