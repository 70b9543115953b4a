"""The training augmentations of `kmcl_jax.data.augment`, in jnp/lax, for the jitted train step.

With `dataset.augment_device` on, the host only decodes and resizes, and the train step runs
CutoutPIL and RandAugment (or the ChestX-ray14 RandomAffine) on the uint8 batch before
normalising it (README 'Augmentation on the device'). The ops reproduce Pillow's arithmetic,
not just the idea of each op:

  * blends (Color, Contrast, Brightness, Sharpness): float32 `deg + f * (img - deg)`, clipped
    and truncated, as Pillow's ImagingBlend (the product rounded as Pillow's build rounds it,
    also where XLA fuses multiply-adds); greyscale is Pillow's L = (19595 R + 38470 G +
    7471 B + 2**15) >> 16; Contrast blends with the rounded mean of L; Sharpness with Pillow's
    3x3 SMOOTH filter (kernel 1 1 1 / 1 5 1 / 1 1 1, / 13, rounded, one-pixel border copied);
  * Posterize, Solarize, Invert: the same lookup; Equalize: Pillow's histogram LUT (integers);
    AutoContrast: per channel (x - lo) * 255 // (hi - lo), which differs from Pillow's float64
    arithmetic by 1 on the few pixels where that quotient is an exact integer;
  * geometry: Pillow's inverse map (output pixel centre (x + 0.5, y + 0.5) -> input point),
    nearest = floor of that point, bicubic = Pillow's transform kernel (a = -1, edge clamped,
    truncated to uint8), points outside the image take the fill colour. Coordinates are
    float32 here (float64 in Pillow), so a pixel whose input point lies within ~1e-5 of a pixel
    edge may pick the neighbour.

Every random draw of an example comes from a key that is a pure function of (seed, step, index
of the example in the global batch), so an example's augmentation does not depend on how the
batch is split over devices or processes, and a resumed run redraws the same augmentations.
The draws follow the host's distributions (see `kmcl_jax.data.augment`), not its numpy streams.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from kmcl_jax.data import augment as host

SETTINGS = ('auto', 'on', 'off')
OP_NAMES = tuple(host.RANDAUGMENT_OPS)
_NUM_OPS = len(OP_NAMES)
_AFFINE_FILL = np.asarray(host.AFFINE_FILL, np.uint8)
_CUTOUT_FILL = np.asarray(host.CUTOUT_FILL, np.uint8)
# Ops whose table value takes the random sign (see the table in kmcl_jax/data/augment.py).
SIGNED_OPS = (
  'ShearX',
  'ShearY',
  'TranslateX',
  'TranslateY',
  'Color',
  'Contrast',
  'Sharpness',
  'Brightness',
)


def enabled(setting: str) -> bool:
  """Whether augmentation runs in the train step: 'auto' = when the backend is not the CPU.

  On a CPU-only machine one core augments 224 px images about as fast with PIL as with these
  ops compiled by XLA (README 'Augmentation on the device'), and on the host the work overlaps
  the train step in the input pipeline's threads, so 'auto' leaves it there.
  """
  if setting not in SETTINGS:
    raise ValueError(f'augment_device={setting!r} is not one of {SETTINGS}')
  return setting == 'on' or (setting == 'auto' and jax.default_backend() != 'cpu')


# ------------------------------------------------------------------------------ pixel helpers


def _times(x: jax.Array, factor) -> jax.Array:
  """float32 x * factor rounded once, for integer-valued |x| < 2**12, also where the compiler
  fuses a multiply and an add into one FMA (XLA does; Pillow's x86-64 build does not): the
  factor is split into two halves of 12 significant bits, whose products are exact."""
  factor = jnp.asarray(factor, jnp.float32)
  bits = lax.bitcast_convert_type(factor, jnp.uint32) & jnp.uint32(0xFFFFF000)
  high = lax.bitcast_convert_type(bits, jnp.float32)
  return high * x + (factor - high) * x


def _blend(degenerate: jax.Array, image: jax.Array, factor) -> jax.Array:
  """Pillow's Image.blend(degenerate, image, factor): float32, clipped, truncated."""
  d = degenerate.astype(jnp.float32)
  v = d + _times(image.astype(jnp.float32) - d, factor)
  return jnp.floor(jnp.clip(v, 0.0, 255.0)).astype(jnp.uint8)


def _grey(image: jax.Array) -> jax.Array:
  """Pillow's RGB -> L (int32 [H, W])."""
  x = image.astype(jnp.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _smooth(image: jax.Array) -> jax.Array:
  """Pillow's ImageFilter.SMOOTH, summed in Pillow's order (row below, row, row above)."""
  x = image.astype(jnp.float32)
  edge, centre = np.float32(1 / 13), np.float32(5 / 13)
  h = image.shape[0]
  acc = jnp.float32(0.0)
  times_edge, times_centre = _times(x, edge), _times(x, centre)
  for dy in (1, 0, -1):
    rows = slice(1 + dy, h - 1 + dy)
    middle = (times_centre if dy == 0 else times_edge)[rows, 1:-1]
    acc = acc + (times_edge[rows, :-2] + middle + times_edge[rows, 2:])
  inner = jnp.floor(jnp.clip(acc, 0.0, 255.0) + 0.5).astype(jnp.uint8)
  return image.at[1:-1, 1:-1].set(inner)


def _inverse_map(shape, matrix) -> tuple[jax.Array, jax.Array]:
  """Input point of every output pixel centre under Pillow's affine (a, b, c, d, e, f)."""
  h, w = shape
  ys = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  xs = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  return a * xs + b * ys + c, d * xs + e * ys + f


def _warp_nearest(image: jax.Array, matrix, fill) -> jax.Array:
  h, w = image.shape[:2]
  xin, yin = _inverse_map((h, w), matrix)
  ix, iy = jnp.floor(xin).astype(jnp.int32), jnp.floor(yin).astype(jnp.int32)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  out = image[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
  return jnp.where(inside[..., None], out, jnp.asarray(fill, jnp.uint8))


def _cubic(v0, v1, v2, v3, d):
  """Pillow's transform-bicubic (Geometry.c, a = -1), in its Horner form."""
  p2 = -v0 + v2
  p3 = 2 * (v0 - v1) + v2 - v3
  p4 = -v0 + v1 - v2 + v3
  return v1 + d * (p2 + d * (p3 + d * p4))


def _warp_bicubic(image: jax.Array, matrix, fill) -> jax.Array:
  h, w = image.shape[:2]
  xin, yin = _inverse_map((h, w), matrix)
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  xs, ys = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(xs), jnp.floor(ys)
  dx, dy = (xs - x0)[..., None], (ys - y0)[..., None]
  taps = jnp.arange(-1, 3)
  cols = jnp.clip(x0.astype(jnp.int32)[..., None] + taps, 0, w - 1)  # [H, W, 4]
  rows = jnp.clip(y0.astype(jnp.int32)[..., None] + taps, 0, h - 1)
  x = image.astype(jnp.float32)
  rows_v = [_cubic(*(x[rows[..., j], cols[..., i]] for i in range(4)), dx) for j in range(4)]
  v = _cubic(*rows_v, dy)
  out = jnp.floor(jnp.clip(v, 0.0, 255.0)).astype(jnp.uint8)
  return jnp.where(inside[..., None], out, jnp.asarray(fill, jnp.uint8))


def _rectangle(image: jax.Array, x1, y1, x2, y2, colour) -> jax.Array:
  """ImageDraw.rectangle([x1, y1, x2, y2], fill=colour): corners inclusive."""
  h, w = image.shape[:2]
  ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  inside = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
  return jnp.where(inside[..., None], jnp.asarray(colour, jnp.uint8), image)


# ------------------------------------------------------------------------------ the ops
# One image uint8 [H, W, 3]; `param` is a float32 [6] row of `op_params` (the affine matrix of a
# geometric op, else the op's value in element 0); `position` (x, y) is the Cutout draw.


def _shear_or_rotate(bicubic):
  def op(image, param, position):
    del position
    warp = _warp_bicubic if bicubic else _warp_nearest
    return warp(image, param, _AFFINE_FILL)

  return op


def _enhance(degenerate_fn):
  def op(image, param, position):
    del position
    return _blend(degenerate_fn(image), image, param[0])

  return op


def _color_degenerate(image):
  return jnp.broadcast_to(_grey(image)[..., None], image.shape).astype(jnp.uint8)


def _contrast_degenerate(image):
  grey = _grey(image)
  count = grey.size
  mean = (2 * jnp.sum(grey) + count) // (2 * count)  # int(mean + 0.5), exactly
  return jnp.full(image.shape, mean, jnp.uint8)


def _posterize(image, param, position):
  del position
  bits = param[0].astype(jnp.int32)
  mask = ((0xFF << (8 - bits)) & 0xFF).astype(jnp.uint8)
  return image & mask


def _solarize(image, param, position):
  del position
  return jnp.where(image.astype(jnp.float32) < param[0], image, 255 - image)


def _autocontrast(image, param, position):
  del param, position
  x = image.astype(jnp.int32)
  lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  scaled = jnp.clip((x - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
  return jnp.where(hi > lo, scaled, x).astype(jnp.uint8)


def _equalize(image, param, position):
  del param, position
  h, w = image.shape[:2]
  x = image.astype(jnp.int32)
  channels = jnp.broadcast_to(jnp.arange(3), x.shape)
  hist = jnp.zeros((3, 256), jnp.int32).at[channels, x].add(1)
  top = jnp.take_along_axis(hist, x.max(axis=(0, 1))[:, None], axis=1)[:, 0]
  step = (h * w - top) // 255
  before = jnp.cumsum(hist, axis=1) - hist
  lut = jnp.minimum((step[:, None] // 2 + before) // jnp.maximum(step, 1)[:, None], 255)
  identity = ((hist > 0).sum(axis=1) <= 1) | (step == 0)
  lut = jnp.where(identity[:, None], jnp.arange(256), lut)
  return lut[channels, x].astype(jnp.uint8)


def _invert(image, param, position):
  del param, position
  return 255 - image


def _cutout(image, param, position):
  side = param[0].astype(jnp.int32)
  h, w = image.shape[:2]
  x1, y1 = jnp.maximum(0, position[0] - side // 2), jnp.maximum(0, position[1] - side // 2)
  out = _rectangle(
    image, x1, y1, jnp.minimum(w, x1 + side), jnp.minimum(h, y1 + side), _CUTOUT_FILL
  )
  return jnp.where(side > 0, out, image)


def _identity(image, param, position):
  del param, position
  return image


_BRANCHES = {
  'ShearX': _shear_or_rotate(True),
  'ShearY': _shear_or_rotate(True),
  'TranslateX': _shear_or_rotate(False),
  'TranslateY': _shear_or_rotate(False),
  'Rotate': _shear_or_rotate(False),
  'Color': _enhance(_color_degenerate),
  'Posterize': _posterize,
  'Solarize': _solarize,
  'Contrast': _enhance(_contrast_degenerate),
  'Sharpness': _enhance(_smooth),
  'Brightness': _enhance(jnp.zeros_like),
  'AutoContrast': _autocontrast,
  'Equalize': _equalize,
  'Invert': _invert,
  'Cutout': _cutout,
}
# Switch branches in OP_NAMES order; the extra last one is "not applied".
_SWITCH = tuple(_BRANCHES[name] for name in OP_NAMES) + (_identity,)


def op_params(height: int, width: int) -> np.ndarray:
  """float32 [ops, magnitudes, 2 signs (+, -), 6]: each op's argument, computed in float64.

  Geometric ops get Pillow's affine matrix (as augment.py builds it for an image of this
  size), the others their table value (the enhance factor 1 + v * sign for the blends).
  """
  out = np.zeros((_NUM_OPS, host.NUM_MAGNITUDES, 2, 6))
  for i, name in enumerate(OP_NAMES):
    table = np.asarray(host.RANDAUGMENT_OPS[name][1], np.float64)
    for s, sign in enumerate((1.0, -1.0)):
      v = table * (sign if name in SIGNED_OPS else 1.0)
      for m in range(host.NUM_MAGNITUDES):
        out[i, m, s] = _param_row(name, v[m], height, width)
  return out.astype(np.float32)


def _param_row(name: str, v: float, height: int, width: int) -> list[float]:
  if name == 'ShearX':
    return [1, v, 0, 0, 1, 0]
  if name == 'ShearY':
    return [1, 0, 0, v, 1, 0]
  if name == 'TranslateX':
    return [1, 0, v * width, 0, 1, 0]
  if name == 'TranslateY':
    return [1, 0, 0, 0, 1, v * height]
  if name == 'Rotate':
    return _rotate_matrix(v, height, width)
  if name in ('Color', 'Contrast', 'Sharpness', 'Brightness'):
    return [1.0 + v, 0, 0, 0, 0, 0]
  return [v, 0, 0, 0, 0, 0]


def _rotate_matrix(angle: float, height: int, width: int) -> list[float]:
  """Pillow's Image.rotate(angle) matrix (counter-clockwise, about (w / 2, h / 2))."""
  rad = -math.radians(angle)
  a, b = round(math.cos(rad), 15), round(math.sin(rad), 15)
  d, e = round(-math.sin(rad), 15), round(math.cos(rad), 15)
  cx, cy = width / 2, height / 2
  return [a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy]


def apply_op(image: jax.Array, op: jax.Array, param: jax.Array, position: jax.Array) -> jax.Array:
  """One RandAugment op (index into OP_NAMES; `_NUM_OPS` = none) on one uint8 image."""
  return lax.switch(op, _SWITCH, image, param, position)


# ------------------------------------------------------------------------------ random draws


def example_keys(seed: int, step, global_indices: jax.Array) -> jax.Array:
  """Per-example keys fold_in(fold_in(key(seed), step), global index)."""
  base = jax.random.fold_in(jax.random.key(seed), step)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(global_indices)


def cutout_draws(key: jax.Array, height: int, width: int) -> dict[str, jax.Array]:
  """CutoutPIL's centre (yc, xc) and colour for one image (host: augment.cutout_pil)."""
  ky, kx, kc = jax.random.split(key, 3)
  return {
    'yc': jax.random.randint(ky, (), 0, height),
    'xc': jax.random.randint(kx, (), 0, width),
    'colour': jax.random.randint(kc, (3,), 0, 256),
  }


def cutout_pil(image: jax.Array, yc, xc, colour, factor: float = 0.5) -> jax.Array:
  """CutoutPIL on one image, given its draws: a rectangle of `factor` x the sides."""
  h, w = image.shape[:2]
  cut_h, cut_w = int(factor * h + 0.5), int(factor * w + 0.5)
  y1, y2 = jnp.clip(yc - cut_h // 2, 0, h), jnp.clip(yc + cut_h // 2, 0, h)
  x1, x2 = jnp.clip(xc - cut_w // 2, 0, w), jnp.clip(xc + cut_w // 2, 0, w)
  return _rectangle(image, x1, y1, x2, y2, colour)


def randaugment_draws(
  key: jax.Array, height: int, width: int, num_ops: int = 2
) -> dict[str, jax.Array]:
  """RandAugment's draws for one image, one row per op slot (host: augment.randaugment)."""

  def slot(k):
    k_op, k_mag, k_apply, k_sign, k_x, k_y = jax.random.split(k, 6)
    return {
      'op': jax.random.randint(k_op, (), 0, _NUM_OPS),
      'magnitude': jax.random.randint(k_mag, (), 1, host.NUM_MAGNITUDES),
      'apply': jax.random.uniform(k_apply) < 0.5,
      'negative': jax.random.uniform(k_sign) < 0.5,
      'position': jnp.stack(
        [jax.random.randint(k_x, (), 0, width), jax.random.randint(k_y, (), 0, height)]
      ),
    }

  return jax.vmap(slot)(jax.random.split(key, num_ops))


def affine_draws(
  key: jax.Array,
  height: int,
  width: int,
  *,
  degrees: float = 45.0,
  translate: float = 0.15,
  scale: tuple[float, float] = (0.85, 1.15),
) -> dict[str, jax.Array]:
  """RandomAffine's draws for one image (host: augment.random_affine)."""
  ka, kx, ky, ks = jax.random.split(key, 4)
  return {
    'angle': jax.random.uniform(ka, (), jnp.float32, -degrees, degrees),
    'translate': jnp.round(
      jnp.stack(
        [
          jax.random.uniform(kx, (), jnp.float32, -translate * width, translate * width),
          jax.random.uniform(ky, (), jnp.float32, -translate * height, translate * height),
        ]
      )
    ),
    'scale': jax.random.uniform(ks, (), jnp.float32, *scale),
  }


def affine(image: jax.Array, angle, translate, scale) -> jax.Array:
  """augment.affine on one image: rotate (clockwise on screen), scale, translate; nearest,
  fill 0."""
  h, w = image.shape[:2]
  cx, cy = w * 0.5, h * 0.5
  rad = jnp.deg2rad(angle)
  cos, sin = jnp.cos(rad) / scale, jnp.sin(rad) / scale
  ox, oy = -cx - translate[0], -cy - translate[1]
  matrix = jnp.stack([cos, sin, cos * ox + sin * oy + cx, -sin, cos, -sin * ox + cos * oy + cy])
  return _warp_nearest(image, matrix, np.zeros(3, np.uint8))


# ------------------------------------------------------------------------------ batches


def cutout(images: jax.Array, keys: jax.Array) -> jax.Array:
  """CutoutPIL(0.5) on a uint8 batch [N, H, W, 3], one key per image."""
  h, w = images.shape[1:3]
  draws = jax.vmap(lambda k: cutout_draws(k, h, w))(keys)
  return jax.vmap(cutout_pil)(images, draws['yc'], draws['xc'], draws['colour'])


def rand_augment(images: jax.Array, keys: jax.Array, *, per_image: bool = True) -> jax.Array:
  """RandAugment (two ops, each with probability 0.5) on a uint8 batch, one key per image.

  per_image=True: images go one at a time (lax.map) through a real switch, so each runs only
  the ops it drew (one on average); measured two orders of magnitude faster on the CPU (README
  'Augmentation on the device'). per_image=False: the same function under vmap, where the
  switch becomes "compute all 15 ops on the whole batch, select one": more arithmetic, but no
  sequential loop of small kernels and no control flow, which an accelerator may prefer.
  Same result either way; `python -m kmcl_jax.benchmarks.augment_device` times both.

  Args:
    images: uint8 [N, H, W, 3].
    keys: [N] typed keys.
    per_image: the strategy above.
  """
  h, w = images.shape[1:3]
  params = jnp.asarray(op_params(h, w))

  def one(image, key):
    draws = randaugment_draws(key, h, w)
    for i in range(draws['op'].shape[0]):
      op = jnp.where(draws['apply'][i], draws['op'][i], _NUM_OPS)
      param = params[draws['op'][i], draws['magnitude'][i], draws['negative'][i].astype(int)]
      image = apply_op(image, op, param, draws['position'][i])
    return image

  if not per_image:
    return jax.vmap(one)(images, keys)
  return lax.map(lambda a: one(*a), (images, keys))


def random_affine(images: jax.Array, keys: jax.Array) -> jax.Array:
  """The ChestX-ray14 RandomAffine on a uint8 batch, one key per image."""
  h, w = images.shape[1:3]
  draws = jax.vmap(lambda k: affine_draws(k, h, w))(keys)
  return jax.vmap(affine)(images, draws['angle'], draws['translate'], draws['scale'])


def augment_batch(
  images: jax.Array,
  *,
  kind: str,
  seed: int,
  step,
  global_indices: jax.Array,
  per_image: bool = True,
) -> jax.Array:
  """The host's train chain after the resize: CutoutPIL, then RandAugment or RandomAffine.

  Args:
    images: uint8 [N, S, S, 3], resized on the host.
    kind: 'randaugment' or 'affine' (dataset.augment; 'none' returns the batch unchanged).
    seed: the run's seed.
    step: the train step (a traced int is fine).
    global_indices: int [N], each row's index in the global batch.
    per_image: `rand_augment`'s strategy.
  """
  if kind not in host.AUGMENTS:
    raise ValueError(f'unknown augment {kind!r}; expected one of {host.AUGMENTS}')
  if kind == 'none':
    return images
  keys = example_keys(seed, step, global_indices)
  split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
  images = cutout(images, split[:, 0])
  if kind == 'randaugment':
    return rand_augment(images, split[:, 1], per_image=per_image)
  return random_affine(images, split[:, 1])


def sharded_augment(*, kind: str, seed: int, mesh: jax.sharding.Mesh, axis: str = 'data'):
  """`augment_batch` for a global batch sharded on `axis`: each device augments its own rows.

  Returns fn(images uint8 [N, S, S, 3], step) -> images, for use inside the jitted step; row r
  of the global batch gets global index r, whatever the mesh.
  """

  def local(images, step, indices):
    return augment_batch(images, kind=kind, seed=seed, step=step, global_indices=indices)

  mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(), P(axis)), out_specs=P(axis))

  def augment(images, step):
    return mapped(images, step, jnp.arange(images.shape[0], dtype=jnp.int32))

  return augment
