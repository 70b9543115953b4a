#!/usr/bin/env bash
# Every benchmark that needs an accelerator, in one run (< 8 minutes on one H100/H200), no
# network: JSON files in one folder, the tables on stdout (tee them into BENCHMARKS.md rows).
#
# Needs:   one NVIDIA GPU host with a CUDA jax (e.g. `make venv` there), this checkout, and
#          for an image without network the wheels folder below.
# Call:    launch/benchmark_gpu.sh [OUT_DIR]        (default runs/benchmarks-<date>)
# Env:     PYTHON (default .venv/bin/python if present, else python3);
#          WHEELS (default wheels/): when this folder exists, its wheels (the packages the GPU
#          image lacks, made by launch/gpu_wheels.sh) are installed first, as below.
#
# GPU images often ship jax and flax (e.g. jax 0.11.2 + flax 0.12.10) but not the rest of
# requirements.txt: make the wheels folder beforehand with launch/gpu_wheels.sh on a machine with
# a package index, and copy it with the checkout. They are installed without their dependencies
# into a folder put first on PYTHONPATH, so the image's own packages stay as they are. Nothing is
# downloaded here.
#
# Writes:  in OUT_DIR,
#   train_step_bf16_b64.json   TResNet-M 224 and TResNet-L 448, bf16, batch 64, step alone
#   end_to_end_bf16_b64.json   TResNet-M 224, bf16, batch 64: the step alone and the whole
#                              training loop on synthetic images, host and device augmentation
#   train_step_bf16_b256.json  TResNet-M 224, bf16, batch 256
#   losses.json                the KMCL objective, jitted, up to N = 1024
#   input_pipeline_8cores.json the trainer's feed alone (synthetic 224 px, batch 64), host vs
#                              device augmentation, pinned to 8 host cores
#   augment_device.json        the device augmentation alone (224 px, batch 64): RandAugment
#                              per image (the trainer's) vs whole batch, RandomAffine; host PIL
# Time limits per benchmark (timeout) keep the whole under 8 minutes; the compiled steps go to
# the persistent compilation cache, so a second run of the script compiles nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
out=${1:-$root/runs/benchmarks-$(date +%Y%m%d-%H%M)}
wheels=${WHEELS:-$root/wheels}
mkdir -p "$out"
cd "$root"

if [[ -d "$wheels" ]]; then
  site=${TMPDIR:-/tmp}/kmcl_jax_site
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$site" \
      "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The repository itself without touching the image's jax/flax.
"$PYTHON" -c 'import kmcl_jax' 2>/dev/null || export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
"$PYTHON" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__,
jax.devices())'
workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))

bench() {  # name, seconds, then train_step flags; a failure does not stop the others
  local name=$1 seconds=$2; shift 2
  echo "== $name"
  timeout "$seconds" "$PYTHON" -m kmcl_jax.benchmarks.train_step --json="$out/$name.json" "$@" \
      || echo "!! $name failed or ran out of time (exit $?)"
}
bench train_step_bf16_b64 140 --models=tresnet_m@224,tresnet_l@448 --batch_size=64 \
    --dtype=bfloat16 --steps=30
bench end_to_end_bf16_b64 170 --models=tresnet_m@224 --batch_size=64 --dtype=bfloat16 \
    --steps=30 --end_to_end --workers="$workers"
bench train_step_bf16_b256 60 --models=tresnet_m@224 --batch_size=256 --dtype=bfloat16 \
    --steps=30
echo "== losses"
timeout 45 "$PYTHON" -m kmcl_jax.benchmarks.losses --json="$out/losses.json" --max_loop_n=64 \
    --repeats=3 || echo "!! losses failed or ran out of time (exit $?)"
echo "== input_pipeline_8cores"
timeout 35 "$PYTHON" -m kmcl_jax.benchmarks.input_pipeline --sizes=224 --batch_size=64 \
    --cores="$workers" --workers=0,"$workers" --seconds=3 \
    --json="$out/input_pipeline_8cores.json" || echo "!! input_pipeline failed (exit $?)"
echo "== augment_device"
timeout 25 "$PYTHON" -m kmcl_jax.benchmarks.augment_device --sizes=224 --batch_size=64 \
    --steps=10 --host_seconds=2 --json="$out/augment_device.json" \
    || echo "!! augment_device failed (exit $?)"
echo "JSON files in $out"
