"""Training augmentations of the authors' recipe (docs/training.md), on PIL images.

All randomness comes from an explicit `np.random.Generator`, which the pipeline derives from
(seed, position in the sample stream); a resumed iterator therefore redraws exactly the same
augmentations. Ops work on PIL images because PIL's C kernels are the fastest CPU option for
affine warps and enhancements at these sizes, and because they match the authors' ops.

Train chain per image (see `pipeline.train_iterator`):
  'randaugment': resize to S x S (bilinear) -> CutoutPIL(0.5) -> RandAugment
  'affine'     : resize to S x S (bilinear) -> CutoutPIL(0.5) -> RandomAffine (ChestX-ray14)

CutoutPIL(0.5): one rectangle of half the image's height and width, centred at a uniform
random pixel and clipped at the borders, filled with one uniform random RGB colour.

RandAugment as PyPI `randaugment` 1.0.2, which the authors use (their package is unusable with
today's numpy). Per image: draw two (op, magnitude) pairs independently and uniformly from the
15 ops below x magnitudes 1..9, then apply each pair with probability 0.5, in the order drawn.
Magnitude m picks element m of a 10-level table:

| op           | table                         | how                                          |
|--------------|-------------------------------|----------------------------------------------|
| ShearX/Y     | linspace(0, 0.3)              | random sign; bicubic; fill (128, 128, 128)   |
| TranslateX/Y | linspace(0, 150/331) * side   | random sign; fill (128, 128, 128)            |
| Rotate       | linspace(0, 30) degrees       | counter-clockwise; fill (128, 128, 128)      |
| Color, Contrast, Sharpness, Brightness | linspace(0, 0.9) | enhance(1 + v * random sign)       |
| Posterize    | round(linspace(8, 4)) bits    |                                              |
| Solarize     | linspace(256, 0) threshold    |                                              |
| AutoContrast, Equalize, Invert | (no magnitude) |                                              |
| Cutout       | round(linspace(0, 20)) px     | square, centre uniform, fill (125, 122, 113) |

So an image receives 0, 1 or 2 ops (expected 1); at most magnitude 9 (table maximum). Note the
fixed-pixel Cutout side (<= 20 px) becomes relatively smaller at 448 px, as in the original.

RandomAffine (ChestX-ray14, torchvision RandomAffine(45, translate=(0.15, 0.15),
scale=(0.85, 1.15)) with its defaults): angle ~ U(-45, 45) degrees, translation ~ round(U(-0.15,
0.15) * side) per axis, scale ~ U(0.85, 1.15), no shear, about the image centre, nearest
neighbour, fill 0.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

AFFINE_FILL = (128, 128, 128)
CUTOUT_FILL = (125, 122, 113)
NUM_MAGNITUDES = 10  # table length; magnitudes 1..9 are drawn


def resize(image: np.ndarray | Image.Image, size: int) -> Image.Image:
  """Resize to size x size with bilinear filtering (torchvision Resize((s, s)) on PIL)."""
  img = image if isinstance(image, Image.Image) else Image.fromarray(image)
  if img.size == (size, size):
    return img
  return img.resize((size, size), Image.BILINEAR)


def cutout_pil(img: Image.Image, rng: np.random.Generator, factor: float = 0.5) -> Image.Image:
  """CutoutPIL: a random-colour rectangle of `factor` x the image sides (see module doc)."""
  w, h = img.size
  cut_h, cut_w = int(factor * h + 0.5), int(factor * w + 0.5)
  yc, xc = int(rng.integers(h)), int(rng.integers(w))
  y1, y2 = np.clip([yc - cut_h // 2, yc + cut_h // 2], 0, h)
  x1, x2 = np.clip([xc - cut_w // 2, xc + cut_w // 2], 0, w)
  colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
  img = img.copy()
  ImageDraw.Draw(img).rectangle([int(x1), int(y1), int(x2), int(y2)], fill=colour)
  return img


def _sign(rng: np.random.Generator) -> float:
  return 1.0 if rng.random() < 0.5 else -1.0


def _shear_x(img, v, rng):
  return img.transform(
    img.size, Image.AFFINE, (1, v * _sign(rng), 0, 0, 1, 0), Image.BICUBIC, fillcolor=AFFINE_FILL
  )


def _shear_y(img, v, rng):
  return img.transform(
    img.size, Image.AFFINE, (1, 0, 0, v * _sign(rng), 1, 0), Image.BICUBIC, fillcolor=AFFINE_FILL
  )


def _translate_x(img, v, rng):
  return img.transform(
    img.size, Image.AFFINE, (1, 0, v * img.size[0] * _sign(rng), 0, 1, 0), fillcolor=AFFINE_FILL
  )


def _translate_y(img, v, rng):
  return img.transform(
    img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1] * _sign(rng)), fillcolor=AFFINE_FILL
  )


def _rotate(img, v, rng):
  del rng
  return img.rotate(v, fillcolor=AFFINE_FILL)


def _enhancer(cls):
  def op(img, v, rng):
    return cls(img).enhance(1.0 + v * _sign(rng))

  return op


def _posterize(img, v, rng):
  del rng
  return ImageOps.posterize(img, int(v))


def _solarize(img, v, rng):
  del rng
  return ImageOps.solarize(img, v)


def _autocontrast(img, v, rng):
  del v, rng
  return ImageOps.autocontrast(img)


def _equalize(img, v, rng):
  del v, rng
  return ImageOps.equalize(img)


def _invert(img, v, rng):
  del v, rng
  return ImageOps.invert(img)


def _cutout(img, v, rng):
  side = int(v)
  if side <= 0:
    return img
  w, h = img.size
  x0, y0 = int(rng.integers(w)), int(rng.integers(h))
  x1, y1 = max(0, x0 - side // 2), max(0, y0 - side // 2)
  img = img.copy()
  ImageDraw.Draw(img).rectangle([x1, y1, min(w, x1 + side), min(h, y1 + side)], fill=CUTOUT_FILL)
  return img


def _levels(start: float, stop: float) -> np.ndarray:
  return np.linspace(start, stop, NUM_MAGNITUDES)


_ZERO = np.zeros(NUM_MAGNITUDES)

# name -> (op, magnitude table); order as in the module docstring.
RANDAUGMENT_OPS = {
  'ShearX': (_shear_x, _levels(0, 0.3)),
  'ShearY': (_shear_y, _levels(0, 0.3)),
  'TranslateX': (_translate_x, _levels(0, 150 / 331)),
  'TranslateY': (_translate_y, _levels(0, 150 / 331)),
  'Rotate': (_rotate, _levels(0, 30)),
  'Color': (_enhancer(ImageEnhance.Color), _levels(0, 0.9)),
  'Posterize': (_posterize, np.round(_levels(8, 4)).astype(int)),
  'Solarize': (_solarize, _levels(256, 0)),
  'Contrast': (_enhancer(ImageEnhance.Contrast), _levels(0, 0.9)),
  'Sharpness': (_enhancer(ImageEnhance.Sharpness), _levels(0, 0.9)),
  'Brightness': (_enhancer(ImageEnhance.Brightness), _levels(0, 0.9)),
  'AutoContrast': (_autocontrast, _ZERO),
  'Equalize': (_equalize, _ZERO),
  'Invert': (_invert, _ZERO),
  'Cutout': (_cutout, np.round(_levels(0, 20)).astype(int)),
}
_OP_NAMES = tuple(RANDAUGMENT_OPS)


def apply_op(img: Image.Image, name: str, magnitude: int, rng: np.random.Generator) -> Image.Image:
  """Applies one RandAugment op at integer magnitude 0..9 (table element `magnitude`)."""
  op, table = RANDAUGMENT_OPS[name]
  return op(img, table[magnitude], rng)


def randaugment(
  img: Image.Image, rng: np.random.Generator, num_ops: int = 2, prob: float = 0.5
) -> Image.Image:
  """RandAugment as in the module docstring: `num_ops` draws, each applied with `prob`."""
  for _ in range(num_ops):
    name = _OP_NAMES[int(rng.integers(len(_OP_NAMES)))]
    magnitude = int(rng.integers(1, NUM_MAGNITUDES))
    if rng.random() < prob:
      img = apply_op(img, name, magnitude, rng)
  return img


def affine(
  img: Image.Image, *, angle: float, translate: tuple[float, float], scale: float
) -> Image.Image:
  """Rotates by `angle` degrees (clockwise on screen, as torchvision's affine), scales and
  translates (pixels) about the image centre; nearest neighbour, fill 0."""
  w, h = img.size
  cx, cy = w * 0.5, h * 0.5
  # PIL maps each output pixel back to its input: in = C + R(-angle) (out - C - t) / scale.
  rad = math.radians(angle)
  cos, sin = math.cos(rad) / scale, math.sin(rad) / scale
  ox, oy = -cx - translate[0], -cy - translate[1]
  matrix = (cos, sin, cos * ox + sin * oy + cx, -sin, cos, -sin * ox + cos * oy + cy)
  return img.transform(img.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=(0, 0, 0))


def random_affine(
  img: Image.Image,
  rng: np.random.Generator,
  *,
  degrees: float = 45.0,
  translate: float = 0.15,
  scale: tuple[float, float] = (0.85, 1.15),
) -> Image.Image:
  """torchvision-style RandomAffine without shear (parameters as in the module docstring)."""
  w, h = img.size
  angle = rng.uniform(-degrees, degrees)
  tx = float(round(rng.uniform(-translate * w, translate * w)))
  ty = float(round(rng.uniform(-translate * h, translate * h)))
  return affine(img, angle=angle, translate=(tx, ty), scale=rng.uniform(*scale))


AUGMENTS = ('randaugment', 'affine', 'none')


def train_augment(
  image: np.ndarray, rng: np.random.Generator, *, size: int, augment: str
) -> np.ndarray:
  """The full train-time chain for one decoded image; returns uint8 [size, size, 3]."""
  if augment not in AUGMENTS:
    raise ValueError(f'unknown augment {augment!r}; expected one of {AUGMENTS}')
  img = resize(image, size)
  if augment == 'randaugment':
    img = randaugment(cutout_pil(img, rng), rng)
  elif augment == 'affine':
    img = random_affine(cutout_pil(img, rng), rng)
  out = np.asarray(img, dtype=np.uint8)
  return out if out.ndim == 3 else np.repeat(out[:, :, None], 3, axis=2)
