#!/usr/bin/env bash
# Everything a lent GPU is for, in one device call, most important first, each step within its own time budget so
# that a short lease still brings back the first ones:
#   1. the machine: GPU name, torch / CUDA / Triton versions;
#   2. correctness on CUDA: the test files whose tensors follow the `device` fixture (kernels, ops, API, loss family,
#      robustness, batch invariance, fused linear, torch.compile), and the NCCL group-of-one test;
#   3. the logits sweep (`benchmarks.run`) without torch.compile, most telling sizes first (the headline N 8192,
#      V 128256, bf16; then the fp32 point and the plots' axes), then torch.compile at the headline size alone:
#      its compiles (max-autotune's above all) take longer than the other providers' whole rows;
#   4. the tuning sweep of fastdpo's kernels (`benchmarks.tune`: block, warps, stages, row split; one knob at a time);
#   5. the fused-linear sweep (`benchmarks.fused_linear`).
# Run from the repository root. The peers (TRL, Liger-Kernel, Cut Cross-Entropy, QuACK) are used when their wheels are
# carried: `bash benchmarks/fetch_wheels.sh` here downloads them into .whl/, .whl-quack-1/ and .whl-quack-2/ and says
# how to carry QuACK's two halves in two calls. Output: $OUT (the device tool's folder; default
# benchmarks/results/gpu-session) gets session.log, tests.log and the three sweeps' JSON and CSV, 8 files (all the
# device tool brings back); the logits sweep's plots are drawn afterwards from its JSON:
# `python -m benchmarks.plots <out>/<gpu>.json`. The machine gets the working tree without .git, so the commit the
# results were measured at comes from FASTDPO_GIT_COMMIT, set in the command (below).
# Budgets (seconds) can be changed through the environment: TEST_BUDGET_S (default 130), BENCH_BUDGET_S (100),
# COMPILE_BUDGET_S (60), TUNE_BUDGET_S (50), FUSED_BUDGET_S (50). A sweep starts no new size past its budget and
# writes every row as it is measured; each step is interrupted at its budget plus a margin for the size in flight
# (tests and compile 0 s, the sweeps 30 s each) and killed 10-15 s later: 145 + 140 + 70 + 90 + 90 = 535 s at most
# with the defaults, plus the wheels' install and the version check (~25 s), inside the device tool's 600 s for
# one command. Each sweep takes extra arguments of its own: SWEEP_ARGS the
# logits sweep's (`--quick` for a dry run on a CPU, `--impl fastdpo quack` to narrow it), FUSED_ARGS the
# fused-linear sweep's (`--quick`, `--impl fastdpo-fused naive`), TUNE_ARGS the tuning sweep's (`--quick`),
# COMPILE_ARGS the torch.compile step's sizes (default: the headline size).
#
#   device run: command="ls .whl-quack-1", carry=[".whl-quack-1"], timeout_s=60       (QuACK's first half; skip
#   device run: command="FASTDPO_GIT_COMMIT=$(git rev-parse HEAD, run here) bash benchmarks/gpu_session.sh",
#               carry=[".whl", ".whl-quack-2"], timeout_s=600          (both halves to run without QuACK)
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # no progress bars: their \r lines would swallow warnings in the log
LOG="$OUT/session.log"

step() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }

step "machine"
# The peers' wheels (benchmarks/fetch_wheels.sh): .whl/, and QuACK's in two halves carried by two calls. Two
# installs, the peers and then QuACK, so that a broken QuACK wheel cannot cost TRL and Liger too.
install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" \
    2>&1 | tee -a "$LOG"
}
mkdir -p /tmp/quack
cp .whl-quack-1/*.whl /tmp/quack/ 2>/dev/null
for part1 in .whl-quack-1/*.whl.part1; do
  part2=".whl-quack-2/$(basename "${part1%.part1}").part2"
  [ -f "$part1" ] && [ -f "$part2" ] && cat "$part1" "$part2" >"/tmp/quack/$(basename "${part1%.part1}")"
done
compgen -G ".whl/*.whl" >/dev/null && install .whl/*.whl
compgen -G "/tmp/quack/*.whl" >/dev/null && install /tmp/quack/*.whl
if [ -d /tmp/site ]; then
  # the CuTe DSL adds dsl_packages/ to sys.path through a .pth file, which Python reads in site-packages only
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages
  echo "carried wheels: $(ls .whl /tmp/quack 2>/dev/null | grep whl | tr '\n' ' ')" | tee -a "$LOG"
fi
echo "commit: ${FASTDPO_GIT_COMMIT:-unknown (set FASTDPO_GIT_COMMIT in the command)}" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  2>&1 | tee -a "$LOG"

step "tests on CUDA (budget ${TEST_BUDGET_S:-130} s; all of pytest's output in tests.log)"
# SIGINT first: pytest then still prints its summary and the failures
timeout -s INT -k 15 "${TEST_BUDGET_S:-130}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider --maxfail=25 \
  "tests/test_vocab_parallel.py::test_nccl_group_of_one_equals_plain_path" \
  tests/test_kernels_logps.py tests/test_kernels_sums.py tests/test_ops_logps.py tests/test_batch_invariance.py \
  tests/test_compile.py \
  tests/test_fused_linear.py tests/test_api.py tests/test_dpo_family.py tests/test_robustness.py \
  >"$OUT/tests.log" 2>&1
echo "tests exit code: $?; summary: $(tail -1 "$OUT/tests.log")" | tee -a "$LOG"

step "logits sweep without torch.compile (budget ${BENCH_BUDGET_S:-100} s)"
# providers.RUN_ORDER less torch.compile (benchmarks/test_run.py checks that the two agree)
not_compiled="fastdpo fastdpo-inplace quack quack-inplace trl-triton liger eager trl-selective fastdpo-tp1"
timeout -s INT -k 10 $(( ${BENCH_BUDGET_S:-100} + 30 )) python3 -m benchmarks.run --budget-s "${BENCH_BUDGET_S:-100}" \
  --out "$OUT" --no-plots --impl $not_compiled ${SWEEP_ARGS:-} 2>&1 | grep -v "case/s" | tail -60 >>"$LOG"

step "torch.compile at the headline size (budget ${COMPILE_BUDGET_S:-60} s)"
timeout -s INT -k 10 "${COMPILE_BUDGET_S:-60}" python3 -m benchmarks.run --out "$OUT" --no-plots \
  --impl compile compile-max-autotune ${COMPILE_ARGS:---N 8192 --V 128256 --dtype bfloat16} 2>&1 | grep -v "case/s" | \
  tail -12 >>"$LOG"

step "tuning sweep (budget ${TUNE_BUDGET_S:-50} s)"
timeout -s INT -k 10 $(( ${TUNE_BUDGET_S:-50} + 30 )) python3 -m benchmarks.tune --budget-s "${TUNE_BUDGET_S:-50}" \
  --out "$OUT" ${TUNE_ARGS:-} 2>&1 | tail -70 >>"$LOG"

step "fused-linear sweep (budget ${FUSED_BUDGET_S:-50} s)"
timeout -s INT -k 10 $(( ${FUSED_BUDGET_S:-50} + 30 )) python3 -m benchmarks.fused_linear --budget-s "${FUSED_BUDGET_S:-50}" \
  --out "$OUT" ${FUSED_ARGS:-} 2>&1 | grep -v "case/s" | tail -60 >>"$LOG"
step "done"
