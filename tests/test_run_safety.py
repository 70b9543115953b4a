"""Run safety: the workdir record, trusted checkpoints, checks before training, the lock,
readable errors; and guards for behaviour the other tests would not notice breaking."""

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import data_fixtures as fx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_helpers
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base as base_config, voc
from kmcl_jax import (
  checkpoint as checkpoint_lib,
  evaluate as evaluate_lib,
  experiment,
  losses,
  metrics as metrics_lib,
  train,
  workdir as workdir_lib,
)
from kmcl_jax.data import get_source, pipeline
from kmcl_jax.writer import MetricWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_smoke = run_helpers.smoke_config


def _snapshot(root):
  """{relative path: (size, mtime)} of everything under root."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      out[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


@pytest.fixture
def no_compiling(monkeypatch):
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: pytest.fail('compiled before the check'))


# ------------------------------------------------------------------ 1. the workdir is a record


def test_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path, no_compiling):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  workdir_lib.record_config(workdir, _smoke(), {})
  before = _snapshot(workdir)
  changed = _smoke(batch_size=16, **{'model.overrides.width_factor': 0.25})
  with pytest.raises(workdir_lib.WorkdirError) as info:
    train.train_and_evaluate(changed, workdir)
  message = str(info.value)
  assert 'batch_size: 8 -> 16' in message and 'model.overrides.width_factor' in message
  assert 'new --workdir' in message
  assert _snapshot(workdir) == before  # no lock left, config.json as it was


def test_deliberate_changes_need_the_flag_and_are_recorded(tmp_path):
  workdir = str(tmp_path)
  workdir_lib.record_config(workdir, _smoke(), {})
  longer = _smoke(num_train_steps=10, log_every_steps=5)
  with pytest.raises(workdir_lib.WorkdirError, match='--allow_config_change') as info:
    workdir_lib.check_config(workdir, longer, allow_change=False)
  assert 'num_train_steps: 3 -> 10' in str(info.value)
  changes = workdir_lib.check_config(workdir, longer, allow_change=True)
  assert set(changes) == {'num_train_steps', 'log_every_steps'}
  workdir_lib.record_config(workdir, longer, changes)
  # config.json keeps the creating config; the change log brings the record up to date.
  assert json.loads(Path(tmp_path / 'config.json').read_text())['num_train_steps'] == 3
  assert workdir_lib.check_config(workdir, longer, allow_change=False) == {}
  # Operational settings change without the flag.
  assert set(
    workdir_lib.check_config(
      workdir, _smoke(num_train_steps=10, log_every_steps=7), allow_change=False
    )
  ) == {'log_every_steps'}


def test_checkpoints_without_a_record_are_refused(tmp_path):
  os.makedirs(tmp_path / 'checkpoints' / 'latest')
  with pytest.raises(workdir_lib.WorkdirError, match='no config.json'):
    workdir_lib.check_config(str(tmp_path), _smoke(), allow_change=True)


def test_resumed_metrics_log_has_each_step_once(tmp_path):
  lines = [{'step': s, 'train/loss': float(s)} for s in (1, 2, 3, 4)]
  lines.insert(2, {'step': 2, 'eval/model/mAP': 5.0})
  lines.append({'step': 4, 'test/model/mAP': 5.0})
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(line) + '\n' for line in lines)
    f.write('{"step": 5, "train/lo')  # cut short by kill -9
  writer = MetricWriter(str(tmp_path), start_step=2)
  writer.write(3, {'train/loss': 30.0})
  writer.close()
  got = [json.loads(line) for line in Path(tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in got] == [1, 2, 2, 3] and got[-1]['train/loss'] == 30.0
  # A finished run resumed at its last step runs the test evaluation again: one test line.
  MetricWriter(str(tmp_path), start_step=3).close()
  got = [json.loads(line) for line in Path(tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert not any('test/model/mAP' in line for line in got) and len(got) == 4


# ------------------------------------------------------------------ 2. checkpoints you can trust


def _tiny_checkpoints(workdir):
  state = {'w': jnp.arange(4.0), 'step': jnp.int32(0)}
  data = iter(grain.MapDataset.range(16).batch(2).to_iter_dataset())
  return checkpoint_lib.Checkpoints(workdir), state, data


def _corrupt(step_dir):
  for folder, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(b'\x00garbage')


def test_unrestorable_checkpoint_is_named_and_fallback_only_when_asked(tmp_path):
  ckpt, state, data = _tiny_checkpoints(str(tmp_path))
  ckpt.save_best(1, dict(state, step=jnp.int32(1)), data, 10.0)
  ckpt.save_latest(2, dict(state, step=jnp.int32(2)), data)
  ckpt.wait()
  ckpt.close()
  bad = tmp_path / 'checkpoints' / 'latest' / '2'
  _corrupt(str(bad))
  ckpt, state, data = _tiny_checkpoints(str(tmp_path))
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    ckpt.resume(state, data, fallback=False)
  assert str(bad) in str(info.value) and '--resume_fallback' in str(info.value)
  assert len(str(info.value).splitlines()) == 1
  restored = ckpt.resume(state, data, fallback=True)
  assert int(restored['step']) == 1  # the best checkpoint, the newest that restores
  assert not bad.exists()
  assert (tmp_path / 'checkpoints' / 'unreadable' / 'latest-2').is_dir()
  ckpt.close()
  _corrupt(str(tmp_path / 'checkpoints' / 'best' / '1'))
  ckpt, state, data = _tiny_checkpoints(str(tmp_path))
  with pytest.raises(checkpoint_lib.CheckpointError, match='no checkpoint .* could be restored'):
    ckpt.resume(state, data, fallback=True)
  ckpt.close()


def test_failed_save_stops_with_path_and_cause_and_keeps_the_previous(tmp_path, monkeypatch):
  ckpt, state, data = _tiny_checkpoints(str(tmp_path))
  ckpt.save_latest(1, dict(state, step=jnp.int32(1)), data)
  ckpt.wait()

  async def disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(checkpoint_lib.ocp.StandardCheckpointHandler, 'async_save', disk_full)
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    ckpt.save_latest(2, dict(state, step=jnp.int32(2)), data)
    ckpt.wait()
  assert os.path.join('latest', '2') in str(info.value)
  assert 'No space left on device' in str(info.value)
  monkeypatch.undo()
  ckpt.close()
  ckpt, state, data = _tiny_checkpoints(str(tmp_path))
  assert int(ckpt.resume(state, data, fallback=False)['step']) == 1
  ckpt.close()
  # orbax reports a failed background write as a long tensorstore message: the cause is kept.
  cause = checkpoint_lib._cause(
    ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" ... [os_error_code=\'28\']')
  )
  assert cause == 'No space left on device'


# ------------------------------------------------------------------ 3. fail before training


def _voc(tmp_path, **changes):
  fx.make_voc(str(tmp_path / 'data'), n_trainval=24, n_test=8)
  config = voc.get_config('smoke')
  config.dataset.root = str(tmp_path / 'data')
  for key, value in changes.items():
    config.dataset[key] = value
  return config, tmp_path / 'data' / 'VOCdevkit' / 'VOC2007' / 'JPEGImages'


def test_broken_test_split_fails_before_compiling(tmp_path, no_compiling):
  config, images = _voc(tmp_path)
  os.remove(images / '000103.jpg')
  (images / '000104.jpg').write_bytes(b'')
  os.remove(images / '000105.jpg')
  os.makedirs(images / '000105.jpg')  # a directory named like an image
  workdir = tmp_path / 'run'
  with pytest.raises(pipeline.InputError) as info:
    train.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert 'test split has 3 unreadable' in message and 'skip_unreadable' in message
  for name, why in (('000103', 'missing'), ('000104', 'empty'), ('000105', 'not a file')):
    assert f'{name}.jpg ({why})' in message
  assert not workdir.exists()  # the run created it for its lock, and removed it


def test_preflight_skips_and_counts_or_refuses_an_empty_split(tmp_path):
  _, images = _voc(tmp_path)
  os.remove(images / '000002.jpg')
  src = get_source('voc2007', root=str(tmp_path / 'data'), split='trainval')
  kept, dropped = pipeline.preflight(src, split='train', skip_unreadable=True)
  assert dropped == 1 and len(kept) == 23
  assert '000002' not in [kept[i]['id'] for i in range(len(kept))]
  for name in os.listdir(images):
    os.remove(images / name)
  with pytest.raises(pipeline.InputError, match='no readable image'):
    pipeline.preflight(src, split='train', skip_unreadable=True)


def test_train_stream_without_a_batch_of_readable_images_ends(tmp_path):
  _, images = _voc(tmp_path)
  for name in os.listdir(images):  # exist and non-empty (preflight passes), but not images
    (images / name).write_bytes(b'not a jpeg')
  src = get_source('voc2007', root=str(tmp_path / 'data'), split='trainval')
  it = pipeline.train_iterator(
    src,
    batch_size=4,
    image_size=16,
    augment='none',
    seed=0,
    shard_index=0,
    shard_count=1,
    skip_unreadable=True,
  )
  outcome = []

  def read():
    try:
      outcome.append(next(it))
    except Exception as e:  # noqa: BLE001 - checked below
      outcome.append(e)

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout=120)  # a hang guard only: the error comes after one epoch of reads
  assert outcome, 'the stream did not end'
  assert isinstance(outcome[0], pipeline.InputError), outcome[0]
  assert '0 readable record(s) of 24' in str(outcome[0])


@pytest.mark.parametrize(
  'key,value',
  [
    ('optim.peak_lr', -1e-3),
    ('checkpoint_every_steps', 0),
    ('log_every_steps', 0),
    ('eval_every_epochs', 0.0),
    ('ema_decay', 1.0),
    ('optim.pct_start', 1.5),
    ('eval.threshold', 1.0),
    ('loss.temperature', 0.0),
    ('dataset.holdout_fraction', 0.0),
  ],
)
def test_settings_out_of_range_are_config_errors(key, value):
  with pytest.raises(experiment.ConfigError, match=f'{key}={value!r} must be'):
    experiment.validate_config(_smoke(**{key: value}))


def test_full_run_counts_skipped_images_and_moves_the_ema(tmp_path, monkeypatch):
  """The one full run here: a VOC workdir with unreadable images in train and test. It also
  checks the EMA update inside the compiled train step (parameters and batch statistics)."""
  config, images = _voc(tmp_path, skip_unreadable=True)
  config.num_train_steps = 2
  config.ema_decay = 0.5  # large moves, so that an EMA stuck at its start shows
  (images / '000003.jpg').write_bytes(b'corrupt')  # trainval: fails to decode
  os.remove(images / '000102.jpg')  # test: missing (preflight drops it)
  (images / '000106.jpg').write_bytes(b'corrupt')  # test: fails to decode (masked out)
  first_step = []
  real_loop = train._train_loop

  def loop_recording_the_first_step(run, state, *args, **kwargs):
    def step(state, batch):
      before = jax.device_get(state)  # before the step donates its buffers
      new, metrics = real_step(state, batch)
      if not first_step:
        first_step.append((before, jax.device_get(new)))
      return new, metrics

    real_step = run.train_step
    return real_loop(dataclasses.replace(run, train_step=step), state, *args, **kwargs)

  monkeypatch.setattr(train, '_train_loop', loop_recording_the_first_step)
  workdir = tmp_path / 'run'
  results = train.train_and_evaluate(config, str(workdir))
  old, new = first_step[0]
  for ema, live in (('ema_params', 'params'), ('ema_batch_stats', 'batch_stats')):
    expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, old[ema], new[live])
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new[ema], expected
    )
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), new[ema], old[ema]))
    assert any(moved), ema
  saved = json.loads(Path(workdir / 'results.json').read_text())
  assert saved['skipped_unreadable']['test'] == 2
  # 000003 is read once per epoch in train or held out for selection (val).
  assert saved['skipped_unreadable']['train'] + saved['skipped_unreadable']['val'] >= 1
  assert results['skipped_unreadable'] == saved['skipped_unreadable']
  assert not (workdir / 'run.lock').exists()
  lines = [json.loads(line) for line in Path(workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines if 'train/loss' in line] == [1, 2]


# ------------------------------------------------------------------ 4. one run per workdir


def _dead_pid():
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait(timeout=60)
  return child.pid


def test_lock_refuses_a_second_run_and_recognises_a_stale_one(tmp_path):
  workdir = str(tmp_path / 'run')
  lock = workdir_lib.Lock.acquire(workdir)
  with pytest.raises(workdir_lib.WorkdirError) as info:
    workdir_lib.Lock.acquire(workdir)
  assert f'process {os.getpid()} on host {socket.gethostname()}' in str(info.value)
  lock.release()
  assert not os.path.exists(workdir)  # created by the lock and left empty: removed

  os.makedirs(workdir)
  path = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with open(path, 'w') as f:
    json.dump({'pid': _dead_pid(), 'host': socket.gethostname(), 'started': 'x'}, f)
  workdir_lib.Lock.acquire(workdir).release()  # stale: taken over
  with open(path, 'w') as f:
    json.dump({'pid': 1, 'host': 'elsewhere', 'started': 'x'}, f)
  with pytest.raises(workdir_lib.WorkdirError, match=f'delete {path}'):
    workdir_lib.Lock.acquire(workdir)  # another host: cannot tell, so refused


# ------------------------------------------------------------------ 6. errors a person can read


def test_user_errors_are_one_line_on_stderr_and_debug_shows_the_traceback(tmp_path):
  not_a_dir = tmp_path / 'file'
  not_a_dir.write_text('x')
  command = [
    sys.executable,
    '-m',
    'kmcl_jax.main',
    '--config=configs/synthetic.py:smoke',
    f'--workdir={not_a_dir}',
  ]
  quiet = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)
  assert quiet.returncode != 0
  assert f'workdir {not_a_dir} is a file' in quiet.stderr.splitlines()[-1]
  assert 'Traceback' not in quiet.stderr
  debug = subprocess.run(
    command + ['--debug'], capture_output=True, text=True, timeout=180, cwd=REPO
  )
  assert debug.returncode != 0 and 'Traceback' in debug.stderr


# ------------------------------------------------------------------ guards the suite lacked


class _OneHot:
  """N distinct synthetic images whose one-hot label names the record."""

  def __init__(self, n):
    self._images = get_source('synthetic', split='train', num_examples=n, image_size=32)
    self.class_names = tuple(f'r{i}' for i in range(n))

  def __len__(self):
    return len(self.class_names)

  def __getitem__(self, i):
    labels = np.eye(len(self))[i].astype(np.float32)
    return dict(self._images[i], labels=labels, difficult=np.zeros(len(self), bool))


def test_augmentation_of_a_record_differs_between_epochs():
  src = _OneHot(8)
  it = pipeline.train_iterator(
    src, batch_size=8, image_size=32, augment='randaugment', seed=0, shard_index=0, shard_count=1
  )
  epochs = []
  for _ in range(2):  # one batch = one epoch
    batch = next(it)
    order = np.argmax(batch['labels'], axis=1)
    epochs.append(batch['image'][np.argsort(order)])
  for record in range(8):
    assert not np.array_equal(epochs[0][record], epochs[1][record]), record


class _Difficult:
  """8 records, 2 classes; record 1 is difficult for class 0 and scored highest for it."""

  class_names = ('a', 'b')
  labels = np.array([[1, 0], [0, 1], [1, 0], [0, 0], [0, 1], [1, 1], [0, 0], [0, 1]], np.float32)
  difficult = np.zeros((8, 2), bool)
  difficult[1, 0] = True
  scores = np.array(
    [
      [0.6, 0.2],
      [0.9, 0.8],
      [0.7, 0.1],
      [0.3, 0.4],
      [0.2, 0.7],
      [0.5, 0.9],
      [0.1, 0.3],
      [0.4, 0.6],
    ],
    np.float32,
  )

  def __len__(self):
    return 8

  def __getitem__(self, i):
    image = np.full((8, 8, 3), i, np.uint8)
    return {'image': image, 'labels': self.labels[i], 'difficult': self.difficult[i], 'id': str(i)}


def test_evaluation_keeps_voc_difficult_flags_up_to_the_metrics():
  src = _Difficult()
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
  )
  sharding = NamedSharding(mesh, P('data'))
  table = jnp.asarray(src.scores)
  predict = jax.jit(
    lambda params, stats, images: table[images[:, 0, 0, 0].astype(jnp.int32)],
    out_shardings=sharding,
  )
  report = evaluate_lib.evaluate(
    predict,
    {'m': (None, None)},
    src,
    data_sharding=sharding,
    batch_size=8,
    image_size=8,
    threshold=0.5,
    top_k=1,
    with_auc=False,
    class_names=src.class_names,
  )['m']
  kw = dict(threshold=0.5, top_k=1, class_names=src.class_names)
  want = metrics_lib.evaluation_report(src.scores, src.labels, difficult=src.difficult, **kw)
  blind = metrics_lib.evaluation_report(src.scores, src.labels, **kw)
  assert want['mAP'] != pytest.approx(blind['mAP'])  # the flag matters for these scores
  assert report['mAP'] == pytest.approx(want['mAP'])
  assert report['OP'] == pytest.approx(want['OP'])


def test_asl_focusing_weights_are_detached_by_default():
  """Detaching changes gradients, not loss values: compare gradients."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  labels = jnp.asarray(rng.random((4, 5)) < 0.4, jnp.float32)

  def grad(config):
    config = dataclasses.replace(config, asl_only=True, asl_gamma_pos=1.0)
    return jax.grad(
      lambda x: losses.kmcl_objective(
        features=jnp.zeros((4, 8)), head={'pi_logits': x}, labels=labels, config=config
      )[0]
    )(logits)

  detached = grad(losses.LossConfig(asl_detach_focusing=True))
  assert not np.allclose(detached, grad(losses.LossConfig(asl_detach_focusing=False)))
  np.testing.assert_array_equal(grad(losses.LossConfig()), detached)
  from_config = losses.LossConfig.from_mapping(base_config.get_base_config().loss.to_dict())
  np.testing.assert_array_equal(grad(from_config), detached)
