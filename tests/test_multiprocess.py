"""Several processes on this machine (launch/local_multiprocess.sh: CPU devices, gloo), signals,
and the multi-process start-up flags.

Every subprocess has a timeout and runs in its own process group, which is killed afterwards.
The runs share the config's compilation cache (compilation_cache_dir), so only the first
2-process run compiles.
"""

import json
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import run_helpers

from configs import synthetic
from kmcl_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, 'launch', 'local_multiprocess.sh')
SMOKE = ['--config=configs/synthetic.py:smoke']

# Injected with PYTHONPATH into the trainer's processes: on its N-th train batch, the process
# whose --process_id is KMCL_TEST_PROCESS (any, when unset) sends itself KMCL_TEST_SIGNALS.
_SITECUSTOMIZE = textwrap.dedent("""\
    import os, signal, sys
    if os.environ.get('KMCL_TEST_SIGNALS'):
      from kmcl_jax import train
      _real, _calls = train._to_global, []

      def _to_global(run, batch):
        target = os.environ.get('KMCL_TEST_PROCESS')
        if 'labels' in batch and (not target or f'--process_id={target}' in sys.argv):
          _calls.append(1)
          if len(_calls) == int(os.environ['KMCL_TEST_AT']):
            for name in os.environ['KMCL_TEST_SIGNALS'].split(','):
              os.kill(os.getpid(), getattr(signal, name))
        return _real(run, batch)

      train._to_global = _to_global
""")


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Environment of the subprocesses: the signal hook importable; the launcher sets devices."""
  hook = tmp_path_factory.mktemp('hook')
  (hook / 'sitecustomize.py').write_text(_SITECUSTOMIZE)
  return run_helpers.env_without_forced_devices(
    PYTHONPATH=f'{hook}{os.pathsep}{ROOT}', PYTHON=sys.executable
  )


def _run(command, env, **extra_env):
  return run_helpers.run_process_group(command, env=dict(env, **extra_env))


def _launch(workdir, env, *flags, **extra_env):
  return _run(['bash', LAUNCHER, '2', *SMOKE, f'--workdir={workdir}', *flags], env, **extra_env)


def _final_state(workdir):
  """The latest train state, on this process's first device (whatever wrote it)."""
  steps = os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))
  assert len(steps) == 1, steps
  path = os.path.join(workdir, 'checkpoints', 'latest', steps[0], 'state')
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    checkpointer.metadata(path).item_metadata,
  )
  return jax.device_get(checkpointer.restore(path, abstract))


def _train_steps(workdir):
  lines = [json.loads(line) for line in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  return [line['step'] for line in lines if 'train/loss' in line]


@pytest.fixture(scope='module')
def two_process_run(env, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two_processes') / 'run')
  code, output = _launch(workdir, env)
  assert code == 0, output
  return workdir, output


def test_two_processes_train_like_one(two_process_run, tmp_path):
  """2 processes x 4 devices == 1 process x 8 devices (same global batch and seed)."""
  workdir, output = two_process_run
  assert 'JAX platform cpu: 8 devices (cpu) on 2 processes, 4 local devices each' in output
  assert 'global batch 8 = 2 x 4 per process = 8 x 1 per device' in output
  # One set of outputs: process 0 writes each line once; checkpoints are collective.
  assert _train_steps(workdir) == [1, 2, 3]
  assert len(os.listdir(os.path.join(workdir, 'tensorboard'))) == 1
  assert output.count('test results (threshold') == 1
  assert sorted(os.listdir(os.path.join(workdir, 'export'))) == ['model.json', 'weights']

  assert jax.device_count() == 8 and jax.process_count() == 1
  single = str(tmp_path / 'single')
  results = train.train_and_evaluate(synthetic.get_config('smoke'), single)
  multi = json.loads(Path(workdir, 'results.json').read_text())
  want, got = _final_state(single), _final_state(workdir)
  assert int(want['step']) == int(got['step']) == 3
  # Tolerance: the same examples in another row order, so sums (BatchNorm statistics,
  # gradients) are added in another order; measured largest |difference| 8e-7.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    want['params'],
    got['params'],
  )
  for name in ('model', 'ema'):
    assert multi['test'][name]['mAP'] == pytest.approx(results['test'][name]['mAP'], abs=1e-3)


def test_sigterm_on_one_process_stops_both_and_resumes(two_process_run, env, tmp_path):
  """SIGTERM reaches process 1 only; both stop on the same step and the restart resumes."""
  straight, _ = two_process_run
  workdir = str(tmp_path / 'resumed')
  # No device prefetch: the hook then runs when the step takes its batch, not ahead of it.
  code, output = _launch(
    workdir,
    env,
    '--config.dataset.device_prefetch=0',
    KMCL_TEST_SIGNALS='SIGTERM',
    KMCL_TEST_PROCESS='1',
    KMCL_TEST_AT='1',
  )
  assert code == 128 + signal.SIGTERM, output
  # Process 1 is signalled during step 1; the agreement launched then is read at step 2.
  assert 'SIGTERM: saved the checkpoint of step 2 and stopped' in output
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) == ['2']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  code, output = _launch(workdir, env)
  assert code == 0, output
  assert _train_steps(workdir) == [1, 2, 3]
  want, got = _final_state(straight), _final_state(workdir)
  # Tolerance as above: the CPU collectives may add partial sums in another order from run to
  # run, and Adam magnifies that where gradients are tiny; measured up to 1.2e-6.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    want['params'],
    got['params'],
  )


def test_ctrl_c_checkpoints_and_exits(tmp_path, monkeypatch, caplog):
  """SIGINT behaves like SIGTERM: checkpoint, one line, exit status 130."""
  real_to_global = train._to_global
  calls = []

  def to_global_with_sigint(run, batch):
    if 'labels' in batch:
      calls.append(1)
      if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return real_to_global(run, batch)

  monkeypatch.setattr(train, '_to_global', to_global_with_sigint)
  # Python's default_int_handler, or SIG_IGN where pytest was started in the background.
  handler_before = signal.getsignal(signal.SIGINT)
  workdir = str(tmp_path / 'run')
  config = synthetic.get_config('smoke')
  config.dataset.device_prefetch = 0  # the hook runs when step 2 takes its batch
  with pytest.raises(SystemExit) as exit_info:
    train.train_and_evaluate(config, workdir)
  assert exit_info.value.code == 128 + signal.SIGINT
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) == ['2']
  stops = [r.getMessage() for r in caplog.records if 'stopped' in r.getMessage()]
  assert stops == [
    'SIGINT: saved the checkpoint of step 2 and stopped; the same command resumes from it.'
  ]
  # The handler is restored afterwards.
  assert signal.getsignal(signal.SIGINT) is handler_before


def test_second_ctrl_c_exits_at_once(env):
  code = textwrap.dedent("""\
      import os, signal, time
      import jax
      from kmcl_jax import distributed
      stop = distributed.StopSignals(jax.make_mesh((1,), ('data',)))
      stop.install()
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.agreed() == signal.SIGINT
      print('first Ctrl-C recorded', flush=True)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(60)
      print('still running')
  """)
  returncode, output = _run([sys.executable, '-c', code], env)
  assert returncode == -signal.SIGINT, output
  assert 'first Ctrl-C recorded' in output and 'still running' not in output


def _main(env, *flags):
  return _run(
    [sys.executable, '-m', 'kmcl_jax.main', *SMOKE, *flags],
    env,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
  )


def test_first_log_line_names_platform_and_batch_errors_name_the_split(env, tmp_path):
  # Without JAX_PLATFORMS, as a user runs it: JAX probes (and logs about) TPU and GPU first.
  env = {k: v for k, v in env.items() if k != 'JAX_PLATFORMS'}
  code, output = _main(env, f'--workdir={tmp_path}', '--config.batch_size=12')
  assert code != 0
  lines = [line for line in output.splitlines() if line.startswith(('I1', 'W1', 'E1'))]
  malloc = run_helpers.expected_malloc(env)
  assert lines[0].endswith(f'JAX platform cpu: 8 devices (cpu) on 1 process; host malloc: {malloc}')
  assert (
    'batch_size=12 (global) must be a positive multiple of the device count 8 (1 '
    'process(es) x 8 local devices): it is split into a per-process batch of 12 and a '
    'per-device batch of 1.5.'
  ) in output
  assert 'Traceback' not in output


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize(
  'flags,message',
  [
    (['--num_processes=2'], '--coordinator_address, --process_id missing'),
    (
      ['--coordinator_address=localhost:1234', '--num_processes=2', '--process_id=2'],
      '--process_id=2 is out of range',
    ),
    (
      ['--coordinator_address=localhost', '--num_processes=2', '--process_id=0'],
      'is not HOST:PORT',
    ),
  ],
)
def test_bad_process_flags_give_one_message(flags, message, env, tmp_path):
  code, output = _main(env, f'--workdir={tmp_path}', *flags)
  assert code != 0 and message in output, output
  assert 'Traceback' not in output


def test_unreachable_coordinator_gives_one_message(env, tmp_path):
  code, output = _main(
    env,
    f'--workdir={tmp_path}',
    f'--coordinator_address=localhost:{_free_port()}',
    '--num_processes=2',
    '--process_id=1',
    '--coordinator_timeout_s=3',
  )
  assert code == 1, output
  assert 'did not finish within 3 s (--coordinator_timeout_s)' in output
  assert 'Check failure' not in output and 'Traceback' not in output


def test_a_workdir_refused_by_process_0_stops_every_process(env, tmp_path):
  """Process 0 alone checks the workdir; the others must stop with it, not wait for it."""
  not_a_dir = tmp_path / 'a_file'
  not_a_dir.write_text('')
  code, output = _launch(str(not_a_dir), env)
  assert code != 0
  assert f'workdir {not_a_dir} is a file' in output
  assert f'process 0 refused workdir {not_a_dir}' in output
  assert 'Traceback' not in output
