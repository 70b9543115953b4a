"""`python -m kmcl_jax.evaluate` on the export of one smoke run, and per-class thresholds."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from kmcl_jax import evaluate, experiment, export as export_lib, metrics, train
from kmcl_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/synthetic.py:smoke'


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('evaluate') / 'run')
  results = train.train_and_evaluate(synthetic.get_config('smoke'), workdir)
  return workdir, results


def _scores(exported, source):
  """The export's probabilities on every record of `source`, computed here independently."""
  mean, std = exported.normalization
  graphdef, params, stats = nnx.split(exported.model, nnx.Param, nnx.BatchStat)
  scores, labels, difficult = [], [], []
  for batch in pipeline.eval_batches(
    source, batch_size=16, image_size=exported.image_size, shard_index=0, shard_count=1
  ):
    keep = batch['mask']
    probs = evaluate.predict_step(
      params, stats, batch['image'], graphdef=graphdef, mean=mean, std=std
    )
    scores.append(np.asarray(probs)[keep])
    labels.append(batch['labels'][keep])
    difficult.append(batch['difficult'][keep])
  return np.concatenate(scores), np.concatenate(labels), np.concatenate(difficult)


def _cli(*args, timeout=300):
  return subprocess.run(
    [sys.executable, '-m', 'kmcl_jax.evaluate', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_report_equals_evaluation_report_on_the_same_scores(smoke_run, tmp_path):
  workdir, results = smoke_run
  config = synthetic.get_config('smoke')
  out = str(tmp_path / 'report')
  report = evaluate.run_report(config, os.path.join(workdir, 'export'), out=out, workdir=workdir)
  saved = json.loads(Path(out, 'report.json').read_text())
  assert saved == json.loads(json.dumps(report))
  assert report['split'] == 'test' and report['num_examples'] == 64

  exported = export_lib.load_export(os.path.join(workdir, 'export'))
  scores, labels, difficult = _scores(exported, experiment.open_split(config, 'test'))
  for threshold, got in ((0.8, report['model']), (0.5, report['at_threshold_0.5']['model'])):
    want = metrics.evaluation_report(
      scores,
      labels,
      difficult=difficult,
      threshold=threshold,
      top_k=3,
      class_names=exported.class_names,
    )
    assert set(got) == set(want)
    for key, value in want.items():
      if isinstance(value, dict):
        np.testing.assert_allclose(list(got[key].values()), list(value.values()), atol=1e-4)
      elif isinstance(value, float):
        assert got[key] == pytest.approx(value, abs=1e-4), (threshold, key)
  # The training run's test report of the exported weights, and the same weights restored
  # from the run's best checkpoint.
  chosen = results['exported_weights']
  assert report['model']['mAP'] == pytest.approx(results['test'][chosen]['mAP'], abs=1e-4)
  assert report[f'checkpoint_{chosen}']['mAP'] == pytest.approx(report['model']['mAP'], abs=1e-6)
  md = Path(out, 'report.md').read_text()
  assert '| weights | red_circle |' in md and '## Overall, threshold 0.5' in md


def test_tuned_thresholds_maximise_each_class_f1():
  rng = np.random.default_rng(0)
  scores = rng.random((200, 4)).round(2)  # rounding makes ties
  labels = rng.random((200, 4)) < np.array([0.1, 0.3, 0.5, 0.0])
  tuned = evaluate.tune_thresholds(scores, labels, default=0.8)
  assert tuned[3] == 0.8  # no positives: the default

  def f1(k, t):
    predicted = scores[:, k] >= t
    tp = (predicted & labels[:, k]).sum()
    return 2 * tp / (predicted.sum() + labels[:, k].sum())

  for k in range(3):
    best = max(f1(k, t) for t in np.unique(scores[:, k]))
    assert f1(k, tuned[k]) == pytest.approx(best)
  # The worked case: cuts after 0.9, 0.8, 0.7, 0.6 give F1 0.5, 0.8, 0.67, 0.86.
  t = evaluate.tune_thresholds(
    np.array([[0.9], [0.8], [0.7], [0.6], [0.1]]), np.array([[1], [1], [0], [1], [0]]), default=0.5
  )
  assert t[0] == 0.6


def test_report_with_thresholds_predicts_score_at_least_threshold():
  rng = np.random.default_rng(1)
  scores = rng.random((50, 3))
  labels = rng.random((50, 3)) < 0.4
  thresholds = np.array([0.2, 0.5, 0.9])
  names = ('a', 'b', 'c')
  report = evaluate.report_with_thresholds(
    scores,
    labels,
    np.zeros_like(labels),
    thresholds=thresholds,
    top_k=3,
    with_auc=True,
    class_names=names,
  )
  predicted = scores >= thresholds
  tp = (predicted & labels).sum()
  assert report['OP'] == pytest.approx(100 * tp / predicted.sum())
  assert report['OR'] == pytest.approx(100 * tp / labels.sum())
  plain = metrics.evaluation_report(scores, labels, threshold=0.5, with_auc=True, class_names=names)
  assert report['AP'] == pytest.approx(plain['AP']) and report['AUC'] == pytest.approx(plain['AUC'])
  assert report['thresholds'] == pytest.approx(dict(zip(names, thresholds)))


def test_command_tunes_thresholds_into_the_export(smoke_run, tmp_path):
  workdir, _ = smoke_run
  export_dir = str(tmp_path / 'export')
  shutil.copytree(os.path.join(workdir, 'export'), export_dir)
  result = _cli(f'--export={export_dir}', f'--config={CONFIG}', '--tune_thresholds')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'synthetic test (threshold per-class)' in result.stdout
  assert 'Per-class AP' in result.stdout

  exported = export_lib.load_export(export_dir)
  config = synthetic.get_config('smoke')
  val_scores, val_labels, val_difficult = _scores(exported, experiment.open_split(config, 'val'))
  want = evaluate.tune_thresholds(val_scores, val_labels, val_difficult, default=0.8)
  assert exported.info['thresholds_split'] == 'val'
  np.testing.assert_allclose(exported.info['thresholds'], want, atol=1e-6)
  np.testing.assert_allclose(exported.thresholds(), want, atol=1e-6)
  np.testing.assert_array_equal(exported.thresholds(0.3), np.full(10, 0.3, np.float32))

  report = json.loads(Path(export_dir, 'report.json').read_text())
  assert set(report['tuned_thresholds']) == {'model'}
  assert report['tuned_thresholds']['model']['thresholds'] == pytest.approx(
    dict(zip(exported.class_names, want.tolist())), abs=1e-6
  )
  assert report['tuned_thresholds']['model']['mAP'] == pytest.approx(report['model']['mAP'])
  assert 'per-class thresholds' in Path(export_dir, 'report.md').read_text()


@pytest.mark.parametrize(
  'args,message',
  [
    (('--export=/nonexistent/export',), 'is not an export folder'),
    (('--split=nope',), "--split='nope'"),
    (('--config.dataset.options.num_classes=12',), 'differ from the export'),
  ],
)
def test_user_errors_give_one_line(smoke_run, args, message):
  workdir, _ = smoke_run
  if not args[0].startswith('--export'):
    args = (f'--export={os.path.join(workdir, "export")}', *args)
  result = _cli(f'--config={CONFIG}', *args, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr and 'Traceback' not in result.stderr
