#!/usr/bin/env bash
# One host, all of its GPUs, one process: the global batch is split over every local GPU.
#
# Needs:   NVIDIA driver and GPUs; `make venv` run on this host (it installs the CUDA build of
#          jaxlib that the driver supports, see tools/select_jax.py).
# Call:    launch/gpu.sh [kmcl_jax.main flags...]
#          e.g. launch/gpu.sh --config=configs/coco.py --workdir=runs/coco \
#                 --config.dataset.root=/data/coco --config.dataset.worker_count=16
#          CUDA_VISIBLE_DEVICES=0,1 launch/gpu.sh ...   restricts it to some GPUs.
# Env:     PYTHON (default .venv/bin/python if present, else python3); XLA_FLAGS given by the
#          caller are kept, ours are appended.
# Writes:  what kmcl_jax.main writes in --workdir (logs, metrics, checkpoints, results, export).
#
# Settings, and why (not measured here: the development machine has no GPU):
#   --xla_gpu_enable_latency_hiding_scheduler=true
#       Data parallelism ends each step with an all-reduce of the gradients over the GPUs
#       (NCCL). This scheduler starts those reductions as soon as each gradient is ready and
#       overlaps them with the rest of the backward pass, instead of running them at the end.
#   Left at their defaults, on purpose:
#       XLA_PYTHON_CLIENT_PREALLOCATE / _MEM_FRACTION: JAX reserves 75% of each GPU's memory
#       up front, which avoids fragmentation; raise the fraction only to fit a larger batch.
#       NCCL_*: on one host NCCL finds NVLink/PCIe itself; NCCL_DEBUG=WARN shows what it chose.
# The input pipeline runs on the CPU (JPEG decoding, RandAugment): give it cores with
# --config.dataset.worker_count (grain worker processes), see README 'Scaling out'.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L >&2
fi
cd "$root"
exec "$PYTHON" -m kmcl_jax.main "$@"
