"""Set-up: the JAX build chosen by tools/select_jax.py and the Makefile, and the console scripts."""

import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'tools' / 'select_jax.py'


def _load_select_jax():
  spec = importlib.util.spec_from_file_location('select_jax', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


select_jax = _load_select_jax()


def _fake_nvidia_smi(directory: pathlib.Path, output: str, status: int = 0) -> str:
  """A fake `nvidia-smi` in `directory`; returns a PATH that finds it first."""
  tool = directory / 'nvidia-smi'
  tool.write_text(f'#!/bin/sh\nprintf "{output}"\nexit {status}\n')
  tool.chmod(0o755)
  return f'{directory}{os.pathsep}{os.environ["PATH"]}'


def _no_tpu(tmp_path: pathlib.Path) -> dict[str, str]:
  (tmp_path / 'pci').mkdir(exist_ok=True)
  (tmp_path / 'dev').mkdir(exist_ok=True)
  return {'pci_dir': str(tmp_path / 'pci'), 'dev_dir': str(tmp_path / 'dev')}


@pytest.mark.parametrize(
  'output, build',
  [
    ('580.65.06\\n', 'cuda13'),
    ('590.12\\n590.12\\n', 'cuda13'),  # one line per GPU
    ('535.104.05\\n', 'cuda12'),
    ('525.60.13\\n', 'cuda12'),
  ],
)
def test_driver_version_selects_cuda(tmp_path, monkeypatch, output, build):
  monkeypatch.setenv('PATH', _fake_nvidia_smi(tmp_path, output))
  assert select_jax.detect(**_no_tpu(tmp_path)) == build


def test_old_driver_or_failing_nvidia_smi_gives_cpu(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('PATH', _fake_nvidia_smi(tmp_path, '470.82.01\\n'))
  assert select_jax.detect(**_no_tpu(tmp_path)) == 'cpu'
  assert 'older than 525' in capsys.readouterr().err
  # nvidia-smi is installed but finds no driver (exit 9, message on stdout).
  monkeypatch.setenv(
    'PATH',
    _fake_nvidia_smi(
      tmp_path, 'NVIDIA-SMI has failed because it could not communicate with the driver.\\n', 9
    ),
  )
  assert select_jax.detect(**_no_tpu(tmp_path)) == 'cpu'


def test_tpu_detection(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))  # no nvidia-smi at all
  dirs = _no_tpu(tmp_path)
  nic = tmp_path / 'pci' / '0000:00:04.0'  # gVNIC: Google's vendor id, but not a TPU
  nic.mkdir()
  (nic / 'vendor').write_text('0x1ae0\n')
  (nic / 'device').write_text('0x0042\n')
  assert select_jax.detect(**dirs) == 'cpu'
  chip = tmp_path / 'pci' / '0000:00:05.0'  # a TPU v5e chip
  chip.mkdir()
  (chip / 'vendor').write_text('0x1ae0\n')
  (chip / 'device').write_text('0x0063\n')
  assert select_jax.detect(**dirs) == 'tpu'
  shutil.rmtree(chip)
  (tmp_path / 'dev' / 'accel0').touch()  # TPU v4 VMs: /dev/accel<N>
  assert select_jax.detect(**dirs) == 'tpu'


def test_command_line_detects_and_overrides(tmp_path):
  env = dict(os.environ, PATH=_fake_nvidia_smi(tmp_path, '580.65.06\\n'))

  def run(*args: str) -> str:
    return subprocess.run(
      [sys.executable, str(SCRIPT), *args],
      env=env,
      check=True,
      capture_output=True,
      text=True,
      timeout=60,
    ).stdout.strip()

  assert run() == 'jax[cuda13]'
  assert run('--name') == 'cuda13'
  assert run('cpu') == 'jax[cpu]'
  assert run('tpu') == 'jax[tpu]'
  bad = subprocess.run(
    [sys.executable, str(SCRIPT), 'cuda11'], env=env, capture_output=True, text=True, timeout=60
  )
  assert bad.returncode != 0 and 'invalid choice' in bad.stderr


def test_make_installs_the_selected_build(tmp_path):
  env = dict(os.environ, PATH=_fake_nvidia_smi(tmp_path, '580.65.06\\n'))
  env.pop('JAX', None)

  def requirements(*args: str) -> list[str]:
    """What `make demo` would pass to pip after `-r requirements.txt`."""
    # -n prints the recipes without running them, -B as if the venv had never been installed.
    out = subprocess.run(
      ['make', '-n', '-B', '-C', str(ROOT), 'demo', *args],
      env=env,
      check=True,
      capture_output=True,
      text=True,
      timeout=120,
    ).stdout
    return [
      line.split('-r requirements.txt', 1)[1].strip()
      for line in out.splitlines()
      if 'pip install' in line and '-r requirements.txt' in line
    ]

  assert requirements('JAX=cpu') == ["'jax[cpu]'"]
  assert requirements() == ["'jax[cuda13]'"]
  assert requirements('JAX=tpu') == ["'jax[tpu]'"]
  bad = subprocess.run(
    ['make', '-n', '-C', str(ROOT), 'demo', 'JAX=rocm'],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0 and 'use cpu, cuda12, cuda13 or tpu' in bad.stderr


def test_console_scripts():
  """The installed metadata (pip install --no-deps -e .) lists pyproject's scripts, and each
  resolves to a callable. Modules not written yet are left out until they exist."""
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    declared = tomllib.load(f)['project']['scripts']
  installed = {
    ep.name: ep.value
    for ep in importlib.metadata.distribution('kmcl_jax').entry_points
    if ep.group == 'console_scripts'
  }
  assert installed == declared, 'stale install: run `make venv` or `pip install --no-deps -e .`'
  # One process per module, all at once: their absl flags must not meet in one flag registry.
  checks = {}
  for name, value in declared.items():
    module, function = value.split(':')
    if importlib.util.find_spec(module) is not None:
      checks[f'{name} = {value}'] = subprocess.Popen(
        [sys.executable, '-c', f'import {module} as m; assert callable(m.{function})'],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS='cpu'),
      )
  unresolved = []
  for entry, process in checks.items():
    _, err = process.communicate(timeout=120)
    if process.returncode != 0:
      unresolved.append(f'{entry}: {err.strip().splitlines()[-1]}')
  assert not unresolved, '\n'.join(unresolved)
