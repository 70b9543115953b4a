"""Augmentations: shapes, dtypes, ranges, and each op against an independent numpy reference."""

import math

import numpy as np
import pytest
from PIL import Image

from kmcl_jax.data import augment as aug


def _image(size=32, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize('mode', aug.AUGMENTS)
@pytest.mark.parametrize('shape', [(40, 30, 3), (64, 64, 3), (17, 90, 3)])
def test_train_augment_shape_dtype_range(mode, shape):
  image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  for seed in range(25):
    out = aug.train_augment(image, np.random.default_rng(seed), size=48, augment=mode)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
  with pytest.raises(ValueError, match='unknown augment'):
    aug.train_augment(image, np.random.default_rng(0), size=48, augment='mixup')


def test_train_augment_deterministic_given_rng():
  image = _image(50)
  a = aug.train_augment(image, np.random.default_rng([3, 7]), size=32, augment='randaugment')
  b = aug.train_augment(image, np.random.default_rng([3, 7]), size=32, augment='randaugment')
  np.testing.assert_array_equal(a, b)


def test_none_is_bilinear_resize_only():
  image = _image(50)
  out = aug.train_augment(image, np.random.default_rng(0), size=20, augment='none')
  np.testing.assert_array_equal(
    out, np.asarray(Image.fromarray(image).resize((20, 20), Image.BILINEAR))
  )


def test_cutout_pil_geometry():
  base = np.zeros((40, 40, 3), np.uint8)
  for seed in range(50):
    out = np.asarray(aug.cutout_pil(Image.fromarray(base), np.random.default_rng(seed)))
    changed = np.argwhere(out.any(-1))
    # Reference: the same draws, a clipped inclusive rectangle of half the sides.
    rng = np.random.default_rng(seed)
    yc, xc = rng.integers(40), rng.integers(40)
    colour = rng.integers(0, 256, size=3)
    y1, y2 = max(yc - 10, 0), min(yc + 10, 40)
    x1, x2 = max(xc - 10, 0), min(xc + 10, 40)
    expect = np.zeros_like(base)
    expect[y1 : y2 + 1, x1 : x2 + 1] = colour
    np.testing.assert_array_equal(out, expect)
    if (colour > 0).any():
      assert changed[:, 0].max() - changed[:, 0].min() <= 20


def test_pixel_ops_match_numpy():
  x = _image(16)
  img = Image.fromarray(x)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(np.asarray(aug.apply_op(img, 'Invert', 5, rng)), 255 - x)
  threshold = np.linspace(256, 0, 10)[6]
  np.testing.assert_array_equal(
    np.asarray(aug.apply_op(img, 'Solarize', 6, rng)), np.where(x >= threshold, 255 - x, x)
  )
  bits = int(np.round(np.linspace(8, 4, 10))[9])
  assert bits == 4
  np.testing.assert_array_equal(
    np.asarray(aug.apply_op(img, 'Posterize', 9, rng)), x & np.uint8((0xFF << (8 - bits)) & 0xFF)
  )


def test_brightness_sign_and_magnitude():
  x = np.full((8, 8, 3), 100, np.uint8)
  outs = {
    int(
      np.asarray(aug.apply_op(Image.fromarray(x), 'Brightness', 9, np.random.default_rng(s)))[
        0, 0, 0
      ]
    )
    for s in range(30)
  }
  assert outs == {10, 190}  # 100 * (1 -+ 0.9)


def test_translate_and_cutout_ops():
  x = _image(20)
  img = Image.fromarray(x)
  shift = 150 / 331 * 20 * (4 / 9)  # magnitude 4 of linspace(0, 150/331, 10), times the width
  for seed in range(6):
    out = np.asarray(aug.apply_op(img, 'TranslateX', 4, np.random.default_rng(seed)))
    sign = 1 if np.random.default_rng(seed).random() < 0.5 else -1
    s = int(round(sign * shift))  # PIL nearest: output column c reads input column c + s
    ref = np.full_like(x, 128)
    if s >= 0:
      ref[:, : 20 - s] = x[:, s:]
    else:
      ref[:, -s:] = x[:, : 20 + s]
    assert (out == ref).all(-1).mean() > 0.9
  out = np.asarray(aug.apply_op(img, 'Cutout', 9, np.random.default_rng(0)))
  filled = (out == np.array(aug.CUTOUT_FILL)).all(-1)
  assert 0 < filled.sum() <= 21 * 21 and (out[~filled] == x[~filled]).all()


def _affine_reference(x, angle, t, s):
  """Nearest-neighbour inverse mapping written independently of PIL (pixel centres at +0.5)."""
  h, w = x.shape[:2]
  ys, xs = np.mgrid[0:h, 0:w]
  px, py = xs + 0.5 - w / 2 - t[0], ys + 0.5 - h / 2 - t[1]
  a = math.radians(angle)
  ix = (math.cos(a) * px + math.sin(a) * py) / s + w / 2
  iy = (-math.sin(a) * px + math.cos(a) * py) / s + h / 2
  ix, iy = np.floor(ix).astype(int), np.floor(iy).astype(int)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  out = np.zeros_like(x)
  out[inside] = x[iy[inside], ix[inside]]
  return out


@pytest.mark.parametrize(
  'angle,t,s', [(30.0, (3.0, -2.0), 1.1), (-45.0, (0.0, 4.0), 0.85), (90.0, (0.0, 0.0), 1.0)]
)
def test_affine_matches_reference(angle, t, s):
  x = _image(24)
  out = np.asarray(aug.affine(Image.fromarray(x), angle=angle, translate=t, scale=s))
  ref = _affine_reference(x, angle, t, s)
  assert (out == ref).all(-1).mean() > 0.97  # only boundary-rounding pixels may differ


def test_random_affine_parameter_ranges():
  # A single bright pixel at the centre moves by the translation only (rotation and scale
  # fix the centre); the translation is within 15% of the side.
  x = np.zeros((41, 41, 3), np.uint8)
  x[18:23, 18:23] = 255
  for seed in range(40):
    out = np.asarray(aug.random_affine(Image.fromarray(x), np.random.default_rng(seed)))
    ys, xs = np.nonzero(out[..., 0])
    assert abs(ys.mean() - 20) <= 0.15 * 41 + 1 and abs(xs.mean() - 20) <= 0.15 * 41 + 1


def test_randaugment_applies_at_most_two_known_ops(monkeypatch):
  calls = []
  original = aug.apply_op

  def spy(img, name, magnitude, rng):
    calls.append((name, magnitude))
    return original(img, name, magnitude, rng)

  monkeypatch.setattr(aug, 'apply_op', spy)
  counts = []
  for seed in range(400):
    before = len(calls)
    aug.randaugment(Image.fromarray(_image(16)), np.random.default_rng(seed))
    counts.append(len(calls) - before)
  assert set(counts) == {0, 1, 2}
  assert abs(np.mean(counts) - 1.0) < 0.12  # two draws, each applied with probability 0.5
  names = {n for n, _ in calls}
  magnitudes = {m for _, m in calls}
  assert names == set(aug.RANDAUGMENT_OPS) and magnitudes == set(range(1, 10))
