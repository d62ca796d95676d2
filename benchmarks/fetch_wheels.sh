#!/usr/bin/env bash
# Download the peers' wheels for a GPU machine that cannot reach PyPI (the device tool's H200: Python 3.12,
# torch 2.11 + CUDA 13, Triton 3.6; transformers, accelerate, pandas, pyarrow, xxhash already there), run here,
# where pip works, from the repository root. Writes three git-ignored folders, each under the device tool's
# 64 MiB carry limit:
#   .whl/          TRL, its datasets stack, Liger-Kernel, Cut Cross-Entropy (about 3 MB)
#   .whl-quack-1/  QuACK and its small dependencies, and the first half of the CuTe DSL CUDA 13 runtime
#                  (nvidia-cutlass-dsl-libs-cu13 is 92 MB alone)
#   .whl-quack-2/  the second half
# gpu_session.sh joins the halves and installs everything it finds. With a warm machine kept between two calls
# (30 s idle at most), carry the halves in two calls:
#   device run: command="ls .whl-quack-1", carry=[".whl-quack-1"], timeout_s=60
#   device run: command="bash benchmarks/gpu_session.sh", carry=[".whl", ".whl-quack-2"], timeout_s=600
set -euo pipefail
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fetch() { python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$@"; }

fetch .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
rm -rf .whl-quack-1 .whl-quack-2
# libs-core holds the `cutlass` package itself; cuda-bindings, protobuf and einops are in the machine's image
fetch .whl-quack-1 quack-kernels==0.6.5 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
mkdir -p .whl-quack-2
fetch /tmp/fastdpo-big-wheel nvidia-cutlass-dsl-libs-cu13==4.8.1
big=$(ls /tmp/fastdpo-big-wheel/nvidia_cutlass_dsl_libs_cu13-*.whl)
half=$(( ($(stat -c %s "$big") + 1) / 2 ))
head -c "$half" "$big" >".whl-quack-1/$(basename "$big").part1"
tail -c +"$(( half + 1 ))" "$big" >".whl-quack-2/$(basename "$big").part2"
cat .whl-quack-1/*.part1 .whl-quack-2/*.part2 | cmp - "$big"  # the halves join back into the wheel
rm -rf /tmp/fastdpo-big-wheel
du -sh .whl .whl-quack-1 .whl-quack-2
