"""Fused-linear DPO benchmark: the loss from last hidden states and the LM head, against the peers.

    python -m benchmarks.fused_linear --quick     # small sizes, any machine (CPU: naive, TRL's torch path, fastdpo)
    python -m benchmarks.fused_linear             # the issue's sweep (D 2048/4096, V 128256/151936, 4k-32k tokens)

Every implementation computes the same DPO sigmoid loss (beta 0.1, precomputed reference log-probs) of a
chosen-then-rejected batch ``hidden [2B, T, D]``, ``weight [V, D]``, labels ``[2B, T]`` (all scored, shifted as
a causal LM), in bf16. Modes: ``fwd`` (under no_grad, a reference-model pass) and ``fwd_bwd`` (gradients of
hidden and weight). Each is first checked against float64 on a slice (one pair of ``CHECK_T`` tokens) and
its errors recorded; only a gross error (a broken install) stops it from being timed.

The floor is measured in the same run: the three GEMMs any exact implementation must run (x = H W^T forward;
dH = dX W and dW = dX^T H backward; 2 N D V FLOPs each) timed as plain ``torch.mm`` on the same shapes.
``floor_fraction = floor_ms / ms_p50``; fastdpo's recompute design runs a fourth GEMM (x again in backward), so
its ceiling is 0.75 in ``fwd_bwd`` (see NOTES.md). Rows go to ``results/fused-linear-<device>.json``/``.csv``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fastdpo
from benchmarks import run, timing
from benchmarks.providers import _needs, raise_recompile_limits
from benchmarks.run import RESULTS_DIR, device_slug, format_table, progress, within_budget, write_results

BETA = 0.1
# Issue sweep: hidden sizes of 1B-8B models, Llama 3 and Qwen 2 vocabularies, 4k-32k tokens per step.
DIMS, VOCABS, TOKENS = (2048, 4096), (128256, 151936), (4096, 8192, 32768)
QUICK_DIMS, QUICK_VOCABS, QUICK_TOKENS = (256,), (8000,), (512, 1024)
SEQ_LEN = 1024  # tokens per sequence: N tokens are N / SEQ_LEN sequences (pairs of them)
CHECK_T = 64  # tokens per sequence of the float64 accuracy check
GROSS_ERROR = 0.05  # relative error of the loss's log-probs that means a broken implementation, not rounding
NAMES = ("naive", "trl-fused", "liger-fused", "cce", "fastdpo-logits", "fastdpo-fused")
# Measured in this order within a size: fastdpo first; Liger (torch.compile inside) and CCE (autotuned) last, whose
# first calls at a size can take long enough to meet a time-limited run's end.
RUN_ORDER = ("fastdpo-fused", "fastdpo-logits", "naive", "trl-fused", "cce", "liger-fused")
HEADLINE = (4096, 128256, 8192)  # (D, V, N): the headline size, measured first
ROW_KEY = ("impl", "mode", "N", "V", "D", "dtype")
TABLE = ("impl", "mode", "N", "D", "V", "ms_p50", "tflops", "floor_fraction", "peak_extra_mb", "err_logps", "status")


def sigmoid_dpo(chosen: torch.Tensor, rejected: torch.Tensor, ref_c, ref_r) -> torch.Tensor:
    return -F.logsigmoid(BETA * ((chosen - ref_c) - (rejected - ref_r))).mean()


def pair_sums(per_token: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    sums = per_token.float().view(S, -1).sum(1)
    return sums[: S // 2], sums[S // 2 :]


def naive(hidden, weight, labels, ref_c, ref_r):
    """The LM head, then the loss as most loops write it: a float32 log_softmax over the logits and a gather."""
    logits = hidden[:, :-1] @ weight.t()
    logp = logits.float().log_softmax(-1).gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    return sigmoid_dpo(*pair_sums(logp, hidden.shape[0]), ref_c, ref_r)


def fastdpo_logits(hidden, weight, labels, ref_c, ref_r):
    return fastdpo.dpo_loss(hidden @ weight.t(), labels, ref_c, ref_r, beta=BETA, inplace_backward=True).loss


def fastdpo_fused(hidden, weight, labels, ref_c, ref_r):
    return fastdpo.fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, beta=BETA).loss


def _trl_fused():
    """TRL 1.16's fused LM head kernel (``trl.kernels.ChunkedLogProbFunction``, 4096-token x 32768-vocab bf16
    tiles, the chunk size its ``add_fused_lm_head`` uses) feeding the sigmoid loss."""
    from trl.kernels import ChunkedLogProbFunction

    def fn(hidden, weight, labels, ref_c, ref_r):
        S, T, D = hidden.shape
        h, y = hidden[:, :-1].reshape(-1, D), labels[:, 1:].reshape(-1)
        logp = ChunkedLogProbFunction.apply(h, weight, None, y, 1.0, 32768, None, 1.0, ())[0]
        return sigmoid_dpo(*pair_sums(logp, S), ref_c, ref_r)

    return fn


def _liger_fused():
    """Liger-Kernel's ``LigerFusedLinearDPOLoss`` (0.8.5): it takes a reference model's inputs, not precomputed
    sums, so it runs reference-free here: the same policy work, and equal to the others' loss at the accuracy
    check, whose reference sums are 0."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)

    def fn(hidden, weight, labels, ref_c, ref_r):
        out = loss(weight, hidden[:, :-1], labels[:, 1:])
        return out[0] if isinstance(out, tuple) else out

    return fn


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    def fn(hidden, weight, labels, ref_c, ref_r):
        nll = linear_cross_entropy(hidden, weight, labels, shift=True, reduction="none")
        return sigmoid_dpo(*pair_sums(-nll, hidden.shape[0]), ref_c, ref_r)

    return fn


def get_providers(device: torch.device) -> dict[str, tuple[Callable | None, str | None]]:
    """name -> (fn, why it cannot run here or None)."""
    out = {"naive": (naive, None)}
    out["trl-fused"] = _needs("trl", device, False, _trl_fused)
    out["liger-fused"] = _needs("liger_kernel", device, False, _liger_fused)  # torch (+ torch.compile) only
    out["cce"] = _needs("cut_cross_entropy", device, True, _cce)
    out["fastdpo-logits"] = (fastdpo_logits, None)
    out["fastdpo-fused"] = (fastdpo_fused, None)
    return out


def make_inputs(N: int, D: int, V: int, dtype: torch.dtype, device, T: int | None = None):
    """hidden ~ N(0, 1), weight scaled so logits have std ~3 (a peaked softmax), labels all scored, ref sums."""
    T = T or min(N, SEQ_LEN)
    S = max(2, N // T)
    hidden = torch.randn(S, T, D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * (3.0 / D**0.5)).to(dtype)
    labels = torch.randint(0, V, (S, T), device=device)
    ref = torch.randn(S, device=device) * 10 - 5.0 * T
    return hidden, weight, labels, ref[: S // 2], ref[S // 2 :]


def call(fn, mode: str, hidden, weight, *rest):
    if mode == "fwd":
        with torch.no_grad():
            return fn(hidden, weight, *rest), None
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(h, w, *rest)
    return loss, torch.autograd.grad(loss, (h, w))


def check(fn, mode: str, inputs) -> tuple[float, float | None]:
    """(relative error of the loss's log-ratio, of grad hidden) against float64 on one pair of CHECK_T tokens."""
    hidden, weight, labels, ref_c, ref_r = inputs
    small = (hidden[[0, -1], :CHECK_T], weight, labels[[0, -1], :CHECK_T], ref_c[:1] * 0, ref_r[:1] * 0)
    loss, grads = call(fn, mode, *small)
    loss = loss.detach()
    truth, truth_grads = call(naive, mode, small[0].double(), small[1].double(), *small[2:])
    truth = truth.detach()
    # the loss is -log sigmoid(beta * margin): compare margins, which carry the log-prob error undamped
    margin, true_margin = torch.special.logit(torch.exp(-loss.double())), torch.special.logit(torch.exp(-truth))
    err = float((margin - true_margin).abs() / BETA / max(1.0, float(true_margin.abs() / BETA)))
    grad_err = None
    if grads is not None:
        grad_err = float((grads[0].double() - truth_grads[0]).abs().max() / truth_grads[0].abs().max())
    return err, grad_err


def measure_floor(N: int, D: int, V: int, dtype, device) -> dict[str, float]:
    """ms of the three GEMMs every exact implementation runs, as plain torch.mm on these shapes."""
    h, w = torch.randn(N, D, device=device).to(dtype), torch.randn(V, D, device=device).to(dtype)
    dx = torch.randn(N, V, device=device).to(dtype)
    fwd = timing.bench(lambda: h @ w.t(), device).p50
    dh = timing.bench(lambda: dx @ w, device).p50
    dw = timing.bench(lambda: dx.t() @ h, device).p50
    return {"fwd": fwd, "fwd_bwd": fwd + dh + dw}


def measure(name, fn, mode, N, D, V, dtype, inputs, floor, device) -> dict:
    row = {"impl": name, "mode": mode, "N": N, "D": D, "V": V, "dtype": str(dtype).removeprefix("torch.")}
    try:
        err, grad_err = check(fn, mode, inputs)
        row |= {"err_logps": err, "err_grad_hidden": grad_err}
        if not err < GROSS_ERROR:
            return row | {"status": "failed", "note": f"float64 check: relative error {err:.3g}, not timed"}
        t = timing.bench(lambda: call(fn, mode, *inputs), device)
        flops = (2 if mode == "fwd" else 6) * N * D * V  # the minimum: 1 GEMM forward, 3 with backward
        return row | {
            "status": "ok", "ms_p50": t.p50, "ms_p20": t.p20, "ms_p80": t.p80, "reps": t.reps,
            "tflops": flops / t.p50 / 1e9, "floor_ms": floor[mode], "floor_fraction": floor[mode] / t.p50,
            "peak_extra_mb": timing.peak_extra_mb(lambda: call(fn, mode, *inputs), device),
        }  # fmt: skip
    except torch.cuda.OutOfMemoryError:
        return row | {"status": "oom", "note": "out of memory"}
    except Exception as exc:  # one broken implementation must not end the sweep
        return row | {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
    finally:
        run.release_memory()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_linear", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes that a CPU runs in about a minute")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--impl", nargs="+", choices=NAMES)
    p.add_argument("--N", nargs="+", type=int)
    p.add_argument("--D", nargs="+", type=int)
    p.add_argument("--V", nargs="+", type=int)
    p.add_argument("--mode", nargs="+", choices=("fwd", "fwd_bwd"), default=["fwd", "fwd_bwd"])
    p.add_argument("--fresh", action="store_true", help="replace the results file instead of merging into it")
    p.add_argument("--budget-s", type=float, help="start no new size after this many seconds")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        timing.keep_freed_memory()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    sizes = list(itertools.product(args.D or (QUICK_DIMS if args.quick else DIMS),
                                   args.V or (QUICK_VOCABS if args.quick else VOCABS),
                                   args.N or (QUICK_TOKENS if args.quick else TOKENS)))  # fmt: skip
    sizes.sort(key=lambda size: size != HEADLINE)  # stable: the rest in sweep order
    raise_recompile_limits()  # Liger's loss compiles its chunk function: one graph per shape
    providers = get_providers(device)
    chosen = {n: providers[n] for n in RUN_ORDER if n in (args.impl or NAMES)}
    unavailable = {n: why for n, (_, why) in chosen.items() if why}
    for n, why in unavailable.items():
        print(f"skipping {n}: {why}")
    common = run.run_metadata(device, "benchmarks.fused_linear", argv)
    slug = "fused-linear-" + device_slug(common["device"], device)
    runnable = {n: fn for n, (fn, why) in chosen.items() if not why}
    rows, all_rows, bar = [], [], progress(len(sizes) * len(runnable) * len(args.mode))
    for D, V, N in within_budget(sizes, args.budget_s):
        try:
            floor = measure_floor(N, D, V, dtype, device)
            inputs = make_inputs(N, D, V, dtype, device)
        except torch.cuda.OutOfMemoryError:
            print(f"N={N} D={D} V={V}: out of memory for the inputs or the floor, size skipped")
            run.release_memory()
            continue
        for (impl, fn), mode in itertools.product(runnable.items(), args.mode):
            bar.set_postfix_str(f"{impl} {mode} N={N} D={D} V={V}")
            rows.append(measure(impl, fn, mode, N, D, V, dtype, inputs, floor, device) | common)
            # after every case: a sweep interrupted at its time limit keeps all it measured
            all_rows = write_results(rows, unavailable, args.out, slug, args.fresh, key=ROW_KEY)
            bar.update()
        del inputs
    bar.close()
    cells = [{k: r.get(k) for k in TABLE} for r in sorted(rows, key=lambda r: (r["D"], r["V"], r["N"],
                                                                               NAMES.index(r["impl"])))]
    print(format_table(cells, TABLE))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['impl']} {r['mode']} N={r['N']} D={r['D']} V={r['V']}: {r['status']}: {r.get('note')}")
    print(f"results: {args.out / (slug + '.json')} and .csv ({len(all_rows)} rows)")
    return 1 if any(r["status"] in ("failed", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
