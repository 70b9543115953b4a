#!/usr/bin/env bash
# N training processes on this machine, talking over localhost: the multi-host code path
# (jax.distributed, per-process data shards, collective checkpoints) on one box, on CPU.
#
# Needs:   the package installed (make venv), bash >= 5.1; nothing else (CPU devices, gloo
#          collectives).
# Call:    launch/local_multiprocess.sh N [kmcl_jax.main flags...]
#          e.g. launch/local_multiprocess.sh 2 --config=configs/synthetic.py:smoke \
#                 --workdir=runs/mp
# Env:     DEVICES_PER_PROCESS (default 4) CPU devices per process, so N x 4 devices in all
#          (batch_size must be a multiple); PORT (default: a free one) the coordinator port;
#          PYTHON (default .venv/bin/python if present, else python3).
# Writes:  what kmcl_jax.main writes, once, in --workdir (only process 0 writes files; the
#          checkpoints are saved by all processes together). Each process's log goes to this
#          terminal; process 0 logs at INFO, the others only warnings.
# Signals: SIGTERM to this script is passed on to every process (they agree on a step, save one
#          checkpoint and exit); Ctrl-C reaches them all directly from the terminal. When one
#          process fails, the others are killed once it has exited (JAX keeps a failed process
#          up to 5 minutes in its shutdown barrier). Exit status: the first failure's, else 0.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
  exit 2
fi
num_processes=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
port=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0));
print(s.getsockname()[1])')}

export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"

pids=()
for ((i = 0; i < num_processes; i++)); do
  (cd "$root" && exec "$PYTHON" -m kmcl_jax.main --coordinator_address="localhost:$port" \
      --num_processes="$num_processes" --process_id="$i" "$@") &
  pids+=($!)
done

forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap ':' INT  # the terminal already sent SIGINT to every process; a second one stops them

status=0
remaining=${#pids[@]}
while ((remaining > 0)); do
  # wait -n returns when any process ends (or a trapped signal arrives: then wait again).
  if wait -n "${pids[@]}" 2>/dev/null; then code=0; else code=$?; fi
  alive=()
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
  done
  if ((${#alive[@]} < remaining)); then
    if ((code != 0 && status == 0)); then
      status=$code
      if ((code != 130 && code != 143)); then
        # A failure, not a stop on SIGINT/SIGTERM: the others would wait for it forever.
        kill -KILL "${alive[@]+"${alive[@]}"}" 2>/dev/null || true
      fi
    fi
    remaining=${#alive[@]}
  fi
  pids=("${alive[@]+"${alive[@]}"}")
done
exit "$status"
