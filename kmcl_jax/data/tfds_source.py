"""Prepared TFDS datasets read through `tfds.data_source` (array_record files, no TensorFlow).

`root` is the TFDS data_dir (default ~/tensorflow_datasets) holding a dataset prepared with
`file_format='array_record'`, e.g. `tfds build voc/2007 --file_format=array_record`. The option
`dataset` names it ('voc/2007', 'coco/2014' or any dataset with 'image' and 'labels' features).

Mappers turn TFDS examples into this package's records:
- 'voc/2007': split 'trainval' reads TFDS 'train+validation' (TFDS 'train' is VOC train only);
  labels = classes of non-difficult objects ('labels_no_difficult'), difficult = classes that
  occur only as difficult objects ('labels' minus 'labels_no_difficult'), as in the devkit files.
- 'coco/2014': split 'val' reads TFDS 'validation'; labels = classes of 'objects/label'. TFDS
  keeps images without annotations; they are dropped by default (keep_all_negative=False), which
  needs one pass over the labels at construction (images are not decoded during that pass).
- anything else: 'labels' as a class index or a sequence of class indices.

TFDS decodes the images itself (PIL or OpenCV), so the `decode_size` hint does not apply here.
Some TFDS builders import TensorFlow in their code (coco does); when that fails the dataset is
opened from its prepared directory (`tfds.builder_from_directory`), which needs no TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kmcl_jax.data.base import select

# Our split names -> TFDS split expressions, per dataset (others pass through unchanged).
_SPLIT_NAMES = {
  'voc/2007': {'trainval': 'train+validation', 'val': 'validation'},
  'coco/2014': {'val': 'validation'},
}
_SCAN_CHUNK = 1024


def _multi_hot(indices: Any, num_classes: int) -> np.ndarray:
  out = np.zeros(num_classes, np.float32)
  out[np.asarray(indices, np.int64).reshape(-1)] = 1.0
  return out


def map_voc(example: dict[str, Any], num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
  """(labels, difficult, id) of a TFDS voc/2007 example."""
  present = _multi_hot(example['labels'], num_classes)
  labels = _multi_hot(example['labels_no_difficult'], num_classes)
  return labels, (present > 0) & (labels == 0), str(example['image/filename'])


def map_coco(example: dict[str, Any], num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
  """(labels, difficult, id) of a TFDS coco/2014 example."""
  labels = _multi_hot(example['objects']['label'], num_classes)
  return labels, np.zeros(num_classes, bool), str(example['image/id'])


def map_generic(example: dict[str, Any], num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
  """(labels, difficult, id) of an example with a 'labels' class-index feature."""
  labels = _multi_hot(example['labels'], num_classes)
  name = example.get('image/filename', example.get('id', ''))
  return labels, np.zeros(num_classes, bool), str(name)


MAPPERS: dict[str, Callable[[dict[str, Any], int], tuple[np.ndarray, np.ndarray, str]]] = {
  'voc/2007': map_voc,
  'coco/2014': map_coco,
}
# Whether a dataset drops all-negative examples by default.
_DROP_NEGATIVE_BY_DEFAULT = {'coco/2014': True}


def class_names_of(dataset: str, features: Mapping[str, Any]) -> tuple[str, ...]:
  """Class names from the TFDS feature spec of `dataset`."""
  if dataset == 'coco/2014':
    return tuple(features['objects']['label'].names)
  labels = features['labels']
  return tuple(getattr(labels, 'feature', labels).names)


class TfdsSource:
  """Random-access source over a TFDS data source and a mapper (see module docstring)."""

  def __init__(
    self,
    data_source: Sequence[dict[str, Any]],
    *,
    dataset: str,
    class_names: Sequence[str],
    description: str,
    keep_all_negative: bool,
    fraction: float | None = None,
    subset_size: int | None = None,
    subset_seed: int = 0,
    scan_source: Sequence[dict[str, Any]] | None = None,
  ):
    self.data_source = data_source
    self.dataset = dataset
    self.mapper = MAPPERS.get(dataset, map_generic)
    self.class_names = tuple(class_names)
    self.description = description
    k, n = len(self.class_names), len(data_source)
    if n == 0:
      raise ValueError(f'{description}: the split is empty')
    if keep_all_negative:
      # Selection by position needs no labels; avoid reading the whole split.
      labels, difficult = np.ones((n, 1), np.float32), np.zeros((n, 1), bool)
    else:
      labels, difficult = self._scan(scan_source if scan_source is not None else data_source, k)
    self.indices = select(
      labels,
      difficult,
      keep_all_negative=keep_all_negative,
      fraction=fraction,
      subset_size=subset_size,
      subset_seed=subset_seed,
      description=description,
    )

  def _scan(self, source: Sequence[dict[str, Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((len(source), k), np.float32)
    difficult = np.zeros((len(source), k), bool)
    for start in range(0, len(source), _SCAN_CHUNK):
      keys = list(range(start, min(start + _SCAN_CHUNK, len(source))))
      getitems = getattr(source, '__getitems__', None)
      examples = getitems(keys) if getitems else [source[i] for i in keys]
      for i, example in zip(keys, examples):
        labels[i], difficult[i], _ = self.mapper(example, k)
    return labels, difficult

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self.data_source[int(self.indices[index])]
    labels, difficult, name = self.mapper(example, len(self.class_names))
    image = np.asarray(example['image'], np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    return {'image': image, 'labels': labels, 'difficult': difficult, 'id': name}

  def __repr__(self) -> str:
    return f'TfdsSource({self.description}, {len(self)} records, K={len(self.class_names)})'


def _open(dataset: str, split: str, root: str | None, decoders=None):
  """tfds.data_source, falling back to the prepared directory when the builder needs TF."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

  try:
    return tfds.data_source(dataset, split=split, data_dir=root, download=False, decoders=decoders)
  except ModuleNotFoundError as e:
    if 'tensorflow' not in str(e):
      raise
    data_dir = os.path.expanduser(root or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
    base = os.path.join(data_dir, *dataset.split('/'))
    versions = sorted(os.listdir(base)) if os.path.isdir(base) else []
    if not versions:
      raise FileNotFoundError(
        f'TFDS dataset {dataset} not prepared: expected {base}/<version>/ '
        f'(run `tfds build {dataset} --file_format=array_record`)'
      ) from e
    builder = tfds.builder_from_directory(os.path.join(base, versions[-1]))
    return builder.as_data_source(split=split, decoders=decoders)


def tfds_source(
  *,
  root: str | None,
  split: str,
  dataset: str,
  keep_all_negative: bool | None = None,
  fraction: float | None = None,
  subset_size: int | None = None,
  subset_seed: int = 0,
  decode_size: int | None = None,
) -> TfdsSource:
  """TFDS source; `split` in this package's names (trainval/test, train/val) or TFDS's.

  `decode_size` is accepted like every source does and ignored: TFDS decodes the images.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  del decode_size
  tfds_split = _SPLIT_NAMES.get(dataset, {}).get(split, split)
  if keep_all_negative is None:
    keep_all_negative = not _DROP_NEGATIVE_BY_DEFAULT.get(dataset, False)
  data_source = _open(dataset, tfds_split, root)
  scan = (
    None
    if keep_all_negative
    else _open(dataset, tfds_split, root, decoders={'image': tfds.decode.SkipDecoding()})
  )
  return TfdsSource(
    data_source,
    dataset=dataset,
    class_names=class_names_of(dataset, data_source.dataset_info.features),
    description=f'tfds {dataset} {tfds_split} in {root or "the default data_dir"}',
    keep_all_negative=keep_all_negative,
    fraction=fraction,
    subset_size=subset_size,
    subset_seed=subset_seed,
    scan_source=scan,
  )
