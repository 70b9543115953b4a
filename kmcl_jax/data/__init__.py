"""Datasets and input pipelines (docs/datasets.md).

`get_source(name, root=..., split=..., **options)` returns a grain random-access source of
records {'image': uint8 [H, W, 3], 'labels': float32 [K], 'difficult': bool [K], 'id': str}
with a `class_names` tuple; `kmcl_jax.data.pipeline` turns a source into train and eval batches.

| name          | module        | splits                                     |
|---------------|---------------|--------------------------------------------|
| 'voc2007'     | voc.py        | trainval, test                             |
| 'coco2014'    | coco.py       | train, val                                 |
| 'adp'         | adp.py        | train, valid, test                         |
| 'chestxray14' | chestxray14.py| train_val, test, train, val                |
| 'csv'         | csv_source.py | any: root/<split>.csv                      |
| 'tfds'        | tfds_source.py| whatever the prepared TFDS dataset has     |
| 'synthetic'   | synthetic.py  | train, val, test                           |

Options common to the file datasets: `keep_all_negative`, `fraction`, `subset_size` (with
`subset_seed`), and `decode_size` (JPEG DCT-scaled decoding, see base.py). Each builder's
docstring lists its own options. The options a dataset accepts are its builder's keyword
arguments other than `root` and `split` (`accepted_options`); anything else is refused with a
message naming `dataset.options.<key>` (`options_error`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from kmcl_jax.data import (
  adp,
  chestxray14,
  coco,
  csv_source,
  synthetic,
  tfds_source,
  voc,
)
from kmcl_jax.data.base import FileSource, UnreadableImageError, holdout_split
from kmcl_jax.data.synthetic import SyntheticSource
from kmcl_jax.data.tfds_source import TfdsSource

Source = FileSource | SyntheticSource | TfdsSource
_BUILDERS: dict[str, Callable[..., Source]] = {
  'voc2007': voc.voc2007,
  'coco2014': coco.coco2014,
  'adp': adp.adp,
  'chestxray14': chestxray14.chestxray14,
  'csv': csv_source.csv_source,
  'tfds': tfds_source.tfds_source,
  'synthetic': synthetic.synthetic,
}

SOURCES = tuple(_BUILDERS)


def _builder(name: str) -> Callable[..., Source]:
  if name not in _BUILDERS:
    raise ValueError(f'Unknown dataset {name!r}; expected one of {SOURCES}')
  return _BUILDERS[name]


def accepted_options(name: str) -> dict[str, Any]:
  """The options dataset `name` accepts and their defaults, from its builder's signature.

  A required option (tfds's `dataset`) has the default `inspect.Parameter.empty`.
  """
  parameters = inspect.signature(_builder(name)).parameters
  return {key: p.default for key, p in parameters.items() if key not in ('root', 'split')}


def options_error(name: str, options: Mapping[str, Any]) -> str | None:
  """One message naming each `dataset.options.<key>` that dataset `name` does not accept, with
  what it accepts, or each required one that is missing; None when the options fit."""
  defaults = accepted_options(name)
  accepted = sorted(defaults)
  unknown = [key for key in options if key not in defaults]
  if not unknown:
    missing = [
      key
      for key, default in defaults.items()
      if default is inspect.Parameter.empty and key not in options
    ]
    if missing:
      return (
        f'{", ".join(f"dataset.options.{key}" for key in missing)}: required by dataset '
        f'{name!r} (see kmcl_jax/data/{_BUILDERS[name].__module__.rsplit(".", 1)[-1]}.py)'
      )
    return None
  named = []
  for key in unknown:
    close = difflib.get_close_matches(key, accepted, n=1)
    named.append(f'dataset.options.{key}' + (f' (did you mean {close[0]!r}?)' if close else ''))
  what = 'not an option' if len(named) == 1 else 'not options'
  return (
    f'{", ".join(named)}: {what} of dataset {name!r}, which accepts '
    f'{", ".join(accepted) or "no options"}'
  )


def get_source(name: str, *, root: str | None = None, split: str, **options: Any) -> Source:
  """Builds the named source (see the module table). `root` is ignored by 'synthetic'.

  Raises:
    ValueError: unknown dataset, missing root or an option the dataset does not accept.
  """
  builder = _builder(name)
  problem = options_error(name, options)
  if problem:
    raise ValueError(problem)
  if not root and name not in ('synthetic', 'tfds'):
    raise ValueError(f'Dataset {name!r} needs a root directory (got root={root!r})')
  return builder(root=root, split=split, **options)


__all__ = [
  'SOURCES',
  'Source',
  'UnreadableImageError',
  'accepted_options',
  'get_source',
  'holdout_split',
  'options_error',
]
