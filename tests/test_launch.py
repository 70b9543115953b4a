"""launch/: every file's header, the commands the cluster scripts would run, and the Colab
notebook (valid nbformat 4; its training command, with the smoke variant, runs here)."""

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import run_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = (
  'local_multiprocess.sh',
  'gpu.sh',
  'slurm.sbatch',
  'tpu_vm.sh',
  'benchmark_gpu.sh',
  'gpu_wheels.sh',
)


_run = run_helpers.run_process_group


def _recorder(directory, name):
  """An executable `name` in `directory` that appends its arguments, one per line, to name.log
  and a line '--' after them."""
  path = directory / name
  path.write_text(
    '#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done >> '
    f'{directory / (name + ".log")}\necho -- >> {directory / (name + ".log")}\n'
  )
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


def _calls(directory, name):
  text = (directory / (name + '.log')).read_text()
  return [call.strip('\n').split('\n') for call in text.split('--\n') if call.strip()]


@pytest.mark.parametrize('name', SCRIPTS)
def test_every_script_starts_with_its_comment_block(name):
  lines = Path(LAUNCH, name).read_text().splitlines()
  assert lines[0].startswith('#!')
  header = []
  for line in lines[1:]:
    if not line.startswith('#') or line.startswith('#SBATCH'):
      break
    header.append(line)
  text = '\n'.join(header)
  for word in ('Needs:', 'Call:', 'Writes:'):
    assert word in text, (name, word)
  assert os.access(os.path.join(LAUNCH, name), os.X_OK)
  assert subprocess.run(['bash', '-n', os.path.join(LAUNCH, name)]).returncode == 0


def test_local_multiprocess_without_a_count_prints_its_usage():
  code, output = _run(['bash', os.path.join(LAUNCH, 'local_multiprocess.sh')])
  assert code == 2 and 'Call:' in output


def test_gpu_script_passes_the_flags_and_sets_known_xla_flags(tmp_path):
  python = _recorder(tmp_path, 'python')
  env_dump = tmp_path / 'env'
  python.write_text(python.read_text() + f'printf "%s" "$XLA_FLAGS" > {env_dump}\n')
  env = dict(os.environ, PYTHON=str(python), PATH=f'{tmp_path}:{os.environ["PATH"]}')
  code, output = _run(
    ['bash', os.path.join(LAUNCH, 'gpu.sh'), '--config=configs/coco.py', '--workdir=runs/coco'], env
  )
  assert code == 0, output
  assert _calls(tmp_path, 'python') == [
    ['-m', 'kmcl_jax.main', '--config=configs/coco.py', '--workdir=runs/coco']
  ]
  xla_flags = env_dump.read_text()
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in xla_flags
  # XLA rejects unknown flags on any platform: this jaxlib knows every flag the script sets.
  check = subprocess.run(
    [sys.executable, '-c', 'import jax; jax.devices()'],
    timeout=120,
    env=dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
  )
  assert check.returncode == 0, check.stderr


# Parses a benchmark's command line with its own absl flags, without running it.
_PARSE_FLAGS = """
import importlib, sys
from absl import flags
importlib.import_module(sys.argv[1])
flags.FLAGS(sys.argv[1:])
"""


def test_benchmark_gpu_script_installs_the_wheels_and_passes_valid_flags(tmp_path):
  """The one GPU run a session may get must not be lost to a misspelt flag: every benchmark the
  script calls parses its command line here (absl rejects unknown flags and bad values)."""
  python = _recorder(tmp_path, 'python')
  wheels = tmp_path / 'wheels'
  wheels.mkdir()
  wheel = wheels / 'grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl'
  wheel.write_bytes(b'')
  env = dict(os.environ, PYTHON=str(python), WHEELS=str(wheels), TMPDIR=str(tmp_path))
  code, output = _run(
    ['bash', os.path.join(LAUNCH, 'benchmark_gpu.sh'), str(tmp_path / 'out')], env
  )
  assert code == 0, output
  calls = _calls(tmp_path, 'python')
  assert calls[0][:3] == ['-m', 'pip', 'install'] and calls[0][-1] == str(wheel)
  assert '--no-index' in calls[0] and '--no-deps' in calls[0]
  assert calls[0][calls[0].index('--target') + 1] == str(tmp_path / 'kmcl_jax_site')
  benchmarks = [call[1:] for call in calls if call[1].startswith('kmcl_jax.benchmarks.')]
  modules = [call[0] for call in benchmarks]
  assert sorted(set(modules)) == [
    f'kmcl_jax.benchmarks.{name}'
    for name in ('augment_device', 'input_pipeline', 'losses', 'train_step')
  ]
  assert len(modules) == 6
  written = {
    Path(arg.split('=', 1)[1]).name
    for call in benchmarks
    for arg in call
    if arg.startswith('--json=')
  }
  assert len(written) == 6  # one JSON file per benchmark, none overwritten
  for module, *flags in benchmarks:
    check = subprocess.run(
      [sys.executable, '-c', _PARSE_FLAGS, module, *flags],
      cwd=ROOT,
      timeout=120,
      env=run_helpers.env_without_forced_devices(),
      capture_output=True,
      text=True,
    )
    assert check.returncode == 0, (module, flags, check.stderr[-2000:])


def test_gpu_wheels_script_downloads_the_pinned_packages_without_dependencies(tmp_path):
  python = _recorder(tmp_path, 'python')
  code, output = _run(
    ['bash', os.path.join(LAUNCH, 'gpu_wheels.sh'), str(tmp_path / 'wheels')],
    dict(os.environ, PYTHON=str(python)),
  )
  assert code == 0, output
  (call,) = _calls(tmp_path, 'python')
  assert call[:3] == ['-m', 'pip', 'download'] and '--no-deps' in call
  assert call[call.index('--python-version') + 1] == '3.12'
  pins = dict(
    line.split('==')
    for line in Path(ROOT, 'requirements.txt').read_text().splitlines()
    if '==' in line and ';' not in line
  )
  for name in (
    'grain',
    'ml-collections',
    'simplejpeg',
    'tensorboardx',
    'optax',
    'orbax-checkpoint',
  ):
    assert f'{name}=={pins[name]}' in call, name
  assert 'array-record' in call and 'portpicker' in call


def test_slurm_script_starts_one_process_per_node_with_the_distributed_flags(tmp_path):
  fake = tmp_path / 'bin'
  fake.mkdir()
  (fake / 'scontrol').write_text('#!/bin/bash\nprintf "gpu017\\ngpu018\\n"\n')
  # srun: record its options, then run the task command as SLURM's task 1 of 2 would.
  (fake / 'srun').write_text(
    '#!/bin/bash\nwhile [[ "$1" == -* ]]; do echo "$1" >> '
    + str(fake / 'srun.log')
    + '; shift; done\nSLURM_PROCID=1 SLURM_NTASKS=2 "$@"\n'
  )
  for name in ('scontrol', 'srun'):
    (fake / name).chmod(0o755)
  python = _recorder(fake, 'python')
  env = dict(
    os.environ,
    PATH=f'{fake}:{os.environ["PATH"]}',
    PYTHON=str(python),
    SLURM_JOB_ID='4242',
    SLURM_JOB_NODELIST='gpu[017-018]',
  )
  code, output = _run(
    [
      'bash',
      os.path.join(LAUNCH, 'slurm.sbatch'),
      '--config=configs/coco.py',
      '--workdir=/shared/runs/coco',
      '--config.dataset.root=/shared/data/coco',
    ],
    env,
  )
  assert code == 0, output
  assert (fake / 'srun.log').read_text().split() == ['--ntasks-per-node=1', '--kill-on-bad-exit=1']
  assert _calls(fake, 'python') == [
    [
      '-m',
      'kmcl_jax.main',
      '--coordinator_address=gpu017:24242',
      '--num_processes=2',
      '--process_id=1',
      '--config=configs/coco.py',
      '--workdir=/shared/runs/coco',
      '--config.dataset.root=/shared/data/coco',
    ]
  ]
  lines = Path(LAUNCH, 'slurm.sbatch').read_text().splitlines()
  directives = [line for line in lines if line.startswith('#SBATCH')]
  assert '#SBATCH --ntasks-per-node=1' in directives
  assert any(line.startswith('#SBATCH --signal=TERM@') for line in directives)


def test_tpu_vm_dry_run_prints_every_command(tmp_path):
  env = dict(
    os.environ,
    TPU_NAME='kmcl-v4',
    ZONE='us-central2-b',
    ACCELERATOR_TYPE='v4-32',
    REPO_URL='https://example.org/kmcl_jax.git',
    DATA_URI='gs://bucket/coco',
    RUN_BUCKET='bucket-runs',
    PATH=f'{tmp_path}:/usr/bin:/bin',
  )  # no gcloud here
  code, output = _run(
    [
      'bash',
      os.path.join(LAUNCH, 'tpu_vm.sh'),
      '--dry_run',
      '--config=configs/coco.py',
      '--workdir=/mnt/runs/coco',
      '--config.dataset.root=/data/coco',
    ],
    env,
  )
  assert code == 0, output
  commands = [shlex.split(line) for line in output.splitlines() if line.startswith('gcloud ')]
  create, install, data, train = commands
  assert create[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create']
  assert {'kmcl-v4', '--zone=us-central2-b', '--accelerator-type=v4-32'} <= set(create)
  for command in (install, data, train):
    assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'kmcl-v4']
    assert '--worker=all' in command
  assert 'git clone -q https://example.org/kmcl_jax.git' in install[-1]
  assert 'cd kmcl_jax; make venv PYTHON=python3.11 JAX=tpu' in install[-1]
  assert 'gcloud storage cp -r gs://bucket/coco /data/' in data[-1]
  assert 'gcsfuse --implicit-dirs bucket-runs /mnt/runs' in data[-1]
  run = train[-1]
  assert (
    '.venv/bin/python -m kmcl_jax.main --config=configs/coco.py '
    '--workdir=/mnt/runs/coco --config.dataset.root=/data/coco'
  ) in run
  assert '--coordinator_address' not in run  # a TPU slice is detected by jax.distributed
  # --skip_create leaves out the create command.
  code, output = _run(
    [
      'bash',
      os.path.join(LAUNCH, 'tpu_vm.sh'),
      '--dry_run',
      '--skip_create',
      '--config=configs/coco.py',
    ],
    env,
  )
  assert code == 0 and 'tpu-vm create' not in output


def _notebook():
  with open(os.path.join(LAUNCH, 'colab.ipynb')) as f:
    return json.load(f)


def test_notebook_is_valid_nbformat_4():
  nb = _notebook()
  assert nb['nbformat'] == 4 and isinstance(nb['nbformat_minor'], int)
  assert nb['metadata']['kernelspec']['name'] == 'python3'
  ids = [cell['id'] for cell in nb['cells']]
  assert len(set(ids)) == len(ids)
  for cell in nb['cells']:
    assert cell['cell_type'] in ('markdown', 'code')
    assert isinstance(cell['metadata'], dict)
    assert all(isinstance(line, str) for line in cell['source'])
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None
      # Plain Python apart from IPython's ! and % lines (a shell command: a statement).
      lines = ''.join(cell['source']).splitlines()
      python = '\n'.join(
        line[: len(line) - len(line.lstrip())] + 'pass'
        if line.lstrip().startswith(('!', '%'))
        else line
        for line in lines
      )
      compile(python, cell['id'], 'exec')
  assert nb['cells'][0]['cell_type'] == 'markdown'
  assert 'Few CPU cores' in ''.join(nb['cells'][2]['source'])


def test_notebook_training_cell_runs_with_the_smoke_variant(tmp_path):
  cells = [''.join(c['source']) for c in _notebook()['cells'] if c['cell_type'] == 'code']
  train_cell = next(c for c in cells if '!python -m kmcl_jax.main --config={CONFIG}' in c)
  assert "CONFIG = 'configs/synthetic.py'" in train_cell
  command = next(line for line in train_cell.splitlines() if line.startswith('!python'))
  workdir = str(tmp_path / 'run')
  argv = shlex.split(
    command[1:].replace('{CONFIG}', 'configs/synthetic.py:smoke').replace('{WORKDIR}', workdir)
  )
  code, output = _run([sys.executable, *argv[1:]])
  assert code == 0, output
  assert os.path.exists(os.path.join(workdir, 'results.json'))
  # The table and curve cells, on that run (matplotlib without a display).
  shown = [c for c in cells if "open(f'{WORKDIR}/" in c]
  assert len(shown) == 2
  code, output = _run(
    [sys.executable, '-c', f'WORKDIR = {workdir!r}\n' + '\n'.join(shown)],
    dict(os.environ, MPLBACKEND='Agg'),
  )
  assert code == 0, output
  assert 'mAP' in output and 'selected step 3' in output
