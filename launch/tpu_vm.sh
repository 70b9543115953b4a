#!/usr/bin/env bash
# A Cloud TPU VM slice (one host or a pod slice of several): create it, install the package on
# every worker, bring the data, and run the same training command on all workers at once.
#
# Needs:   gcloud (authenticated, a project with TPU quota), this repository reachable by git
#          from the workers (REPO_URL), the dataset in a Cloud Storage bucket (DATA_URI).
# Call:    launch/tpu_vm.sh [--dry_run] [--skip_create] [kmcl_jax.main flags...]
#          e.g. TPU_NAME=kmcl ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#               REPO_URL=https://github.com/<you>/kmcl_jax.git DATA_URI=gs://<bucket>/coco \
#               RUN_BUCKET=<bucket> launch/tpu_vm.sh --config=configs/coco.py \
#               --workdir=/mnt/runs/coco --config.dataset.root=/data/coco
#          --dry_run prints every command instead of running it; --skip_create reuses the VM.
# Env:     TPU_NAME, ZONE, ACCELERATOR_TYPE (default v4-8), RUNTIME_VERSION (default
#          tpu-ubuntu2204-base), REPO_URL, DATA_URI (copied to /data/<its last part> on every
#          worker), RUN_BUCKET (mounted with gcsfuse at /mnt/runs: put --workdir under it).
# Writes:  on the VM: ~/kmcl_jax (the code and its .venv), /data (a local copy of the data),
#          and --workdir, which must be storage all workers share: here the bucket mounted at
#          /mnt/runs (checkpoints are written by all workers together, logs by worker 0).
#
# No --coordinator_address: on a TPU VM slice jax.distributed finds the workers itself. Reading
# the data from a local copy keeps the input pipeline off the network; a slice's workers each
# read only their share of every batch.
set -euo pipefail

dry_run=0
create=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) dry_run=1; shift ;;
    --skip_create) create=0; shift ;;
    *) break ;;
  esac
done
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO_URL:?set REPO_URL}"
: "${DATA_URI:?set DATA_URI (gs://...)}" "${RUN_BUCKET:?set RUN_BUCKET}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}

run() {
  if ((dry_run)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

if ((create)); then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
fi

# Remote commands are one line each, so that --dry_run prints one line per command.
repo=$(printf %q "$REPO_URL")
# Python 3.11 (the pins need it; the Ubuntu 22.04 images have 3.10), then `make venv`.
on_all_workers "set -e; sudo apt-get update -q; \
sudo apt-get install -y -q make python3.11 python3.11-venv; \
if [ -d kmcl_jax ]; then git -C kmcl_jax pull -q; else git clone -q $repo kmcl_jax; fi; \
cd kmcl_jax; make venv PYTHON=python3.11 JAX=tpu"

data_dir=$(printf %q "/data/$(basename "$DATA_URI")")
apt_line='deb [signed-by=/usr/share/keyrings/cloud.google.asc]'
apt_line+=' https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main'
on_all_workers "set -e; sudo mkdir -p /data /mnt/runs; sudo chown \$USER /data /mnt/runs; \
if ! command -v gcsfuse >/dev/null; then \
echo \"$apt_line\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; \
curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg \
| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
sudo apt-get update -q; sudo apt-get install -y -q gcsfuse; fi; \
[ -d $data_dir ] || gcloud storage cp -r $(printf %q "$DATA_URI") /data/; \
mountpoint -q /mnt/runs || gcsfuse --implicit-dirs $(printf %q "$RUN_BUCKET") /mnt/runs"

# nohup: the run survives a dropped ssh session; its log is ~/kmcl_jax/train.log per worker.
on_all_workers "cd kmcl_jax && nohup .venv/bin/python -m kmcl_jax.main $(printf '%q ' "$@") \
  > train.log 2>&1 &"
echo "Follow worker 0: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0" \
  "--command='tail -f kmcl_jax/train.log'"
