"""Device augmentations: every op against the host's PIL op, the draws' distributions, and
independence from the device split and the batch composition.

Tolerances (README 'Augmentation on the device'): exact for every op but the warps and
AutoContrast; nearest warps (Translate, Rotate, RandomAffine) <= 0.5% of pixels differ (float32
coordinates); bicubic shears <= 3% of pixels of any image and 0.5% over all images differ,
<= 0.5% by more than 1 level (edge pixels that flip between fill and image); AutoContrast
<= 1% of pixels by at most 1 level.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from configs import synthetic
from kmcl_jax import experiment, losses, train
from kmcl_jax.data import augment as host, augment_device as dev, pipeline

H, W = 24, 32


def _images():
  """A random image, a smooth one, and a low-contrast random one (H x W)."""
  rng = np.random.default_rng(0)
  ys, xs = np.mgrid[0:H, 0:W]
  smooth = np.stack([xs * 7 + ys * 3, 200 - ys * 6, 128 + 60 * np.sin(xs / 4)], -1)
  return [
    rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
    np.clip(smooth, 0, 255).astype(np.uint8),
    rng.integers(40, 180, (H, W, 3), dtype=np.uint8),
  ]


def _host_draws(name, seed):
  """What the host op will draw from default_rng(seed): (negative sign, cutout (x, y))."""
  rng = np.random.default_rng(seed)
  negative = name in dev.SIGNED_OPS and not rng.random() < 0.5
  position = (int(rng.integers(W)), int(rng.integers(H))) if name == 'Cutout' else (0, 0)
  return negative, np.asarray(position, np.int32)


_apply = jax.jit(dev.apply_op)
_PARAMS = dev.op_params(H, W)


@pytest.mark.parametrize('name', dev.OP_NAMES)
def test_op_matches_pil(name):
  op = dev.OP_NAMES.index(name)
  differing, above_one = [], []
  for image in _images():
    for magnitude in range(1, host.NUM_MAGNITUDES):
      for seed in range(3):
        negative, position = _host_draws(name, seed)
        want = np.asarray(
          host.apply_op(Image.fromarray(image), name, magnitude, np.random.default_rng(seed)),
          np.int32,
        )
        got = np.asarray(
          _apply(image, op, _PARAMS[op, magnitude, int(negative)], position), np.int32
        )
        diff = np.abs(got - want).max(-1)
        differing.append((diff > 0).mean())
        above_one.append((diff > 1).mean())
  differing, above_one = np.asarray(differing), np.asarray(above_one)
  if name in ('ShearX', 'ShearY'):
    assert differing.max() <= 0.03 and differing.mean() <= 0.005 and above_one.mean() <= 0.005
  elif name in ('TranslateX', 'TranslateY', 'Rotate'):
    assert differing.max() <= 0.005
  elif name == 'AutoContrast':
    assert differing.max() <= 0.01 and above_one.max() == 0
  else:
    assert differing.max() == 0


def test_autocontrast_integer_formula():
  # One channel spanning [10, 200]: (x - 10) * 255 // 190, other channels constant (kept).
  image = np.zeros((H, W, 3), np.uint8)  # the shape of the other tests: no new compile
  image[..., 0] = np.linspace(10, 200, H * W).reshape(H, W).astype(np.uint8)
  image[..., 1:] = 77
  got = np.asarray(
    _apply(image, dev.OP_NAMES.index('AutoContrast'), _PARAMS[0, 0, 0], np.zeros(2, np.int32))
  )
  x = image[..., 0].astype(int)
  np.testing.assert_array_equal(got[..., 0], (x - 10) * 255 // 190)
  np.testing.assert_array_equal(got[..., 1:], image[..., 1:])


def test_cutout_pil_matches_host():
  image = _images()[0]
  for seed in range(30):
    want = np.asarray(host.cutout_pil(Image.fromarray(image), np.random.default_rng(seed)))
    rng = np.random.default_rng(seed)
    yc, xc, colour = rng.integers(H), rng.integers(W), rng.integers(0, 256, size=3)
    np.testing.assert_array_equal(np.asarray(dev.cutout_pil(image, yc, xc, colour)), want)


def test_random_affine_matches_host():
  image = _images()[0]
  affine = jax.jit(dev.affine)
  for seed in range(20):
    want = np.asarray(host.random_affine(Image.fromarray(image), np.random.default_rng(seed)))
    rng = np.random.default_rng(seed)  # the host's draws, in its order
    angle = rng.uniform(-45, 45)
    t = np.asarray(
      [round(rng.uniform(-0.15 * W, 0.15 * W)), round(rng.uniform(-0.15 * H, 0.15 * H))], np.float32
    )
    got = np.asarray(affine(image, angle, t, rng.uniform(0.85, 1.15)))
    assert (got != want).any(-1).mean() <= 0.005


def _chi2(counts, probs):
  expected = np.asarray(probs) * np.sum(counts)
  return float(np.sum((np.asarray(counts) - expected) ** 2 / expected))


# chi-square 0.999 quantiles by degrees of freedom (a fixed seed: the test is deterministic).
_CHI2_999 = {2: 13.82, 8: 26.12, 9: 27.88, 14: 36.12, 23: 49.73, 31: 61.10}


def test_draws_follow_the_authors_distribution():
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  d = jax.device_get(jax.vmap(lambda k: dev.randaugment_draws(k, H, W))(keys))
  ops, mags = d['op'].ravel(), d['magnitude'].ravel()
  assert _chi2(np.bincount(ops, minlength=15), [1 / 15] * 15) < _CHI2_999[14]
  assert mags.min() == 1 and mags.max() == 9
  assert _chi2(np.bincount(mags, minlength=10)[1:], [1 / 9] * 9) < _CHI2_999[8]
  applied = d['apply'].sum(1)  # 0, 1 or 2 ops per image: binomial(2, 0.5)
  assert _chi2(np.bincount(applied, minlength=3), [0.25, 0.5, 0.25]) < _CHI2_999[2]
  assert abs(d['negative'].mean() - 0.5) < 4 * np.sqrt(0.25 / (2 * n))
  # Op and magnitude are drawn independently: the magnitude histogram of one op is uniform.
  assert _chi2(np.bincount(mags[ops == 3], minlength=10)[1:], [1 / 9] * 9) < _CHI2_999[8]
  x, y = d['position'][..., 0].ravel(), d['position'][..., 1].ravel()
  assert _chi2(np.bincount(x, minlength=W), [1 / W] * W) < _CHI2_999[31]
  assert _chi2(np.bincount(y, minlength=H), [1 / H] * H) < _CHI2_999[23]

  c = jax.device_get(jax.vmap(lambda k: dev.cutout_draws(k, H, W))(keys))
  assert _chi2(np.bincount(c['yc'], minlength=H), [1 / H] * H) < _CHI2_999[23]
  assert c['colour'].min() == 0 and c['colour'].max() == 255

  a = jax.device_get(jax.vmap(lambda k: dev.affine_draws(k, H, W))(keys))
  angle_bins = np.histogram(a['angle'], bins=10, range=(-45, 45))[0]
  assert angle_bins.sum() == n and _chi2(angle_bins, [0.1] * 10) < _CHI2_999[9]
  scale_bins = np.histogram(a['scale'], bins=10, range=(0.85, 1.15))[0]
  assert scale_bins.sum() == n and _chi2(scale_bins, [0.1] * 10) < _CHI2_999[9]
  # round(U(-4.8, 4.8)): P(k) = |[k - 0.5, k + 0.5] & [-4.8, 4.8]| / 9.6, k = -5..5.
  tx = a['translate'][:, 0].astype(int)
  probs = [min(k + 0.5, 4.8) - max(k - 0.5, -4.8) for k in range(-5, 6)]
  assert _chi2(np.bincount(tx + 5, minlength=11), np.asarray(probs) / 9.6) < 29.59  # df 10


def test_same_augmentation_whatever_the_device_split():
  assert jax.device_count() == 8
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(dev.sharded_augment(kind='randaugment', seed=5, mesh=mesh))
  batch = jax.device_put(images, NamedSharding(mesh, P('data')))
  eight = np.asarray(sharded(batch, jnp.int32(7)))

  @jax.jit
  def single(x, step, indices):
    return dev.augment_batch(x, kind='randaugment', seed=5, step=step, global_indices=indices)

  # Example i's augmentation depends on i, not on its row or on the rest of the batch.
  perm = rng.permutation(16)
  one, shuffled = (
    np.asarray(single(jax.device_put(x, jax.devices()[0]), 7, i))
    for x, i in ((images, np.arange(16)), (images[perm], perm))
  )
  np.testing.assert_array_equal(eight, one)
  np.testing.assert_array_equal(shuffled, one[perm])
  other_step = np.asarray(sharded(batch, jnp.int32(8)))
  assert (other_step != eight).any(axis=(1, 2, 3)).all()
  assert (eight != images).any(axis=(1, 2, 3)).all()  # CutoutPIL always changes a pixel


def test_rand_augment_strategies_agree():
  """Per image through a switch, or every op on the whole batch and a select: same images."""
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
  keys = dev.example_keys(9, 0, jnp.arange(48))
  drawn = jax.vmap(lambda k: dev.randaugment_draws(k, 16, 16))(keys)
  applied = np.asarray(drawn['op'])[np.asarray(drawn['apply'])]
  assert len(set(applied.tolist())) >= 12  # most of the 15 ops are exercised
  per_image, batched = (
    np.asarray(jax.jit(functools.partial(dev.rand_augment, per_image=p))(images, keys))
    for p in (True, False)
  )
  np.testing.assert_array_equal(per_image, batched)


def test_augment_batch_none_unknown_and_setting():
  images = np.zeros((2, 8, 8, 3), np.uint8)
  out = dev.augment_batch(images, kind='none', seed=0, step=0, global_indices=jnp.arange(2))
  np.testing.assert_array_equal(out, images)
  with pytest.raises(ValueError, match='unknown augment'):
    dev.augment_batch(images, kind='mixup', seed=0, step=0, global_indices=jnp.arange(2))
  assert dev.enabled('on') and not dev.enabled('off')
  assert dev.enabled('auto') == (jax.default_backend() != 'cpu')
  with pytest.raises(ValueError, match='augment_device'):
    dev.enabled('yes')


def test_train_step_with_device_augmentation_on_eight_devices():
  # 'affine' compiles fastest; the RandAugment switch under shard_map is compiled above.
  config = synthetic.get_config('smoke')
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  model_fn = functools.partial(experiment.create_model, config, 10, 0)
  optimizer = experiment.make_optimizer(config, 10)
  abstract = nnx.eval_shape(model_fn)
  abstract.train()
  step = jax.jit(
    functools.partial(
      train.train_step,
      graphdef=nnx.graphdef(abstract),
      optimizer=optimizer,
      loss_config=losses.LossConfig(),
      ema_decay=0.9,
      mean=(0.5,) * 3,
      std=(0.25,) * 3,
      augment=dev.sharded_augment(kind='affine', seed=0, mesh=mesh),
    )
  )
  state = jax.device_put(
    jax.jit(functools.partial(experiment.init_state, model_fn, optimizer))(),
    NamedSharding(mesh, P()),
  )
  rng = np.random.default_rng(0)
  batch = jax.device_put(
    {
      'image': rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
      'labels': (rng.random((8, 10)) < 0.3).astype(np.float32),
    },
    NamedSharding(mesh, P('data')),
  )
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and int(metrics['skipped_steps']) == 0
  assert int(state['step']) == 1


class _Stop(Exception):
  pass


def test_trainer_moves_augmentation_to_the_step(tmp_path, monkeypatch):
  """augment_device='on': the host pipeline only resizes and the step gets the augmenter."""
  seen = {}
  train_iterator = pipeline.train_iterator

  def spy_iterator(*args, **kwargs):
    seen['host_augment'] = kwargs['augment']
    return train_iterator(*args, **kwargs)

  def stop(run, *args, **kwargs):
    seen['step_augment'] = run.train_step.__wrapped__.keywords['augment']
    raise _Stop  # before anything is compiled for training

  monkeypatch.setattr(pipeline, 'train_iterator', spy_iterator)
  monkeypatch.setattr(train, '_train_loop', stop)
  for setting, on in (('on', True), ('off', False)):
    config = synthetic.get_config('smoke')
    config.dataset.augment_device = setting
    with pytest.raises(_Stop):
      train.train_and_evaluate(config, str(tmp_path / setting))
    assert seen['host_augment'] == ('none' if on else 'randaugment')
    assert (seen['step_augment'] is not None) == on


def test_setting_is_validated():
  config = synthetic.get_config('smoke')
  config.dataset.augment_device = 'gpu'
  with pytest.raises(experiment.ConfigError, match='dataset.augment_device'):
    experiment.validate_config(config)
