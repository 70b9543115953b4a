"""kmcl_jax.allocator: which malloc a process runs on, and the commands' restart on tcmalloc."""

import os
import sys

import pytest
import run_helpers

from kmcl_jax import allocator

INSTALLED = [path for path in allocator.TCMALLOC_PATHS if os.path.exists(path)]
THRESHOLD = 'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'


def test_malloc_name_reads_the_preloaded_allocator_from_the_process_maps(tmp_path):
  maps = tmp_path / 'maps'
  libc = '7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n'
  maps.write_text(libc)
  assert allocator.malloc_name(str(maps)) == 'glibc'
  maps.write_text(libc + '7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/libtcmalloc_minimal.so.4\n')
  assert allocator.malloc_name(str(maps)) == 'tcmalloc'
  assert allocator.malloc_name(str(tmp_path / 'absent')) == 'unknown'


@pytest.fixture
def libraries(tmp_path):
  """Three candidate paths: the first absent, the other two present."""
  paths = [str(tmp_path / f'lib{i}' / 'libtcmalloc_minimal.so.4') for i in range(3)]
  for path in paths[1:]:
    os.makedirs(os.path.dirname(path))
    open(path, 'w').close()
  return paths


def test_tcmalloc_environ_preloads_the_first_installed_library(libraries):
  env = allocator.tcmalloc_environ({'PATH': '/bin'}, libraries)
  assert env == {'PATH': '/bin', 'LD_PRELOAD': libraries[1], THRESHOLD: str(1 << 40)}
  # A report threshold the user set wins; an empty LD_PRELOAD counts as unset.
  env = allocator.tcmalloc_environ({THRESHOLD: '5', 'LD_PRELOAD': ''}, libraries)
  assert env == {'LD_PRELOAD': libraries[1], THRESHOLD: '5'}


def test_tcmalloc_environ_leaves_a_preload_an_opt_out_and_a_system_without_it_alone(libraries):
  assert allocator.tcmalloc_environ({'LD_PRELOAD': 'libjemalloc.so.2'}, libraries) is None
  assert allocator.tcmalloc_environ({'KMCL_TCMALLOC': '0'}, libraries) is None
  assert allocator.tcmalloc_environ({}, libraries[:1]) is None
  assert allocator.tcmalloc_environ({'KMCL_TCMALLOC': '1'}, libraries) is not None


def test_run_on_tcmalloc_restarts_the_same_command_line(libraries, monkeypatch):
  command = ['python3', '-X', 'dev', '-m', 'kmcl_jax.main', '--workdir=runs/x']
  monkeypatch.setattr(sys, 'orig_argv', command)
  monkeypatch.setattr(sys, 'argv', ['/repo/kmcl_jax/main.py', '--workdir=runs/x'])
  calls = []
  allocator.run_on_tcmalloc(environ={'HOME': '/h'}, paths=libraries, execve=_record(calls))
  ((executable, argv, env),) = calls
  assert executable == sys.executable and argv == [sys.executable, *command[1:]]
  assert env['LD_PRELOAD'] == libraries[1] and env['HOME'] == '/h'
  calls.clear()  # where nothing changes, it returns and the command goes on as it is
  allocator.run_on_tcmalloc(environ={'KMCL_TCMALLOC': '0'}, paths=libraries, execve=_record(calls))
  assert calls == []
  for argv0 in ('', '-'):  # an interactive session, a script from stdin: nothing to restart
    monkeypatch.setattr(sys, 'argv', [argv0])
    allocator.run_on_tcmalloc(environ={}, paths=libraries, execve=_record(calls))
  assert calls == []


def _record(calls):
  return lambda *args: calls.append(args)


def _malloc_after_restart(**env_changes):
  """The malloc a fresh `python -c` reports after `run_on_tcmalloc()`, in this test's env."""
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'KMCL_TCMALLOC')}
  env.update(env_changes)
  code = 'from kmcl_jax import allocator as a; a.run_on_tcmalloc(); print(a.malloc_name())'
  return run_helpers.python_stdout('-c', code, env=env).strip()


def test_a_command_runs_on_tcmalloc_where_the_system_has_it():
  assert _malloc_after_restart() == ('tcmalloc' if INSTALLED else 'glibc')
  assert _malloc_after_restart(KMCL_TCMALLOC='0') == 'glibc'
