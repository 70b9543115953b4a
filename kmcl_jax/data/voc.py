"""PASCAL VOC 2007 classification labels from the devkit's ImageSets/Main files.

Layout (the official VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar, extracted into
the same `root`):

  root/VOCdevkit/VOC2007/JPEGImages/000005.jpg ...
  root/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test,train,val}.txt      image ids
  root/VOCdevkit/VOC2007/ImageSets/Main/<class>_<split>.txt  '<id> <v>', v in {1, -1, 0}

v = 1 positive, -1 negative, 0 'difficult' (only difficult objects of that class): label 0 with
difficult True. Training counts difficult as positive by default (the authors' label >= 0, see
`pipeline.train_iterator(difficult_as_positive=...)`); evaluation ignores difficult entries.
`root` may also point at VOCdevkit/ or VOCdevkit/VOC2007/ itself.
"""

from __future__ import annotations

import os

import numpy as np

from kmcl_jax.data.base import (
  FileSource,
  check_split,
  read_text,
  require_dir,
  require_file,
)

CLASS_NAMES = (
  'aeroplane',
  'bicycle',
  'bird',
  'boat',
  'bottle',
  'bus',
  'car',
  'cat',
  'chair',
  'cow',
  'diningtable',
  'dog',
  'horse',
  'motorbike',
  'person',
  'pottedplant',
  'sheep',
  'sofa',
  'train',
  'tvmonitor',
)
SPLITS = ('trainval', 'test', 'train', 'val')


def find_voc_dir(root: str) -> str:
  """The VOC2007 directory under `root` (root, root/VOC2007 or root/VOCdevkit/VOC2007)."""
  require_dir(root, 'VOC 2007 root')
  for candidate in (
    os.path.join(root, 'VOCdevkit', 'VOC2007'),
    os.path.join(root, 'VOC2007'),
    root,
  ):
    if os.path.isdir(os.path.join(candidate, 'ImageSets', 'Main')):
      return candidate
  raise FileNotFoundError(
    f'VOC 2007 not found under {root}: expected {root}/VOCdevkit/VOC2007/ImageSets/Main and '
    f'{root}/VOCdevkit/VOC2007/JPEGImages'
  )


def _read_ids(path: str) -> list[str]:
  return [line.split()[0] for line in read_text(path).splitlines() if line.strip()]


def _read_class_file(path: str) -> dict[str, int]:
  values = {}
  for n, line in enumerate(read_text(path).splitlines(), 1):
    parts = line.split()
    if not parts:
      continue
    if len(parts) != 2 or parts[1] not in ('1', '-1', '0'):
      raise ValueError(f'{path}:{n}: expected "<image id> <1|-1|0>", got {line.strip()!r}')
    values[parts[0]] = int(parts[1])
  return values


def read_labels(voc_dir: str, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Image ids in split-file order, labels float32 [N, 20] and difficult bool [N, 20]."""
  main = os.path.join(voc_dir, 'ImageSets', 'Main')
  ids = _read_ids(require_file(os.path.join(main, f'{split}.txt'), f'VOC split list {split!r}'))
  if not ids:
    raise ValueError(f'VOC split list {os.path.join(main, split + ".txt")} is empty')
  raw = np.zeros((len(ids), len(CLASS_NAMES)), np.int8)
  for k, name in enumerate(CLASS_NAMES):
    path = require_file(os.path.join(main, f'{name}_{split}.txt'), 'VOC class label file')
    values = _read_class_file(path)
    missing = [i for i in ids if i not in values]
    if missing:
      raise ValueError(
        f'{path}: no label for {len(missing)} image(s) of {split}.txt, e.g. {missing[0]!r}'
      )
    raw[:, k] = [values[i] for i in ids]
  return ids, (raw == 1).astype(np.float32), raw == 0


def voc2007(
  *,
  root: str,
  split: str,
  decode_size: int | None = None,
  keep_all_negative: bool = True,
  fraction: float | None = None,
  subset_size: int | None = None,
  subset_seed: int = 0,
) -> FileSource:
  """VOC 2007 source; splits 'trainval' (5,011) and 'test' (4,952), also 'train' and 'val'."""
  check_split('voc2007', split, SPLITS)
  voc_dir = find_voc_dir(root)
  image_dir = require_dir(os.path.join(voc_dir, 'JPEGImages'), 'VOC image folder')
  ids, labels, difficult = read_labels(voc_dir, split)
  return FileSource(
    paths=[os.path.join(image_dir, f'{i}.jpg') for i in ids],
    labels=labels,
    difficult=difficult,
    ids=ids,
    class_names=CLASS_NAMES,
    description=f'voc2007 {split} at {voc_dir}',
    decode_size=decode_size,
    keep_all_negative=keep_all_negative,
    fraction=fraction,
    subset_size=subset_size,
    subset_seed=subset_seed,
  )
