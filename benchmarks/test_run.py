"""Tests of the benchmark harness itself: the quick run's files and keys, merging, failure handling, byte model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import providers, run, shapes, timing
from benchmarks.traffic import MODES, bytes_moved

CPU = torch.device("cpu")
# The keys the issue requires of every timed row.
REQUIRED = {
    "impl", "mode", "N", "V", "dtype", "device", "ms_p50", "ms_p20", "ms_p80", "gbps", "floor_ms", "floor_fraction",
    "peak_extra_mb", "torch", "triton", "git_commit", "command",
}  # fmt: skip
TINY = ["--quick", "--N", "256", "--V", "1000", "--no-plots"]


def _results(out):
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


def test_quick_run_writes_json_and_csv_with_every_key(tmp_path):
    assert run.main([*TINY, "--impl", "eager", "fastdpo", "--out", str(tmp_path)]) == 0
    path, data = _results(tmp_path)
    rows = data["rows"]
    assert sorted((r["impl"], r["mode"]) for r in rows) == sorted(
        (impl, mode) for impl in ("eager", "fastdpo") for mode in MODES
    )
    for row in rows:
        assert REQUIRED <= row.keys(), REQUIRED - row.keys()
        assert row["status"] == "ok"
        assert row["ms_p20"] <= row["ms_p50"] <= row["ms_p80"]
        assert row["floor_fraction"] == pytest.approx(row["floor_ms"] / row["ms_p50"])
        assert "--impl eager fastdpo" in row["command"]
    with open(path.with_suffix(".csv")) as f:
        header = next(csv.reader(f))
    assert REQUIRED <= set(header)


def test_runs_merge_into_one_file_and_fresh_replaces_it(tmp_path):
    run.main([*TINY, "--impl", "eager", "--mode", "fwd", "--out", str(tmp_path)])
    run.main([*TINY, "--impl", "fastdpo", "--mode", "fwd", "--out", str(tmp_path)])
    assert {r["impl"] for r in _results(tmp_path)[1]["rows"]} == {"eager", "fastdpo"}
    run.main([*TINY, "--impl", "fastdpo", "--mode", "fwd", "--out", str(tmp_path), "--fresh"])
    assert {r["impl"] for r in _results(tmp_path)[1]["rows"]} == {"fastdpo"}


def test_merged_runs_keep_what_was_unavailable(tmp_path):
    """A second run into the same file (gpu_session.sh's torch.compile step) keeps the first run's list of what
    could not run, less what it ran itself."""
    row = {"impl": "eager", "mode": "fwd", "N": 1, "V": 2, "dtype": "bfloat16"}
    run.write_results([row], {"quack": "not installed", "liger": "not installed"}, tmp_path, "x", fresh=False)
    run.write_results([row | {"impl": "liger"}], {}, tmp_path, "x", fresh=False)
    assert json.loads((tmp_path / "x.json").read_text())["unavailable"] == {"quack": "not installed"}


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    run.main(["--quick", "--N", "256", "--V", "1000", "8000", "--impl", "eager", "--out", str(tmp_path)])
    assert len(list(tmp_path.glob("*.png"))) == len(MODES)


def test_a_wrong_provider_is_reported_failed_and_not_timed():
    torch.manual_seed(0)
    size = shapes.Size(256, 1000, "bfloat16")
    inputs = shapes.make_inputs(size, CPU)
    floor = timing.measure_floor(size.N * size.V, size.torch_dtype, CPU)
    # A shift bug: each token scored against its neighbour's label.
    shifted = providers.Provider("eager", lambda logits, labels: providers.eager(logits, labels.roll(1, dims=1)))
    row = run.measure_case(shifted, "fwd_bwd", size, inputs, floor, CPU)
    assert row["status"] == "failed" and "ms_p50" not in row
    assert "accuracy check failed" in row["note"]


def test_every_provider_is_listed_and_has_a_byte_model():
    assert tuple(providers.get_providers(CPU)) == providers.NAMES
    for name in providers.NAMES:
        for mode in MODES:
            floor = bytes_moved("floor", mode, 8, 1000, torch.bfloat16)
            assert bytes_moved(name, mode, 8, 1000, torch.bfloat16) >= floor


def test_byte_model_matches_the_pass_counts():
    pass_bytes = 8192 * 128256 * 2  # one pass over bf16 logits
    assert bytes_moved("floor", "fwd", 8192, 128256, torch.bfloat16) == pass_bytes
    assert bytes_moved("fastdpo", "fwd_bwd", 8192, 128256, torch.bfloat16) == 3 * pass_bytes
    assert bytes_moved("eager", "fwd_bwd", 8192, 128256, torch.bfloat16) == 18 * pass_bytes
    assert bytes_moved("eager", "fwd_bwd", 8192, 128256, torch.float32) == 6 * 2 * pass_bytes
    assert bytes_moved("trl-selective", "fwd_bwd", 8192, 128256, torch.bfloat16) == 8 * pass_bytes  # unbind's stack
    assert bytes_moved("trl-selective", "fwd_bwd", 8192, 128256, torch.float32) == 18 * 2 * pass_bytes


def test_sizes_split_into_sequences():
    assert shapes.Size(32768, 1000, "bfloat16").layout() == (32, shapes.SEQ_LEN)
    assert shapes.Size(256, 1000, "bfloat16").layout() == (1, 256)
    with pytest.raises(ValueError, match="multiple"):
        shapes.sweep(quick=True, Ns=[1500])
    full = shapes.sweep(quick=False)
    assert len(full) == len(shapes.TOKENS) * len(shapes.VOCABS) + 1
    assert full[-1] == shapes.Size(*shapes.FP32_POINT, "float32")


def test_budget_order_puts_the_headline_size_first_then_fp32_then_the_plot_axes():
    sizes = shapes.sweep(False)
    ordered = shapes.priority(sizes)
    assert (ordered[0].N, ordered[0].V, ordered[0].dtype) == (shapes.PLOT_N, shapes.PLOT_V, "bfloat16")
    assert ordered[1] == shapes.Size(*shapes.FP32_POINT, "float32")
    axes = len(shapes.VOCABS) - 1 + len(shapes.TOKENS) - 1  # the plots' other points along N = PLOT_N and V = PLOT_V
    assert all(s.N == shapes.PLOT_N or s.V == shapes.PLOT_V for s in ordered[2 : 2 + axes])
    assert sorted(ordered, key=sizes.index) == sizes  # the same sizes, nothing lost or repeated


def test_a_provider_that_raises_gets_an_error_row_with_the_floor(tmp_path):
    """An implementation's own assertion (QuACK's input checks are asserts) is an error of the case, not an
    accuracy failure, and its row keeps the size's floor."""
    size = shapes.Size(256, 1000, "bfloat16")
    inputs = shapes.make_inputs(size, CPU)
    floor = timing.measure_floor(size.N * size.V, size.torch_dtype, CPU)

    def asserts(logits, labels):
        raise AssertionError("Input must be 2D")

    row = run.guarded_case(providers.Provider("eager", asserts), "fwd", size, inputs, floor, CPU)
    assert row["status"] == "error" and "Input must be 2D" in row["note"]
    assert row["floor_ms"] == floor.ms("fwd") and row["S"] * row["T"] == size.N


def test_commit_from_the_environment_outside_a_checkout(monkeypatch, tmp_path):
    """The GPU machine receives the working tree without .git: the launcher passes the commit."""
    monkeypatch.setattr(run, "RESULTS_DIR", tmp_path / "benchmarks" / "results")
    (tmp_path / "benchmarks").mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("FASTDPO_GIT_COMMIT", "0123abc")
    assert run.git_commit() == ("0123abc", None)
    monkeypatch.delenv("FASTDPO_GIT_COMMIT")
    assert run.git_commit() == (None, None)


def test_only_the_named_providers_are_set_up():
    assert tuple(providers.get_providers(CPU, ["fastdpo", "eager"])) == ("eager", "fastdpo")


def test_tuning_sweep_checks_and_times_each_variant(tmp_path):
    """``python -m benchmarks.tune --quick`` (the kernels under Triton's interpreter on a CPU): every variant is
    compared with the default, then timed, and written with the keys NOTES.md's tuning log is read from."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-m", "benchmarks.tune", "--quick", "--out", str(tmp_path)], env=env, check=True,
                   cwd=run.RESULTS_DIR.parent.parent, capture_output=True, timeout=600)  # fmt: skip
    _, data = _results(tmp_path)
    rows = data["rows"]
    assert {(r["kernel"], r["variant"]) for r in rows} >= {("fwd", "default"), ("bwd", "default")}
    for row in rows:
        assert row["status"] == "ok" and row["max_rel_diff"] <= 1e-5
        assert row["floor_fraction"] == pytest.approx(row["floor_ms"] / row["ms_p50"])
        assert {"device", "torch", "triton", "git_commit", "command", "gbps"} <= row.keys()


def test_host_time_measures_every_entry_point(tmp_path, monkeypatch):
    from benchmarks import host_time

    monkeypatch.setattr(host_time, "REPS", 20)
    monkeypatch.setattr(host_time, "WARMUP", 5)
    assert host_time.main(["--out", str(tmp_path)]) == 0
    _, data = _results(tmp_path)
    us = data["host_us_before_kernel"]
    assert set(us) == {"sequence_logps fwd", "dpo_loss fwd", "dpo_loss fwd, return_metrics", "sequence_logps bwd",
                       "dpo_loss bwd"}  # fmt: skip
    assert all(0 < v < 1e5 for v in us.values())
    from fastdpo.ops import logps as logps_op

    assert logps_op.impl_for(torch.zeros(1, 1, 1)) is not host_time._Stub  # the launchers are restored


def test_gpu_session_runs_every_provider_but_compile_in_the_first_step():
    """gpu_session.sh names the logits sweep's providers itself (no Python import that could fail first)."""
    import re

    script = (run.RESULTS_DIR.parent / "gpu_session.sh").read_text()
    (names,) = re.findall(r'^not_compiled="([^"]+)"', script, re.M)
    assert names.split() == [n for n in providers.RUN_ORDER if "compile" not in n]
