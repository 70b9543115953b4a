"""A procedurally generated multi-label dataset with designed label co-occurrence.

This is what `make demo` trains on: no files, every image a pure function of (seed, split,
index), cheap to render (well under a millisecond at 64 px), and learnable in minutes on a CPU
by a tiny TResNet, while still multi-label in the way that makes KMCL's label-correlation terms
matter.

Each image shows 1-4 labelled objects on a textured background. Class k is one shape drawn in
one colour (jittered in size, rotation and tint), so a class is identifiable from local
evidence. Free cells may hold unlabelled distractors: a class's colour on a different shape, so
colour alone does not identify a class and the network has to learn shapes too. Objects sit in
distinct cells of a 2x2 grid, so none is hidden by another. The background is a smooth random
colour field in muted tones plus pixel noise.

Label co-occurrence (the first ten classes; more classes are independent singles):
- group A = {0, 1}: present in 35% of images; when present both objects appear 80% of the time,
  otherwise one of them. So P(1 | 0) is high.
- group B = {2, 3, 4}: present in 30% of images, with two (60%) or all three (40%) members.
- exclusions: class 5 never appears with group A, class 6 never with group B.
- classes 5..K-1 are singles, each added with probability 0.2 while there is room (at most 4
  objects); an image with no object gets one single.

Splits 'train', 'val' and 'test' draw from disjoint random streams of the same distribution.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SPLITS = {'train': 0, 'val': 1, 'test': 2}
DEFAULT_NUM_EXAMPLES = {'train': 6000, 'val': 1000, 'test': 1000}

# (shape, RGB colour). Colours are far apart so that a tiny network separates classes early.
_CLASSES = (
  ('circle', (220, 40, 40)),
  ('square', (40, 180, 60)),
  ('triangle', (50, 80, 235)),
  ('cross', (235, 215, 40)),
  ('ring', (215, 50, 205)),
  ('diamond', (40, 205, 215)),
  ('bar', (245, 140, 25)),
  ('star', (245, 245, 245)),
  ('hexagon', (125, 50, 175)),
  ('frame', (15, 15, 15)),
)
_COLOUR_NAMES = (
  'red',
  'green',
  'blue',
  'yellow',
  'magenta',
  'cyan',
  'orange',
  'white',
  'purple',
  'black',
)
MAX_OBJECTS = 4
MIN_CLASSES = 7  # groups A and B, the two excluded classes 5 and 6
DISTRACTOR_PROB = 0.35  # per free cell
_GROUP_A = (0, 1)
_GROUP_B = (2, 3, 4)


def class_names(num_classes: int) -> tuple[str, ...]:
  """Names like 'red_circle'; beyond ten classes shapes repeat in new tints ('red_circle_2')."""
  names = []
  for k in range(num_classes):
    base = f'{_COLOUR_NAMES[k % 10]}_{_CLASSES[k % 10][0]}'
    names.append(base if k < 10 else f'{base}_{k // 10 + 1}')
  return tuple(names)


def _class_colour(k: int) -> np.ndarray:
  colour = np.array(_CLASSES[k % 10][1], np.float64)
  if k >= 10:  # a distinct tint per repetition, still one colour per class
    colour = np.roll(colour, k // 10) * 0.7 + 40
  return colour


def sample_classes(rng: np.random.Generator, num_classes: int) -> list[int]:
  """The set of classes in one image, following the co-occurrence design above."""
  present: list[int] = []
  if rng.random() < 0.35:
    present += list(_GROUP_A) if rng.random() < 0.8 else [int(rng.choice(_GROUP_A))]
  if rng.random() < 0.3:
    members = list(rng.permutation(_GROUP_B))
    take = 3 if rng.random() < 0.4 else 2
    present += [int(m) for m in members[: min(take, MAX_OBJECTS - len(present))]]
  singles = [
    k
    for k in range(5, num_classes)
    if not (k == 5 and any(c in _GROUP_A for c in present))
    and not (k == 6 and any(c in _GROUP_B for c in present))
  ]
  for k in rng.permutation(singles):
    if len(present) >= MAX_OBJECTS:
      break
    if rng.random() < 0.2:
      present.append(int(k))
  if not present:
    present.append(int(rng.choice(singles)))
  return present


def _polygon(
  cx: float, cy: float, r: float, n: int, angle: float, inner: float | None = None
) -> list[tuple[float, float]]:
  pts = []
  for i in range(n * (2 if inner else 1)):
    rad = r if (inner is None or i % 2 == 0) else inner
    a = angle + i * math.pi / (n if inner else n / 2)
    pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
  return pts


def _draw(
  draw: ImageDraw.ImageDraw,
  shape: str,
  cx: float,
  cy: float,
  r: float,
  angle: float,
  colour: tuple[int, int, int],
) -> None:
  w = max(1, round(r / 2.5))
  if shape == 'circle':
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
  elif shape == 'ring':
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=w)
  elif shape == 'square':
    draw.polygon(_polygon(cx, cy, r * 1.2, 4, angle + math.pi / 4), fill=colour)
  elif shape == 'frame':
    draw.polygon(_polygon(cx, cy, r * 1.25, 4, math.pi / 4), outline=colour, width=w)
  elif shape == 'diamond':
    draw.polygon(
      [(cx, cy - r * 1.2), (cx + r * 0.75, cy), (cx, cy + r * 1.2), (cx - r * 0.75, cy)],
      fill=colour,
    )
  elif shape == 'triangle':
    draw.polygon(_polygon(cx, cy, r * 1.15, 3, angle), fill=colour)
  elif shape == 'hexagon':
    draw.polygon(_polygon(cx, cy, r, 6, angle), fill=colour)
  elif shape == 'star':
    draw.polygon(_polygon(cx, cy, r * 1.2, 5, angle, inner=r * 0.5), fill=colour)
  elif shape == 'cross':
    draw.rectangle([cx - r, cy - w / 1.4, cx + r, cy + w / 1.4], fill=colour)
    draw.rectangle([cx - w / 1.4, cy - r, cx + w / 1.4, cy + r], fill=colour)
  elif shape == 'bar':
    draw.rectangle([cx - r * 1.1, cy - r * 0.35, cx + r * 1.1, cy + r * 0.35], fill=colour)
  else:
    raise AssertionError(shape)


def _distractors(
  rng: np.random.Generator, classes: list[int], num_classes: int
) -> list[tuple[str, np.ndarray]]:
  """Unlabelled objects for the free cells: a class's colour on another class's shape."""
  out = []
  for _ in range(MAX_OBJECTS - len(classes)):
    if rng.random() < DISTRACTOR_PROB:
      colour_of = int(rng.integers(min(num_classes, 10)))
      shape_of = (colour_of + int(rng.integers(1, 10))) % 10
      out.append((_CLASSES[shape_of][0], _class_colour(colour_of)))
  return out


def render(
  rng: np.random.Generator, classes: list[int], image_size: int, num_classes: int
) -> np.ndarray:
  """Draws the given classes, plus distractors, into one uint8 [S, S, 3] image."""
  s = image_size
  field = rng.integers(70, 170, size=(3, 3, 3), dtype=np.uint8)
  bg = Image.fromarray(field).resize((s, s), Image.BILINEAR)
  img = np.asarray(bg, np.int16) + rng.integers(-18, 19, size=(s, s, 3), dtype=np.int16)
  canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  cell = s / 2
  objects = [(_CLASSES[k % 10][0], _class_colour(k)) for k in classes]
  objects += _distractors(rng, classes, num_classes)
  for (shape, colour), slot in zip(objects, rng.permutation(4)):
    r = cell * rng.uniform(0.26, 0.38)
    margin = cell / 2 - r * 1.2
    cx = (slot % 2) * cell + cell / 2 + rng.uniform(-margin, margin)
    cy = (slot // 2) * cell + cell / 2 + rng.uniform(-margin, margin)
    tint = np.clip(colour + rng.uniform(-25, 25, 3), 0, 255)
    _draw(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), tuple(int(c) for c in tint))
  return np.asarray(canvas)


class SyntheticSource:
  """Random-access source of synthetic records, a pure function of (seed, split, index)."""

  def __init__(
    self,
    *,
    split: str,
    num_examples: int | None = None,
    image_size: int = 64,
    num_classes: int = 10,
    seed: int = 0,
  ):
    if split not in SPLITS:
      raise ValueError(f'synthetic: unknown split {split!r}; expected one of {tuple(SPLITS)}')
    self.split = split
    self.num_examples = DEFAULT_NUM_EXAMPLES[split] if num_examples is None else num_examples
    if self.num_examples <= 0:
      raise ValueError(f'synthetic: num_examples must be positive, got {self.num_examples}')
    if image_size < 16:
      raise ValueError(f'synthetic: image_size must be >= 16, got {image_size}')
    if num_classes < MIN_CLASSES:
      raise ValueError(
        f'synthetic: num_classes must be >= {MIN_CLASSES} for the designed '
        f'co-occurrence groups, got {num_classes}'
      )
    self.image_size = image_size
    self.num_classes = num_classes
    self.seed = seed
    self.class_names = class_names(num_classes)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'synthetic {self.split}: index {index} out of range')
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    classes = sample_classes(rng, self.num_classes)
    labels = np.zeros(self.num_classes, np.float32)
    labels[classes] = 1.0
    return {
      'image': render(rng, classes, self.image_size, self.num_classes),
      'labels': labels,
      'difficult': np.zeros(self.num_classes, bool),
      'id': f'synthetic-{self.split}-{index}',
    }

  def __repr__(self) -> str:
    return (
      f'SyntheticSource(split={self.split}, {self.num_examples} records, '
      f'K={self.num_classes}, {self.image_size}px, seed={self.seed})'
    )


def synthetic(
  *,
  root: str | None = None,
  split: str,
  num_examples: int | None = None,
  image_size: int = 64,
  num_classes: int = 10,
  seed: int = 0,
) -> SyntheticSource:
  """`get_source` entry point; reads nothing from disk (`root` is ignored).

  Options: `num_examples` (None: the split's default size, DEFAULT_NUM_EXAMPLES), `image_size`
  (square side in pixels, >= 16), `num_classes` (>= 7) and `seed`.
  """
  del root
  return SyntheticSource(
    split=split,
    num_examples=num_examples,
    image_size=image_size,
    num_classes=num_classes,
    seed=seed,
  )
