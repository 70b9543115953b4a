"""Several processes, one run: start-up of JAX's multi-controller runtime, the topology line,
and a stop on SIGTERM/SIGINT that every process agrees on.

Start-up (`initialize`). `jax.distributed.initialize` runs before anything touches a device:
with --coordinator_address, --num_processes and --process_id when they are given, else with what
JAX detects itself (SLURM, Open MPI, Cloud TPU VM pods); a plain run stays one process. When
the coordinator never answers (or not every process connects), JAX ends the process with a C++
fatal error; a watchdog ends it first, with one message naming the flags to check.

First step (`compile_together`). With several processes, the train step is compiled before
its first run and the processes then meet at a barrier, so that they enter the first collective
together (Gloo on CPU gives up after 30 s).

Stop (`StopSignals`). SIGTERM (preemption) and SIGINT (Ctrl-C) only record themselves; the train
loop asks `agreed()` once per step and, when it names a signal, saves one checkpoint on every
process together and exits with 128 + the signal number. A second Ctrl-C ends the process at
once (the signal's default action); a repeated SIGTERM changes nothing. With one process the
answer is the local flag, read without any device work. With several, each step launches a tiny
all-reduce (max) of the processes' flags and reads the one launched a step earlier, so every
process stops on the same step, and the host still runs a step ahead of the devices.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

# jax.distributed.initialize's own deadline, past ours: our watchdog speaks first.
_JAX_TIMEOUT_MARGIN_S = 30


def data_mesh() -> jax.sharding.Mesh:
  """The one mesh of every job: axis 'data' over all devices of all processes (batches are
  sharded along it, parameters replicated). Auto axis types, chosen deliberately (jax.make_mesh
  defaults to Explicit): the jitted functions leave the partitioning to XLA."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def flag_error(
  coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> str | None:
  """The problem with the three multi-process flags, or None when they are usable."""
  given = {
    '--coordinator_address': coordinator_address,
    '--num_processes': num_processes,
    '--process_id': process_id,
  }
  if all(v is None for v in given.values()):
    return None
  missing = [name for name, v in given.items() if v is None]
  if missing:
    return (
      f'{", ".join(missing)} missing: give all of --coordinator_address, --num_processes '
      'and --process_id, or none of them (one process, or what JAX detects under SLURM '
      'and on Cloud TPU VM pods).'
    )
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    return f'--coordinator_address={coordinator_address!r} is not HOST:PORT.'
  if num_processes < 1:
    return f'--num_processes={num_processes} must be at least 1.'
  if not 0 <= process_id < num_processes:
    return (
      f'--process_id={process_id} is out of range: with --num_processes={num_processes} '
      f'it must be in [0, {num_processes - 1}].'
    )
  return None


def initialize(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  *,
  timeout_s: int,
) -> None:
  """Starts jax.distributed (flags, else auto-detection) or leaves a plain run single-process.

  Call before anything touches a device, with flags that `flag_error` accepts. Ends the process
  with one message when start-up takes longer than `timeout_s`.
  """
  if num_processes is None:
    what = 'the process group JAX detected (SLURM, Open MPI or a Cloud TPU VM pod)'
  else:
    what = (
      f'process {process_id} of {num_processes}: the coordinator at '
      f'{coordinator_address} did not answer, or not all {num_processes} processes '
      'connected (start each with the same --coordinator_address and --num_processes '
      'and its own --process_id)'
    )
  message = (
    f'error: multi-process start-up did not finish within {timeout_s} s '
    f'(--coordinator_timeout_s) for {what}.\n'
  )

  def give_up():
    sys.stderr.write(message)
    sys.stderr.flush()
    os._exit(1)

  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    if num_processes is not None:
      jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S,
      )
    else:
      try:
        jax.distributed.initialize(initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)
      except ValueError:
        pass  # no cluster environment detected (JAX asks for an address): one process
  finally:
    watchdog.cancel()


def platform_line() -> str:
  """'JAX platform gpu: 8 devices (NVIDIA H200) on 1 process': the run's first log line."""
  devices = jax.devices()
  kinds = ', '.join(sorted({d.device_kind for d in devices}))
  processes = jax.process_count()
  line = (
    f'JAX platform {devices[0].platform}: {len(devices)} devices ({kinds}) on '
    f'{processes} process{"es" if processes > 1 else ""}'
  )
  if processes > 1:
    line += f', {jax.local_device_count()} local devices each'
  return line


def batch_line(batch_size: int, eval_batch_size: int) -> str:
  """How the global batches split over processes and devices."""
  processes, devices = jax.process_count(), jax.device_count()

  def split(name, value):
    return (
      f'{name} {value} = {processes} x {value / processes:g} per process = {devices} x '
      f'{value / devices:g} per device'
    )

  return f'{split("global batch", batch_size)}; {split("eval batch", eval_batch_size)}'


def compile_together(jitted, *args) -> None:
  """With several processes: compiles `jitted` for `args`, then waits for every process.

  The first collective of a run sets up the communicators, and Gloo (CPU) gives up when the
  processes arrive more than 30 s apart, which uneven compile times on a busy machine cause. The
  coordination service's barrier waits as long as needed; the later call reuses the compiled
  program. One process: nothing to do (the call compiles as usual).
  """
  if jax.process_count() == 1:
    return
  jitted.lower(*args).compile()
  ocp.multihost.sync_global_processes('kmcl_jax_compiled')


class StopSignals:
  """SIGTERM and SIGINT -> a stop step that every process agrees on (see module docstring)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, mesh: jax.sharding.Mesh):
    self.received = 0
    self._previous = {}
    self._pending = None
    self._any = None
    if jax.process_count() > 1:
      self._flags_sharding = NamedSharding(mesh, P(mesh.axis_names))
      self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

  def install(self) -> None:
    """Handles the signals from now on (main thread only)."""
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def restore(self) -> None:
    for s, handler in self._previous.items():
      # None: the handler was not set from Python (e.g. JAX's C++ preemption notifier).
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received and signum == signal.SIGINT:
      signal.signal(signum, signal.SIG_DFL)  # second Ctrl-C: the default action, now
      os.kill(os.getpid(), signum)
      return
    self.received = self.received or signum

  def agreed(self) -> int:
    """The signal number on which every process stops at this step, or 0 (call every step)."""
    if self._any is None:
      return self.received
    local = np.full((jax.local_device_count(),), self.received, np.int32)
    launched = self._any(jax.make_array_from_process_local_data(self._flags_sharding, local))
    previous, self._pending = self._pending, launched
    return 0 if previous is None else int(previous)
