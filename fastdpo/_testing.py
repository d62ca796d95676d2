"""Shared by tests and benchmarks: input factories and the one tolerance table.

Pass criterion (three-way, as flash-attention's tests do): float64 is truth, the naive PyTorch computation
in float32 on the same inputs (gradients rounded to the logits' dtype) is the baseline, and a result passes
when its error is at most ``2 * baseline_error + TOLERANCE[dtype]``. Errors are relative to the largest
magnitude of the truth, so one table serves log-probs (tens of nats) and gradients (below 1).
"""

from __future__ import annotations

import os

import torch

# Extra error allowed beyond twice the baseline's, relative to max |truth|. float32 math everywhere, so the
# slack only covers summation order; the final rounding to the storage dtype is already in the baseline.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-6,
    torch.float16: 1e-6,
}


def downcast_slack(dtype: torch.dtype, triton_path: bool) -> float:
    """Extra tolerance for a bfloat16 result stored by an interpreted Triton kernel.

    Triton's interpreter (3.9) converts float32 to bfloat16 by truncation and ignores
    ``fp_downcast_rounding="rtne"``; GPUs round to nearest even. So an interpreted store can sit one bf16 ulp
    (2^-7 relative) from the truth where the GPU and the baseline sit half an ulp away.
    """
    interpreted = triton_path and os.environ.get("TRITON_INTERPRET") == "1"
    return 2.0**-7 if interpreted and dtype == torch.bfloat16 else 0.0


def propagated_slack(
    beta: float, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, amplification: float = 1.0
) -> float:
    """Extra relative tolerance for gradients of a loss of beta * (logp_c - logp_r).

    The per-sequence coefficient c = dL/dlogp depends on beta * Δ, so float32 rounding of the summed
    log-probs (a few ulps of |logp_c| + |logp_r|) moves every gradient element by about
    beta * that error, relative. The naive baseline can be luckier than that on one draw; this bound cannot.
    ``amplification``: the largest |d score / d log-ratio| of an f-divergence (forward KL: e^(-ρ)), which
    multiplies that sensitivity (``f_divergence_amplification``).
    """
    span = float(chosen_logps.detach().abs().max() + rejected_logps.detach().abs().max())
    return beta * span * 2.0**-21 * max(1.0, amplification)


def f_divergence_amplification(kind: str, alpha: float, logratios: torch.Tensor) -> float:
    """The largest slope |d score / d ρ| over the batch's log-ratios ρ: e^(-ρ) for forward KL, e^((α-1)ρ) for
    the α-divergence, 1 otherwise (reverse KL, JS: bounded by 1)."""
    rho = logratios.detach().double()
    if kind == "forward_kl":
        return float(torch.exp(-rho).max())
    if kind == "alpha_divergence":
        return float(torch.exp((alpha - 1) * rho).max())
    return 1.0


def make_logits(N: int, T: int, V: int, dtype: torch.dtype, device, *, scale: float = 3.0) -> torch.Tensor:
    """Random logits ``[N, T, V]`` (fresh draw from the current RNG), exactly representable in ``dtype``."""
    return (torch.randn(N, T, V, device=device) * scale).to(dtype)


def make_labels(
    N: int, T: int, V: int, device, *, prompt_frac: float = 0.3, ignore_index: int = -100
) -> torch.Tensor:
    """Random labels ``[N, T]`` with a random-length ignored prompt at the start of each row."""
    labels = torch.randint(0, V, (N, T), device=device)
    prompt_len = (torch.rand(N, device=device) * prompt_frac * T).long()
    positions = torch.arange(T, device=device)
    return labels.masked_fill(positions < prompt_len[:, None], ignore_index)


def relative_error(actual: torch.Tensor, truth: torch.Tensor, scale: float = 0.0) -> tuple[float, int]:
    """(max |actual - truth| / max(max |truth|, scale), flat index of the worst element)."""
    actual, truth = actual.detach().double().flatten(), truth.detach().double().flatten()
    diff = (actual - truth).abs()
    if diff.numel() == 0:
        return 0.0, -1
    # NaN where the truth is NaN is a match (the NaN-out policy); any other NaN or inf mismatch is the worst error.
    both_nan = torch.isnan(actual) & torch.isnan(truth)
    same_inf = torch.isinf(truth) & (actual == truth)
    diff = torch.where(both_nan | same_inf, 0.0, torch.where(torch.isnan(diff), torch.inf, diff))
    truth = truth[torch.isfinite(truth)]
    if truth.numel() == 0:
        return float(diff.max()), int(diff.argmax())
    worst = int(diff.argmax())
    return float(diff[worst]) / max(float(truth.abs().max()), scale, 1e-30), worst


def assert_close_to_reference(
    actual: torch.Tensor,
    truth: torch.Tensor,
    baseline: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    *,
    slack: float = 0.0,
    scale: float = 0.0,
) -> float:
    """Assert the three-way criterion above; the failure message names the worst element. Returns the error.

    ``scale`` sets a floor on the magnitude errors are relative to, for quantities computed with cancellation
    (a reward margin is a small difference of large log-probs: its error scales with the log-probs).
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    err, worst = relative_error(actual, truth, scale)
    base_err, _ = relative_error(baseline, truth, scale)
    bound = 2 * base_err + TOLERANCE[dtype] + slack
    if not err <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
        raise AssertionError(
            f"{name} ({dtype}): relative error {err:.3e} > bound {bound:.3e} (baseline {base_err:.3e}); "
            f"worst at {idx}: got {actual[idx].item()!r}, expected {truth[idx].item()!r}"
        )
    return err


def spawn_group(world: int, store_dir, fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo process group (the tests of
    the distributed paths). Teardown order matters: ``fn``'s objects (DTensors and meshes hold process groups) are
    freed and every rank reaches a barrier before the group is destroyed; a DTensor freed after
    ``destroy_process_group`` made gloo abort the process at exit, about 1 run in 8."""
    import torch.multiprocessing as mp

    mp.spawn(_group_main, args=(world, f"{store_dir}/store", fn, args), nprocs=world, join=True)


def _group_main(rank: int, world: int, store: str, fn, args) -> None:
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
