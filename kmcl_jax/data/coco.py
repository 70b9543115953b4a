"""MS-COCO 2014 image-level labels from the instances_*.json annotation files.

Layout (cocodataset.org: train2014.zip, val2014.zip, annotations_trainval2014.zip):

  root/annotations/instances_train2014.json, instances_val2014.json
  root/train2014/COCO_train2014_000000000009.jpg ...
  root/val2014/COCO_val2014_000000000042.jpg ...

An image is positive for every category of any of its annotations (crowd regions included, as
the authors). The 80 category ids (1..90, with gaps) map to 0..79 in increasing id order; class
names come from the json. By default only images with at least one annotation are kept
(82,081 train / 40,137 val), like the authors' loader. Records are in increasing image-id order,
so `subset_size` subsets do not depend on the json's ordering.

Option `subset_ids`: a text/csv file of image ids (one per line; floats such as '4.7e+05' are
accepted) to use instead of a random subset, e.g. the authors' COCO_Subset_<n>_Ids.csv.
"""

from __future__ import annotations

import json
import os

import numpy as np

from kmcl_jax.data.base import (
  FileSource,
  check_split,
  read_text,
  require_dir,
  require_file,
)

SPLITS = ('train', 'val')


def read_instances(path: str) -> tuple[list[dict], np.ndarray, tuple[str, ...]]:
  """(images sorted by id, labels float32 [N, K], class names) from an instances json."""
  with open(require_file(path, 'COCO annotation file'), 'rb') as f:
    raw = f.read()
  try:
    data = json.loads(raw)  # bytes: json detects the encoding and a byte-order mark
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e
  missing = [k for k in ('images', 'annotations', 'categories') if k not in data]
  if missing:
    raise ValueError(f'{path}: missing key(s) {missing}; expected a COCO instances file')
  categories = sorted(data['categories'], key=lambda c: c['id'])
  cat_index = {c['id']: k for k, c in enumerate(categories)}
  images = sorted(data['images'], key=lambda im: im['id'])
  row = {im['id']: n for n, im in enumerate(images)}
  labels = np.zeros((len(images), len(categories)), np.float32)
  for ann in data['annotations']:
    if ann['image_id'] not in row or ann['category_id'] not in cat_index:
      raise ValueError(
        f'{path}: annotation {ann.get("id")} refers to unknown image '
        f'{ann["image_id"]} or category {ann["category_id"]}'
      )
    labels[row[ann['image_id']], cat_index[ann['category_id']]] = 1.0
  return images, labels, tuple(c['name'] for c in categories)


def _read_id_file(path: str) -> list[int]:
  ids = []
  for n, line in enumerate(read_text(require_file(path, 'COCO subset id file')).splitlines(), 1):
    text = line.strip().split(',')[0].strip()
    if not text:
      continue
    try:
      ids.append(int(float(text)))
    except ValueError:
      raise ValueError(f'{path}:{n}: expected an image id, got {line.strip()!r}') from None
  return ids


def coco2014(
  *,
  root: str,
  split: str,
  decode_size: int | None = None,
  keep_all_negative: bool = False,
  fraction: float | None = None,
  subset_size: int | None = None,
  subset_seed: int = 0,
  subset_ids: str | None = None,
) -> FileSource:
  """COCO 2014 source; splits 'train' and 'val' (see module docstring for options)."""
  check_split('coco2014', split, SPLITS)
  require_dir(root, 'COCO 2014 root')
  ann_path = os.path.join(root, 'annotations', f'instances_{split}2014.json')
  image_dir = require_dir(os.path.join(root, f'{split}2014'), 'COCO image folder')
  images, labels, class_names = read_instances(ann_path)
  if subset_ids is not None:
    row = {im['id']: n for n, im in enumerate(images)}
    wanted = _read_id_file(subset_ids)
    unknown = [i for i in wanted if i not in row]
    if unknown:
      raise ValueError(f'{subset_ids}: {len(unknown)} id(s) not in {ann_path}, e.g. {unknown[0]}')
    images = [images[row[i]] for i in wanted]
    labels = labels[[row[i] for i in wanted]]
  return FileSource(
    paths=[os.path.join(image_dir, im['file_name']) for im in images],
    labels=labels,
    difficult=None,
    ids=[str(im['id']) for im in images],
    class_names=class_names,
    description=f'coco2014 {split} at {root}',
    decode_size=decode_size,
    keep_all_negative=keep_all_negative,
    fraction=fraction,
    subset_size=subset_size,
    subset_seed=subset_seed,
  )
