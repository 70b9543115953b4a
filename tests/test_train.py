"""The main job on the synthetic smoke config, over 8 CPU devices (see conftest.py)."""

import functools
import gc
import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import run_helpers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kmcl_jax import experiment, losses, train

_config = run_helpers.smoke_config


def _latest_params(workdir, step):
  state = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, 'checkpoints', 'latest', str(step), 'state')
  )
  return state['params'], state['step']


def test_smoke_run_writes_every_output(tmp_path):
  assert jax.device_count() == 8
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(_config(), workdir)

  assert gc.get_freeze_count() == 0  # the loop's gc.freeze() is undone at the end
  config = json.loads(Path(workdir, 'config.json').read_text())
  assert config['dataset']['name'] == 'synthetic' and config['batch_size'] == 8

  lines = [json.loads(line) for line in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  train_lines = [line for line in lines if 'train/loss' in line]
  assert [line['step'] for line in train_lines] == [1, 2, 3]
  for key in (
    'train/loss',
    'train/rec',
    'train/asl',
    'train/kmcl',
    'train/learning_rate',
    'train/grad_norm',
    'train/skipped_steps',
  ):
    assert all(np.isfinite(line[key]) for line in train_lines), key
  # The first step compiles: timed apart, and kept out of images/s.
  assert train_lines[0]['train/first_step_seconds'] > 0
  assert 'train/images_per_sec' not in train_lines[0]
  assert all(line['train/images_per_sec'] > 0 for line in train_lines[1:])
  eval_lines = [line for line in lines if 'eval/model/mAP' in line]
  assert eval_lines and 0 <= eval_lines[-1]['eval/ema/mAP'] <= 100
  assert any(
    f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'tensorboard'))
  )

  assert os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) == ['3']
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'best')) == ['3']

  saved = json.loads(Path(workdir, 'results.json').read_text())
  assert saved == json.loads(json.dumps(results))
  assert saved['best_step'] == 3 and saved['eval_split'] == 'val'
  for name in ('model', 'ema'):
    report = saved['test'][name]
    for key in ('mAP', 'OP', 'OR', 'OF1', 'CP', 'CR', 'CF1', 'OP_top3', 'CF1_top3'):
      assert 0 <= report[key] <= 100, (name, key)
    assert len(report['AP']) == 10

  model_json = json.loads(Path(workdir, 'export', 'model.json').read_text())
  assert model_json['model'] == 'tresnet_m' and model_json['image_size'] == 64
  assert len(model_json['class_names']) == 10
  assert model_json['normalization']['name'] == 'imagenet'
  weights = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'export', 'weights'))
  assert set(weights) == {'params', 'batch_stats'}


def test_restart_continues_like_an_uninterrupted_run(tmp_path, monkeypatch):
  config = _config(num_train_steps=4, checkpoint_every_steps=100, eval_every_epochs=100.0)
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)

  # Preemption: SIGTERM arrives when the second batch is made; the run checkpoints the step
  # running then and exits. The prefetch thread makes batches ahead of the steps (up to
  # dataset.device_prefetch), so that is step 1 or 2, and the checkpointed iterator state must
  # be that of the batches the steps took, not of those made.
  real_to_global = train._to_global
  calls = {'train': 0}

  def to_global_with_sigterm(run, batch):
    if 'labels' in batch:
      calls['train'] += 1
      if calls['train'] == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_to_global(run, batch)

  resumed = str(tmp_path / 'resumed')
  monkeypatch.setattr(train, '_to_global', to_global_with_sigterm)
  with pytest.raises(SystemExit):
    train.train_and_evaluate(config, resumed)
  monkeypatch.setattr(train, '_to_global', real_to_global)
  assert config.dataset.device_prefetch == 2
  assert os.listdir(os.path.join(resumed, 'checkpoints', 'latest')) in (['1'], ['2'])
  train.train_and_evaluate(config, resumed)

  want, step_a = _latest_params(straight, 4)
  got, step_b = _latest_params(resumed, 4)
  assert int(step_a) == int(step_b) == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), want, got)
  lines_a = Path(straight, 'metrics.jsonl').read_text().splitlines()
  losses_a = [json.loads(line).get('train/loss') for line in lines_a]
  lines_b = Path(resumed, 'metrics.jsonl').read_text().splitlines()
  losses_b = [json.loads(line).get('train/loss') for line in lines_b]
  assert [x for x in losses_a if x] == pytest.approx([x for x in losses_b if x], rel=1e-6)


def _step_fixture(config):
  model_fn = functools.partial(experiment.create_model, config, 10, 0)
  optimizer = experiment.make_optimizer(config, 10)
  abstract = nnx.eval_shape(model_fn)
  abstract.train()
  step = functools.partial(
    train.train_step,
    graphdef=nnx.graphdef(abstract),
    optimizer=optimizer,
    loss_config=losses.LossConfig(),
    ema_decay=0.9,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
  )
  state = jax.jit(functools.partial(experiment.init_state, model_fn, optimizer))()
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
    'labels': (rng.random((8, 10)) < 0.3).astype(np.float32),
  }
  return state, step, batch


def test_one_device_and_eight_devices_give_the_same_step():
  state, step, batch = _step_fixture(_config())
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = jax.sharding.Mesh(np.array(devices), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    placed_state = jax.device_put(state, replicated)
    placed_batch = jax.device_put(batch, sharded)
    new_state, metrics = jax.jit(step)(placed_state, placed_batch)
    results.append(jax.device_get((new_state['params'], new_state['batch_stats'], metrics)))
  (params_1, stats_1, metrics_1), (params_8, stats_8, metrics_8) = results
  # Tolerance: the 8-device run sums the batch statistics and gradients in another order.
  np.testing.assert_allclose(metrics_1['loss'], metrics_8['loss'], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_1, params_8
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats_1, stats_8
  )


def test_non_finite_batch_leaves_the_state_unchanged():
  state, step, batch = _step_fixture(_config())
  step = jax.jit(step)
  good_state, _ = step(state, batch)
  bad = dict(batch, labels=np.full_like(batch['labels'], np.nan))
  new_state, metrics = step(good_state, bad)
  assert not np.isfinite(float(metrics['loss']))
  assert int(new_state['skipped']) == 1 and int(good_state['skipped']) == 0
  assert int(new_state['step']) == 2
  for key in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats', 'opt_state'):
    jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(good_state[key]), jax.device_get(new_state[key])
    )


@pytest.mark.parametrize(
  'changes,message',
  [
    ({'dataset.name': 'imagenet'}, 'dataset.name'),
    ({'model.image_size': 100}, 'multiple of 32'),
    ({'batch_size': 12}, 'device count'),
    ({'dataset.name': 'adp', 'dataset.root': ''}, 'dataset.root'),
    ({'dataset.name': 'adp', 'dataset.root': '/nonexistent/adp'}, '/nonexistent/adp'),
    ({'init_from': '/nonexistent/weights'}, '/nonexistent/weights'),
    ({'model.name': 'resnet50'}, 'model.name'),
    ({'model.dtype': 'float16'}, 'model.dtype'),
    ({'loss.variant': 'authors'}, 'variant'),
    ({'model.kind': 'gaussian'}, 'model.kind'),
  ],
)
def test_config_errors_fail_before_compiling(changes, message, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: pytest.fail('compiled before the check'))
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_config(**changes), str(tmp_path / 'run'))


@pytest.fixture(scope='module')
def converted_smoke_encoder(tmp_path_factory):
  """A timm TResNet in the smoke config's layout, converted by `kmcl_jax.convert`."""
  import timm_reference
  from safetensors.numpy import save_file

  from kmcl_jax import convert

  layout = dict(layers=(1, 1, 1, 1), width_factor=0.125)
  model = timm_reference.timm_tresnet(seed=3, num_classes=1000, **dict(layout, layers=[1, 1, 1, 1]))
  root = tmp_path_factory.mktemp('weights')
  save_file(timm_reference.state_dict_numpy(model), str(root / 'tiny.safetensors'))
  convert.convert(
    root / 'tiny.safetensors', root / 'converted', 'tresnet_m', source='timm', **layout
  )
  return str(root / 'converted'), timm_reference.state_dict_numpy(model)


def test_init_from_loads_the_converted_encoder(converted_smoke_encoder):
  path, torch_state = converted_smoke_encoder
  config = _config(init_from=path)
  model_fn = functools.partial(experiment.create_model, config, 10, 0)
  optimizer = experiment.make_optimizer(config, 10)
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
  )
  state = jax.jit(functools.partial(experiment.init_state, model_fn, optimizer))()
  state_sharding = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
  loaded = train._load_init_from(
    config, state, nnx.graphdef(nnx.eval_shape(model_fn)), optimizer, state_sharding
  )
  # The stem conv, OIHW in torch, HWIO here; the EMA starts from the same weights.
  stem = torch_state['body.conv1.conv.weight'].transpose(2, 3, 1, 0)
  for key in ('params', 'ema_params'):
    np.testing.assert_array_equal(loaded[key]['encoder']['conv1']['conv']['kernel'], stem)
  np.testing.assert_array_equal(
    loaded['batch_stats']['encoder']['conv1']['bn']['mean'],
    torch_state['body.conv1.bn.running_mean'],
  )


def test_init_from_mismatch_fails_before_compiling(converted_smoke_encoder, tmp_path, monkeypatch):
  path, _ = converted_smoke_encoder
  monkeypatch.setattr(jax, 'jit', lambda *a, **k: pytest.fail('compiled before the check'))
  config = _config(init_from=path)
  config.model.overrides.width_factor = 0.25  # the checkpoint holds width 0.125
  with pytest.raises(ValueError, match='shape mismatches'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_bfloat16_compute_keeps_float32_state_and_losses():
  state, step, batch = _step_fixture(_config(**{'model.dtype': 'bfloat16'}))
  new_state, metrics = jax.jit(step)(state, batch)
  assert all(np.isfinite(float(metrics[k])) for k in ('loss', 'rec', 'asl', 'kmcl'))
  assert metrics['loss'].dtype == jnp.float32
  for key in ('params', 'batch_stats', 'ema_params'):
    dtypes = {x.dtype for x in jax.tree.leaves(new_state[key])}
    assert dtypes == {jnp.dtype(jnp.float32)}, (key, dtypes)
  assert int(new_state['skipped']) == 0


@pytest.mark.parametrize(
  'flag,message,traceback',
  [
    # ml_collections rejects an unknown key while parsing flags: one line, with the suggestion.
    ('--config.model.imagesize=64', 'Did you mean "image_size"', False),
    ('--config.model.image_size=100', 'config error: model.image_size=100', False),
  ],
)
def test_command_line_rejects_bad_settings(flag, message, traceback, tmp_path):
  import subprocess
  import sys

  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'kmcl_jax.main',
      '--config=configs/synthetic.py:smoke',
      f'--workdir={tmp_path}',
      flag,
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert result.returncode != 0
  assert message in result.stderr
  assert ('Traceback' in result.stderr) == traceback


def test_export_loads_back_and_predicts_like_the_trainer(tmp_path):
  from kmcl_jax import evaluate as evaluate_lib, export as export_lib
  from kmcl_jax.data import pipeline

  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(_config(), workdir)
  exported = export_lib.load_export(os.path.join(workdir, 'export'))
  assert len(exported.class_names) == 10
  assert exported.info['weights'] == results['exported_weights']
  # The exported weights, scored by the loaded model, give the test report of results.json.
  config = _config()
  test_src = experiment.open_split(config, config.dataset.test_split)
  batch = next(iter(pipeline.eval_batches(test_src, batch_size=8, image_size=64)))
  mean, std = exported.normalization
  graphdef, params, stats = nnx.split(exported.model, nnx.Param, nnx.BatchStat)
  probs = evaluate_lib.predict_step(
    params, stats, batch['image'], graphdef=graphdef, mean=mean, std=std
  )
  assert probs.shape == (8, 10) and np.all((probs >= 0) & (probs <= 1))
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()), ('data',), axis_types=(jax.sharding.AxisType.Auto,)
  )
  sharding = NamedSharding(mesh, P('data'))
  report = evaluate_lib.evaluate(
    evaluate_lib.make_predict_fn(graphdef, mean=mean, std=std, data_sharding=sharding),
    {'export': (params, stats)},
    test_src,
    data_sharding=sharding,
    batch_size=8,
    image_size=64,
    threshold=config.eval.threshold,
    top_k=3,
    with_auc=False,
    class_names=exported.class_names,
  )['export']
  chosen = results['exported_weights']
  assert chosen in ('model', 'ema')
  assert report['mAP'] == pytest.approx(results['test'][chosen]['mAP'], abs=1e-4)


def test_export_choice_comes_from_the_selection_split_not_test(tmp_path, monkeypatch):
  """The winner on the selection split is exported, even where the other wins on test."""
  calls = []
  real = train._Run.evaluate

  def rigged(self, state, source, *, desc):
    reports = real(self, state, source, desc=desc)
    calls.append(desc)
    # Selection split: the model wins; test: the EMA wins by far.
    better, worse = ('model', 'ema') if desc != 'test' else ('ema', 'model')
    reports[better]['mAP'], reports[worse]['mAP'] = 90.0, 10.0
    return reports

  monkeypatch.setattr(train._Run, 'evaluate', rigged)
  results = train.train_and_evaluate(_config(), str(tmp_path / 'run'))
  assert calls[-1] == 'test' and len(calls) >= 2
  assert results['exported_weights'] == 'model'
  info = json.loads(Path(tmp_path / 'run' / 'export' / 'model.json').read_text())
  assert info['weights'] == 'model'
