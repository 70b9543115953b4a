"""Datasets and input pipelines (SPEC sections 5-6).

`get_source(name, root=..., split=..., **options)` returns a grain random-access source of
records {'image': uint8 [H, W, 3], 'labels': float32 [K], 'difficult': bool [K], 'id': str}
with a `class_names` tuple; `kmcl_jax.data.pipeline` turns a source into train and eval batches.

| name          | module        | splits                                     |
|---------------|---------------|--------------------------------------------|
| 'voc2007'     | voc.py        | trainval, test                             |
| 'coco2014'    | coco.py       | train, val                                 |
| 'adp'         | adp.py        | train, valid, test                         |
| 'chestxray14' | chestxray14.py| train_val, test, train, val                |
| 'tfds'        | tfds_source.py| whatever the prepared TFDS dataset has     |
| 'synthetic'   | synthetic.py  | train, val, test                           |

Options common to the file datasets: `keep_all_negative`, `fraction`, `subset_size` (with
`subset_seed`), and `decode_size` (JPEG DCT-scaled decoding, see base.py). Each builder's
docstring lists its own options.
"""

from __future__ import annotations

from collections.abc import Callable

from kmcl_jax.data import adp, chestxray14, coco, synthetic, tfds_source, voc
from kmcl_jax.data.base import UnreadableImageError, holdout_split

_BUILDERS: dict[str, Callable[..., object]] = {
    'voc2007': voc.voc2007,
    'coco2014': coco.coco2014,
    'adp': adp.adp,
    'chestxray14': chestxray14.chestxray14,
    'tfds': tfds_source.tfds_source,
    'synthetic': synthetic.synthetic,
}

SOURCES = tuple(_BUILDERS)


def get_source(name: str, *, root: str | None = None, split: str, **options):
  """Builds the named source (see the module table). `root` is ignored by 'synthetic'."""
  if name not in _BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {SOURCES}')
  if not root and name not in ('synthetic', 'tfds'):
    raise ValueError(f'Dataset {name!r} needs a root directory (got root={root!r})')
  return _BUILDERS[name](root=root, split=split, **options)


__all__ = ['get_source', 'holdout_split', 'SOURCES', 'UnreadableImageError']
