#!/usr/bin/env bash
# Wheels of the packages a GPU image lacks, for launch/benchmark_gpu.sh on a host without network.
#
# Needs:   pip and a package index here (nothing is installed); the GPU image's Python version.
# Call:    launch/gpu_wheels.sh [DIR]          (default wheels/, which git ignores)
# Env:     GPU_PYTHON (default 3.12: the CPython of the GPU image), PYTHON (default python3).
# Writes:  DIR/*.whl for CPython $GPU_PYTHON on x86_64 Linux: grain, array-record, portpicker,
#          ml-collections, simplejpeg, tensorboardx, optax and orbax-checkpoint, at the versions
#          requirements.txt pins where it pins them, without their dependencies (a GPU image with
#          jax and flax has those: numpy, etils, protobuf, tensorstore, ...). About 7 MB.
# Then copy DIR beside the checkout there, and launch/benchmark_gpu.sh installs it (WHEELS=DIR).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/wheels}
specs=()
for name in grain array-record portpicker ml-collections simplejpeg tensorboardx optax \
    orbax-checkpoint; do
  pin=$(grep -i -E "^${name}==" "$root/requirements.txt" || true)
  specs+=("${pin:-$name}")
done
mkdir -p "$dir"
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "${specs[@]}"
ls "$dir"
