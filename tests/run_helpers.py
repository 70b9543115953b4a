"""Helpers shared by the tests that train the smoke config or start processes."""

import os
import signal
import subprocess
import sys

from configs import synthetic
from kmcl_jax import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_TIMEOUT_S = 900


def smoke_config(**changes):
  """The synthetic smoke config with dotted-key changes, e.g. smoke_config(**{'seed': 1})."""
  config = synthetic.get_config('smoke')
  for key, value in changes.items():
    *path, leaf = key.split('.')
    target = config
    for part in path:
      target = target[part]
    target[leaf] = value
  return config


def env_without_forced_devices(**changes):
  """os.environ without conftest's XLA_FLAGS (8 CPU devices), plus `changes`: a subprocess
  then sees this machine's own devices (one CPU device here)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(changes)
  return env


def expected_malloc(env):
  """The malloc a kmcl_jax command started with `env` reports: tcmalloc where it restarts itself
  on it (kmcl_jax/allocator.py), else the one this process runs on (it inherits LD_PRELOAD)."""
  return 'tcmalloc' if allocator.tcmalloc_environ(env) is not None else allocator.malloc_name()


def run_process_group(command, env=None, **kwargs):
  """Runs `command` in the repository root to the end (or the timeout) in its own process
  group, then kills whatever it left; returns (exit code, stdout and stderr together)."""
  proc = subprocess.Popen(
    command,
    cwd=ROOT,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    start_new_session=True,
    **kwargs,
  )
  try:
    output, _ = proc.communicate(timeout=PROCESS_TIMEOUT_S)
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    proc.wait()
  return proc.returncode, output


def python_stdout(*args, env=None, timeout=300):
  """`python ARGS` in the repository root, which must succeed; returns its stdout."""
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=env,
    check=True,
    timeout=timeout,
    capture_output=True,
    text=True,
  ).stdout
