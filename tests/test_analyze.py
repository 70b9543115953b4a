"""`python -m kmcl_jax.analyze` on one smoke run, and its pure functions."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from kmcl_jax import analyze, export as export_lib, train
from kmcl_jax.models.kmm import KernelMixtureModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('analyze') / 'run')
  train.train_and_evaluate(synthetic.get_config('smoke'), workdir)
  return workdir


def test_command_writes_every_figure(smoke_run):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'kmcl_jax.analyze',
      f'--workdir={smoke_run}',
      '--num_examples=40',
      '--num_gradcam=2',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  for name in analyze.FIGURES:
    path = os.path.join(smoke_run, 'figures', name)
    assert path in result.stdout
    with open(path, 'rb') as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_grad_cam_of_the_export(smoke_run):
  exported = export_lib.load_export(os.path.join(smoke_run, 'export'))
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  maps = analyze.gradcam_for(exported, images, np.array([[0, 4], [1, 5], [9, 2]]))
  assert maps.shape == (3, 2, 2, 2)  # 64 px / 32 = a 2 x 2 last feature map
  assert np.all(maps >= 0) and np.all(maps <= 1)


def test_grad_cam_of_a_linear_head_is_its_class_activation_map():
  """With global average pooling and a linear head Grad-CAM equals CAM (Selvaraju et al.)."""
  rng = np.random.default_rng(0)
  feature_map = jnp.asarray(rng.normal(size=(4, 3, 5, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
  classes = jnp.array([0, 3, 6, 2])
  maps = analyze.grad_cam(lambda fm: fm.mean(axis=(1, 2)) @ kernel, feature_map, classes)
  assert maps.shape == (4, 3, 5)
  assert float(maps.min()) >= 0 and float(maps.max()) <= 1
  cam = np.maximum(np.einsum('nhwc,cn->nhw', feature_map, kernel[:, classes]), 0)
  cam = cam / cam.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(maps, cam, atol=1e-5)
  # A score that does not depend on the features gives an all-zero map, not NaN.
  zero = analyze.grad_cam(
    lambda fm: 0.0 * fm.sum(axis=(1, 2, 3))[:, None], feature_map, jnp.zeros(4, jnp.int32)
  )
  np.testing.assert_array_equal(zero, 0.0)


@pytest.mark.parametrize(
  'kind,anisotropic',
  [
    ('bhattacharyya', False),
    ('bhattacharyya', True),
    ('mahalanobis', False),
    ('mahalanobis', True),
    ('gaussian', False),
    ('gaussian', True),
  ],
)
def test_class_log_similarity_of_every_kmm(kind, anisotropic):
  kmm = KernelMixtureModule(
    12, 5, kind=kind, anisotropic=anisotropic, reduced_dim=4, rngs=nnx.Rngs(0)
  )
  head = kmm(jax.random.normal(jax.random.key(1), (6, 12)))
  sim = np.asarray(analyze.class_log_similarity(head, kind=kind))
  assert sim.shape == (5, 5)
  np.testing.assert_allclose(np.diag(sim), 0.0, atol=1e-6)
  np.testing.assert_allclose(sim, sim.T, rtol=1e-6, atol=1e-6)
  assert np.all(sim <= 1e-6) and np.any(sim < -1e-6)


def test_cooccurrence_is_conditional_frequency():
  labels = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
  np.testing.assert_allclose(
    analyze.cooccurrence(labels), [[1, 2 / 3, 0], [2 / 3, 1, 0], [0, 0, 0]]
  )
