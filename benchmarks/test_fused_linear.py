"""Tests of the fused-linear benchmark harness: a tiny run's rows and its accuracy gate."""

from __future__ import annotations

import json

import torch

from benchmarks import fused_linear

TINY = ["--N", "128", "--D", "32", "--V", "500"]


def test_tiny_run_writes_rows_for_every_available_impl(tmp_path):
    impls = ["naive", "fastdpo-logits", "fastdpo-fused"]
    assert fused_linear.main([*TINY, "--impl", *impls, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("fused-linear-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert sorted((r["impl"], r["mode"]) for r in rows) == sorted((i, m) for i in impls for m in ("fwd", "fwd_bwd"))
    for r in rows:
        assert r["status"] == "ok" and r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
        assert r["floor_fraction"] == r["floor_ms"] / r["ms_p50"] and r["D"] == 32
        assert r["err_logps"] < 1e-2 and "--impl" in r["command"]
    fused = {r["mode"]: r for r in rows if r["impl"] == "fastdpo-fused"}
    assert fused["fwd_bwd"]["err_grad_hidden"] is not None and fused["fwd"]["err_grad_hidden"] is None


def test_a_wrong_implementation_is_not_timed():
    inputs = fused_linear.make_inputs(128, 32, 500, torch.bfloat16, "cpu")

    def wrong(hidden, weight, labels, ref_c, ref_r):  # scores the wrong tokens
        return fused_linear.naive(hidden, weight, labels.roll(1, dims=1), ref_c, ref_r)

    floor = {"fwd": 1.0, "fwd_bwd": 1.0}
    row = fused_linear.measure("wrong", wrong, "fwd", 128, 32, 500, torch.bfloat16, inputs, floor, torch.device("cpu"))
    assert row["status"] == "failed" and "ms_p50" not in row
