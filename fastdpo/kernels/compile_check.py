"""Compile every log-prob Triton kernel for real GPU targets, with no GPU present, and report resource usage.

    python -m fastdpo.kernels.compile_check [--json PATH] [--cc 80 90 100]

Why: CPU tests run the kernels under ``TRITON_INTERPRET=1``, which never reaches the GPU compiler, so a kernel that
fails to lower or starts spilling registers would only show up on a GPU. This compiles each (kernel, dtype, sm_80 /
sm_90 / sm_100, BLOCK_V and num_warps from ``logps_config``) with Triton's own pipeline and bundled ptxas, then
reads the very cubin Triton built with its bundled ``cuobjdump --dump-resource-usage``. That is preferred to
re-running ``ptxas -v`` on the PTX, which would have to copy Triton's ptxas choice and flags (ptxas vs
ptxas-blackwell, --regAllocOptLevel), and those change between releases. Spilled registers live in the stack frame:
forcing a spill (.maxnreg 24) gave ``STACK:88 LOCAL:0`` where ``ptxas -v`` said 84/96 bytes spill stores/loads, so
spill = STACK + LOCAL (these kernels have no local arrays or calls). From the registers and shared memory it derives
how many programs fit on one SM (``programs_per_sm``, the CUDA occupancy calculator's arithmetic), what a streaming
kernel's bandwidth hangs on: the registers a thread are allocated in steps of 8, so 32 registers leave 8 programs of
8 warps on an SM and 33 only 6. It also reads the PTX for the width of the row's memory traffic: a launch with
16-byte aligned rows must copy logits with 16-byte ``cp.async`` (the software-pipelined loads) and the backward must
store the gradient with 16-byte ``st.global.v4``; narrower accesses would cap bandwidth well below the floor
whatever the tuning. Exit status: 0 ok, 1 a compile failure, 2 a spill, 3 narrow row accesses (regressions here).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default anyway

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastdpo.kernels.heuristics import logps_config  # noqa: E402

CAPABILITIES = (80, 90, 100)  # A100, H100/H200, B200 (Triton emits sm_90a and sm_100a)
VOCABS = (1000, 32000, 128256, 256000)
DTYPES = ("bf16", "fp16", "fp32", "fp32>bf16")  # logits (> grad_logits if other); labels int64, logp/lse fp32
# Argument conventions: the one place kernel arguments get types. An argument that matches none raises, so a new one
# is added here knowingly instead of being compiled with a wrong type. The JIT types a Python int by value (i32 if it
# fits, else i64); strides are checked as i64, the specialisation large tensors get (N * T * V passes 2^31).
FLOAT_ARGS = {"logit_scale", "softcap", "inv_temperature"}
INT_ARGS = {"T", "T_rows", "n_rows", "V", "chunk_blocks", "ignore_index"}
CONSTEXPRS = {
    "SHIFT": lambda cfg, phase: 1, "BLOCK_V": lambda cfg, phase: cfg.block_v, "PHASE": lambda cfg, phase: phase,
    "NUM_STAGES": lambda cfg, phase: cfg.num_stages,
}
# The forward kernel's phases (logps.WHOLE_ROW, CHUNK_PARTIALS, FOLD_PARTIALS), each a compiled kernel of its own;
# the fold runs with one warp (scalar work per row), as the launcher runs it.
PHASES = {0: "whole_row", 1: "chunk_partials", 2: "fold_partials"}
# Optional-feature flags (COMPUTE_<stat>, HAS_<grad>): each kernel is checked with the plain launch (only
# HAS_LOGP_GRAD on) and with every flag on, the variant with the most live registers.
FLAG_PREFIXES = ("COMPUTE_", "HAS_", "SOFTCAP")
VARIANTS = {"plain": lambda name: name == "HAS_LOGP_GRAD", "all": lambda name: True}


def arg_type(name: str, dtype: str) -> str:
    """Triton type of a kernel argument; ``dtype`` "fp32>bf16" reads float32 logits and writes a bf16 gradient
    (the fused-linear path's tiles)."""
    read, _, written = dtype.partition(">")
    if name == "grad_logits_ptr":
        return "*" + (written or read)
    if name.endswith("_ptr"):
        return "*" + (read if "logits" in name else "i64" if "label" in name else "fp32")
    if name.startswith("stride_"):
        return "i64"
    if name in FLOAT_ARGS or name in INT_ARGS:
        return "fp32" if name in FLOAT_ARGS else "i32"
    raise KeyError(f"compile_check: no type convention for kernel argument {name!r}; add it to FLOAT_ARGS/INT_ARGS")


def make_source(kernel, dtype: str, cfg, aligned: bool, variant: str = "plain", phase: int | None = None) -> ASTSource:
    """The launch the JIT specialises: 16-byte aligned tensors (fresh torch allocations) and, when V % 16 == 0,
    strides and V multiples of 16 (contiguous rows), which is what lets the row loads vectorise."""
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            if p.name.startswith(FLAG_PREFIXES):
                sig[p.name], consts[p.name] = "constexpr", VARIANTS[variant](p.name)
                continue
            if p.name not in CONSTEXPRS:
                raise KeyError(f"compile_check: no value for constexpr {p.name!r}; add it to CONSTEXPRS")
            sig[p.name], consts[p.name] = "constexpr", CONSTEXPRS[p.name](cfg, phase)
            continue
        sig[p.name] = arg_type(p.name, dtype)
        if p.name.endswith("_ptr") or (aligned and (p.name == "V" or p.name.startswith("stride_"))):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ast_source(kernel, sig, consts, attrs)


def ast_source(kernel, sig: dict, consts: dict, attrs: dict | None = None) -> ASTSource:
    attrs = attrs or {}
    if "constexprs" not in inspect.signature(ASTSource).parameters:  # Triton 3.2: constants, an AttrsDescriptor
        from triton.backends.compiler import AttrsDescriptor

        divisible = [i for (i,), hints in attrs.items() if ["tt.divisibility", 16] in hints]
        return ASTSource(kernel, sig, constants=consts, attrs=AttrsDescriptor.from_dict(
            {"cls": AttrsDescriptor.__name__, "arg_properties": {"tt.divisibility": divisible}}))  # fmt: skip
    try:  # Triton >= 3.3 maps constexpr names to argument paths itself
        return ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    except (AssertionError, TypeError, ValueError):  # otherwise key them by path, (index,)
        return ASTSource(kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()},
                         attrs=attrs)  # fmt: skip


def resource_usage(cubin: bytes) -> dict[str, int]:
    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # Triton without knobs: the binary ships in the same place
        cuobjdump = str(Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.cubin").write_bytes(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    if len(fields) != 4:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    return fields


# Per SM, for the occupancy arithmetic: 64K registers, at most 64 resident warps and 32 resident programs (sm_80,
# sm_90 and sm_100 alike), and this much shared memory (164 KB on A100, 228 KB on H100/H200 and B200); each program
# also takes 1 KB of shared memory reserved by the driver.
SM_REGISTERS, SM_WARPS, SM_PROGRAMS, RESERVED_SHARED = 65536, 64, 32, 1024
SM_SHARED = {80: 167936, 90: 233472, 100: 233472}


def programs_per_sm(cc: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs of ``num_warps`` warps resident on one SM of compute capability ``cc`` (80 or 90), each thread
    taking ``registers`` (allocated in steps of 8: 256 a warp) and each program ``shared_bytes`` of shared memory."""
    warp_registers = -(-registers // 8) * 8 * 32
    by_registers = SM_REGISTERS // warp_registers // num_warps
    by_shared = SM_SHARED[cc] // (shared_bytes + RESERVED_SHARED)
    return min(SM_WARPS // num_warps, SM_PROGRAMS, by_registers, by_shared)


def access_widths(ptx: str) -> tuple[list[int], list[int]]:
    """Byte widths of the asynchronous global-to-shared copies and of the global stores in ``ptx``, each sorted and
    unique: ``cp.async.cg.shared.global [dst], [src], 0x10`` copies 16 bytes; ``st.global.v4.b32`` stores 16."""
    copy = r"cp\.async\.\w+\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)\s*[,;]"  # the size operand
    store = r"\bst\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)\b"  # vector length, bits per element
    copies = {int(n, 0) for n in re.findall(copy, ptx)}
    stores = {int(v or 1) * int(b) // 8 for v, b in re.findall(store, ptx)}
    return sorted(copies), sorted(stores)


def narrow(row: dict) -> bool:
    """An aligned launch whose row copies (or, in the backward, gradient stores) are not all 16 bytes wide. The
    forward's fold phase reads no logits (only the chunks' float32 statistics)."""
    if row["error"] or not row["aligned16"] or "fold_partials" in row["kernel"]:
        return False
    wide = lambda widths: widths == [16]  # noqa: E731
    return not wide(row["copy_bytes"]) or ("bwd" in row["kernel"] and not wide(row["store_bytes"]))


def describe(row: dict) -> str:
    return (f"{row['kernel']} ({row['flags']}) {row['dtype']} {row['target']} BLOCK_V={row['BLOCK_V']} "
            f"num_warps={row['num_warps']}")  # fmt: skip


def check(kernels, capabilities=CAPABILITIES) -> list[dict]:
    rows = []
    for kernel, variant in itertools.product(kernels, VARIANTS):
        configs: dict = {}  # (LogpsConfig, aligned) -> the vocab sizes that launch it
        for V in VOCABS:
            cfg = logps_config(V, backward="bwd" in kernel.__name__)
            configs.setdefault((cfg, V % 16 == 0), []).append(V)
        phases = PHASES if "PHASE" in kernel.arg_names else {None: ""}
        for dtype, cc, phase in itertools.product(DTYPES, capabilities, phases):
            if ">" in dtype and "grad_logits_ptr" not in kernel.arg_names:
                continue
            for (cfg, aligned), vocabs in configs.items():
                num_warps = 1 if phases[phase] == "fold_partials" else cfg.num_warps
                name = kernel.__name__ + (f"[{phases[phase]}]" if phase is not None else "")
                row = {"kernel": name, "flags": variant, "dtype": dtype, "target": f"sm_{cc}",
                       "BLOCK_V": cfg.block_v, "num_warps": num_warps, "aligned16": aligned, "V": vocabs}  # fmt: skip
                source = functools.partial(make_source, kernel, dtype, cfg, aligned, variant, phase)
                rows.append(compiled(row, source, cc))
    return rows


# The per-sequence sums kernel (fastdpo.kernels.sums) at the chunk sizes it is launched with: a one-token row, a short
# one, a DPO completion, its maximum; reading float32 or float64 and writing either (float64: chunk partials).
SUM_CHUNKS = (1, 64, 1024, 4096)
SUM_DTYPES = ("fp32", "fp64", "fp32>fp64", "fp64>fp32")


def check_sums(kernel, capabilities=CAPABILITIES) -> list[dict]:
    from fastdpo.kernels.sums import NUM_WARPS

    rows = []
    for dtype, cc, chunk in itertools.product(SUM_DTYPES, capabilities, SUM_CHUNKS):
        read, _, written = dtype.partition(">")
        sig = {"x_ptr": "*" + read, "out_ptr": "*" + (written or read), "L": "i32", "stride_x_r": "i64",
               "stride_x_l": "i64", "stride_out_r": "i64", "CHUNK": "constexpr", "LOG2_CHUNK": "constexpr"}  # fmt: skip
        row = {"kernel": kernel.__name__, "flags": "-", "dtype": dtype, "target": f"sm_{cc}", "BLOCK_V": chunk,
               "num_warps": NUM_WARPS, "aligned16": False, "V": []}  # fmt: skip
        consts = {"CHUNK": chunk, "LOG2_CHUNK": chunk.bit_length() - 1}
        rows.append(compiled(row, functools.partial(ast_source, kernel, sig, consts), cc))
    return rows


def compiled(row: dict, source, cc: int) -> dict:
    """``row`` with what compiling ``source()`` for sm_``cc`` gives: registers, shared memory, spills, occupancy
    and access widths, or the error."""
    row |= {"registers": None, "shared_bytes": None, "static_shared_bytes": None, "spill_bytes": None,
            "programs_per_sm": None, "copy_bytes": None, "store_bytes": None, "error": None}  # fmt: skip
    try:
        k = triton.compile(source(), target=GPUTarget("cuda", cc, 32), options={"num_warps": row["num_warps"]})
        use = resource_usage(k.asm["cubin"])
        row["target"] = re.search(r"^\.target\s+(\w+)", k.asm["ptx"], re.M).group(1)
        row.update(registers=use["REG"], shared_bytes=k.metadata.shared, static_shared_bytes=use["SHARED"],
                   spill_bytes=use["STACK"] + use["LOCAL"])  # fmt: skip
        # dynamic plus static shared memory: on sm_90a cuobjdump reports 1 KB static that the PTX does not declare
        # (perhaps the driver's reserve again); counted, to err on the low side
        shared = k.metadata.shared + use["SHARED"]
        row["programs_per_sm"] = programs_per_sm(cc, use["REG"], row["num_warps"], shared)
        row["copy_bytes"], row["store_bytes"] = access_widths(k.asm["ptx"])
    except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--cc", nargs="+", type=int, choices=CAPABILITIES, default=CAPABILITIES,
                        help="compute capabilities to compile for (default: all)")
    args = parser.parse_args(argv)
    from fastdpo.kernels import logps, sums

    kernels = (logps._logps_fwd_kernel, logps._logps_bwd_kernel)
    if not all(isinstance(k, triton.runtime.JITFunction) for k in (*kernels, sums._pairwise_sums_kernel)):
        sys.exit("compile_check: the kernels were built for the interpreter (TRITON_INTERPRET=1); run without it")
    rows = check(kernels, args.cc) + check_sums(sums._pairwise_sums_kernel, args.cc)
    head = ("kernel", "flags", "dtype", "target", "BLOCK_V", "num_warps", "aligned16", "V", "registers", "shared_bytes",
            "static_shared_bytes", "spill_bytes", "programs_per_sm", "copy_bytes", "store_bytes")  # fmt: skip
    cell = lambda v: ",".join(map(str, v)) or "-" if isinstance(v, list) else "-" if v is None else str(v)  # noqa: E731
    table = [head] + [[cell(r[h]) for h in head] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    failed, spilled = [r for r in rows if r["error"]], [r for r in rows if r["spill_bytes"]]
    narrowed = [r for r in rows if narrow(r)]
    for r in narrowed:
        what = describe(r)
        print(f"NARROW ROW ACCESS: {what} with 16-byte aligned rows copies {r['copy_bytes']} and stores "
              f"{r['store_bytes']} bytes at a time; expected 16 (cp.async / st.global.v4)", file=sys.stderr)
    for r in failed + spilled:
        what = describe(r)
        if r["error"]:
            print(f"COMPILE FAILURE: {what}: {r['error']}", file=sys.stderr)
        else:
            print(f"REGISTER SPILL (a regression for these kernels): {what} spills {r['spill_bytes']} bytes to "
                  "local memory; lower BLOCK_V or raise num_warps in heuristics.py", file=sys.stderr)  # fmt: skip
    return 1 if failed else 2 if spilled else 3 if narrowed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        # Importing fastdpo already decorated the kernels for the interpreter: start over without the variable.
        print("compile_check: re-running without TRITON_INTERPRET (it needs compiled kernels)", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastdpo.kernels.compile_check", *sys.argv[1:]], env)
    sys.exit(main())
