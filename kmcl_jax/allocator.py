"""The process's malloc: which one it runs on, and restarting a command on tcmalloc.

Why it matters: on CPU, every XLA train step allocates its temporary buffer (809 MB for
TResNet-M 224, batch 8) and about 15 scratch blocks of 42-56 MiB (XLA's Eigen 3x3 convolutions
at 56x56). glibc's malloc gives each block over 32 MiB its own mapping and unmaps it at free, so
the step page-faults and zero-fills all of it again: 209,000 faults and 10% of the process's CPU
time per step. tcmalloc keeps freed memory for reuse: 5-14% off the CPU step (docs: BENCHMARKS.md,
'The allocator').

The allocator is chosen when a process starts, so it cannot be switched from Python: the
commands (`kmcl-train`, `python -m kmcl_jax.main`, the benchmarks, ...) call `run_on_tcmalloc()`
first, which restarts the same command line with tcmalloc preloaded where the system has it
(`apt-get install libtcmalloc-minimal4`, `dnf install gperftools-libs`). Nothing happens where
LD_PRELOAD is already set (another allocator, a profiler), where KMCL_TCMALLOC=0, or in an
interactive session.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

# Where Debian/Ubuntu (x86_64, aarch64) and Fedora/RHEL install gperftools' tcmalloc.
TCMALLOC_PATHS = (
  '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4',
  '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
  '/usr/lib64/libtcmalloc_minimal.so.4',
)
OPT_OUT = 'KMCL_TCMALLOC'
# gperftools reports each allocation over 1 GB on stderr; a large batch makes several.
_QUIET_LARGE_ALLOCS = {'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 40)}
_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')


def malloc_name(maps_path: str = '/proc/self/maps') -> str:
  """The malloc this process runs on: a preloaded allocator's name, else 'glibc'.

  It moves CPU step times by 5-14%, so every CPU benchmark figure names it.
  """
  try:
    with open(maps_path) as f:
      maps = f.read()
  except OSError:  # not Linux
    return 'unknown'
  return next((name for name in _ALLOCATORS if f'lib{name}' in maps), 'glibc')


def tcmalloc_environ(
  environ: Mapping[str, str], paths: Sequence[str] = TCMALLOC_PATHS
) -> dict[str, str] | None:
  """`environ` with the first installed tcmalloc preloaded; None where nothing should change."""
  if environ.get('LD_PRELOAD') or environ.get(OPT_OUT, '1') == '0':
    return None
  library = next((path for path in paths if os.path.exists(path)), None)
  if library is None:
    return None
  return {**_QUIET_LARGE_ALLOCS, **environ, 'LD_PRELOAD': library}


def run_on_tcmalloc(
  *,
  environ: Mapping[str, str] = os.environ,
  paths: Sequence[str] = TCMALLOC_PATHS,
  execve: Callable[[str, list[str], dict[str, str]], object] = os.execve,
) -> None:
  """Restarts this command line with tcmalloc preloaded, where `tcmalloc_environ` says to.

  Returns only where nothing changes; otherwise the process becomes the same command (same
  interpreter, options and arguments: `sys.orig_argv`) on tcmalloc. Call it first in a
  command's entry point, before its work starts; never from library code.
  """
  env = tcmalloc_environ(environ, paths)
  # An interactive session or a script read from stdin cannot be started again.
  if env is not None and sys.argv[0] not in ('', '-'):
    sys.stdout.flush()  # exec drops what Python has buffered
    sys.stderr.flush()
    execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
