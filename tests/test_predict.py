"""`python -m kmcl_jax.predict` on the export of one smoke run."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import synthetic
from kmcl_jax import evaluate, experiment, export as export_lib, predict, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 5


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """A smoke run's export and a folder of its test images (PNG, one in a subfolder, one JPEG
  at another size) plus one corrupt file."""
  root = tmp_path_factory.mktemp('predict')
  workdir = str(root / 'run')
  train.train_and_evaluate(synthetic.get_config('smoke'), workdir)
  source = experiment.open_split(synthetic.get_config('smoke'), 'test')
  folder = root / 'images'
  (folder / 'sub').mkdir(parents=True)
  images = {}
  for i in range(NUM_IMAGES):
    path = folder / ('sub' if i == 0 else '') / f'{i}.png'
    Image.fromarray(source[i]['image']).save(path)
    images[str(path)] = source[i]['image']
  large = np.asarray(Image.fromarray(source[NUM_IMAGES]['image']).resize((96, 96)))
  Image.fromarray(large).save(folder / 'large.jpg', quality=95)
  (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
  (folder / 'notes.txt').write_text('not an image')
  return os.path.join(workdir, 'export'), str(folder), images


def test_command_predicts_every_readable_image_and_names_the_corrupt_one(smoke_run):
  export_dir, folder, images = smoke_run
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'kmcl_jax.predict',
      f'--export={export_dir}',
      '--jsonl',
      '--batch_size=4',
      folder,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1
  assert 'broken.png' in result.stderr and '1 of 7 path(s) skipped' in result.stderr
  records = [json.loads(line) for line in result.stdout.splitlines()]
  assert sorted(os.path.basename(r['path']) for r in records) == [
    '0.png',
    '1.png',
    '2.png',
    '3.png',
    '4.png',
    'large.jpg',
  ]

  # Same probabilities as the evaluation path on the same pixels (PNG is lossless).
  exported = export_lib.load_export(export_dir)
  graphdef, params, stats = nnx.split(exported.model, nnx.Param, nnx.BatchStat)
  mean, std = exported.normalization
  by_path = {r['path']: r for r in records}
  paths = sorted(images)
  want = evaluate.predict_step(
    params, stats, np.stack([images[p] for p in paths]), graphdef=graphdef, mean=mean, std=std
  )
  got = np.array([[by_path[p]['scores'][c] for c in exported.class_names] for p in paths])
  np.testing.assert_allclose(got, want, atol=1e-5)
  thresholds = exported.thresholds()
  for record in records:
    assert set(record) == {'path', 'labels', 'scores', 'variance'}
    assert record['labels'] == [
      c for c, t in zip(exported.class_names, thresholds) if record['scores'][c] >= t
    ]
    # var = ELU(.) + 2 + eps >= 1 (kmm.py); isotropic Bhattacharyya: one per class.
    assert all(v >= 1.0 for v in record['variance'].values())


def test_tuned_thresholds_are_used_and_the_flag_overrides_them(smoke_run, tmp_path):
  export_dir, folder, _ = smoke_run
  tuned_dir = str(tmp_path / 'export')
  shutil.copytree(export_dir, tuned_dir)
  info = json.loads(Path(tuned_dir, 'model.json').read_text())
  thresholds = np.linspace(0.0, 1.0, 10)
  thresholds[0] = 0.0  # always predicted
  thresholds[9] = 1.01  # never predicted
  export_lib.write_model_info(tuned_dir, dict(info, thresholds=thresholds.tolist()))

  out, err = io.StringIO(), io.StringIO()
  status = predict.predict_paths(
    tuned_dir, [folder], jsonl=True, threshold=None, batch_size=8, out=out, err=err
  )
  assert status == 1 and 'broken.png' in err.getvalue()
  records = [json.loads(line) for line in out.getvalue().splitlines()]
  names = list(records[0]['scores'])
  for record in records:
    assert record['labels'] == [c for c, t in zip(names, thresholds) if record['scores'][c] >= t]
    assert names[0] in record['labels'] and names[9] not in record['labels']

  out = io.StringIO()
  predict.predict_paths(
    tuned_dir,
    [os.path.join(folder, 'sub')],
    jsonl=False,
    threshold=0.0,
    batch_size=8,
    out=out,
    err=io.StringIO(),
  )
  line = out.getvalue().strip()
  assert line.startswith(os.path.join(folder, 'sub', '0.png')) and line.count('p=') == 10


def test_missing_path_is_skipped_with_status_one(smoke_run, tmp_path):
  export_dir, folder, _ = smoke_run
  err = io.StringIO()
  status = predict.predict_paths(
    export_dir,
    [os.path.join(folder, 'sub'), str(tmp_path / 'nothing')],
    jsonl=True,
    threshold=None,
    batch_size=2,
    out=io.StringIO(),
    err=err,
  )
  assert status == 1 and 'nothing: no such file or folder' in err.getvalue()
  assert (
    predict.predict_paths(
      export_dir,
      [os.path.join(folder, 'sub')],
      jsonl=True,
      threshold=None,
      batch_size=2,
      out=io.StringIO(),
      err=io.StringIO(),
    )
    == 0
  )


@pytest.mark.parametrize(
  'shape,want',
  [
    ((2, 3), [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),  # bhattacharyya isotropic
    ((2, 3, 2), [[1.5, 3.5, 5.5], [7.5, 9.5, 11.5]]),  # bhattacharyya anisotropic
    ((2, 1, 3), [[2.0] * 3, [5.0] * 3]),  # mahalanobis (shared)
    ((2, 1), [[1.0] * 3, [2.0] * 3]),  # gaussian isotropic
    ((2, 1, 1), [[1.0] * 3, [2.0] * 3]),  # gaussian anisotropic
  ],
)
def test_per_class_variance_of_every_kmm_shape(shape, want):
  var = jnp.arange(1.0, 1.0 + np.prod(shape)).reshape(shape)
  np.testing.assert_allclose(predict.per_class_variance(var, 3), want)
