"""ADP (Atlas of Digital Pathology) V1.0 labels from the release's flat csv and split files.

Layout (the 'ADP V1.0 Release', obtained from the ADP authors on request):

  root/ADP_EncodedLabels_Release1_Flat.csv   'Patch Names', then one 0/1 column per class
  root/splits/{train,valid,test}.npy        row indices (0-based, data rows) into the csv
  root/img_res_1um_bicubic/<patch name>     the image patches

`root` may also be the folder that contains 'ADP V1.0 Release/'. The hierarchy level picks the
class columns (option `level`): L1 (9 classes, the paper's setting), L2 (26), L3 (33) or L3Only
(22 leaf classes). Rows without any positive at that level are dropped by default, as the
authors do.
"""

from __future__ import annotations

import os

import numpy as np

from kmcl_jax.data.base import (
  FileSource,
  check_split,
  csv_rows,
  require_dir,
  require_file,
)

CSV_NAME = 'ADP_EncodedLabels_Release1_Flat.csv'
RELEASE_DIR = 'ADP V1.0 Release'
IMAGE_DIR = 'img_res_1um_bicubic'
SPLITS = ('train', 'valid', 'test')

_L1 = ('E', 'C', 'H', 'S', 'A', 'M', 'N', 'G', 'T')
LEVELS: dict[str, tuple[str, ...]] = {
  'L1': _L1,
  'L2': (
    'E',
    'E.M',
    'E.T',
    'C',
    'C.D',
    'C.L',
    'H',
    'H.E',
    'H.K',
    'H.Y',
    'S',
    'S.M',
    'S.C',
    'S.R',
    'A',
    'A.W',
    'A.M',
    'M',
    'N',
    'N.P',
    'N.R',
    'N.G',
    'G',
    'G.O',
    'G.N',
    'T',
  ),
  'L3': (
    'E',
    'E.M',
    'E.M.S',
    'E.M.C',
    'E.T',
    'E.T.S',
    'E.T.C',
    'C',
    'C.D',
    'C.D.I',
    'C.D.R',
    'C.L',
    'H',
    'H.E',
    'H.K',
    'H.Y',
    'S',
    'S.M',
    'S.C',
    'S.R',
    'A',
    'A.W',
    'A.M',
    'M',
    'N',
    'N.P',
    'N.R',
    'N.G',
    'N.G.M',
    'G',
    'G.O',
    'G.N',
    'T',
  ),
  'L3Only': (
    'E.M.S',
    'E.M.C',
    'E.T.S',
    'E.T.C',
    'C.D.I',
    'C.D.R',
    'C.L',
    'H.E',
    'H.K',
    'H.Y',
    'S.M',
    'S.C',
    'S.R',
    'A.W',
    'A.M',
    'M',
    'N.P',
    'N.R',
    'N.G.M',
    'G.O',
    'G.N',
    'T',
  ),
}
NAME_COLUMN = 'Patch Names'


def find_release_dir(root: str) -> str:
  """`root`, or `root`/'ADP V1.0 Release' when the release folder is inside it."""
  require_dir(root, 'ADP root')
  nested = os.path.join(root, RELEASE_DIR)
  return nested if os.path.isdir(nested) else root


def read_csv(path: str, columns: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
  """Patch names and float32 [rows, len(columns)] 0/1 labels of every data row."""
  table = csv_rows(require_file(path, 'ADP label csv'))
  if not table:
    raise ValueError(f'{path}: empty file; expected a header starting with {NAME_COLUMN!r}')
  header = [h.strip() for h in table[0]]
  missing = [c for c in (NAME_COLUMN,) + columns if c not in header]
  if missing:
    raise ValueError(
      f'{path}: missing column(s) {missing}; expected {NAME_COLUMN!r} and the '
      f'class columns {list(columns)}'
    )
  name_col = header.index(NAME_COLUMN)
  cols = [header.index(c) for c in columns]
  names, rows = [], []
  for n, row in enumerate(table[1:], 2):
    if not any(cell.strip() for cell in row):
      continue  # blank line (pandas, which wrote the split indices, skips them too)
    try:
      values = [float(row[c]) for c in cols]
    except (ValueError, IndexError):
      raise ValueError(f'{path}:{n}: expected 0/1 in the class columns, got {row}') from None
    if any(v not in (0.0, 1.0) for v in values):
      raise ValueError(f'{path}:{n}: label values must be 0 or 1, got {values}')
    names.append(row[name_col].strip())
    rows.append(values)
  return names, np.asarray(rows, np.float32).reshape(len(rows), len(columns))


def adp(
  *,
  root: str,
  split: str,
  level: str = 'L1',
  decode_size: int | None = None,
  keep_all_negative: bool = False,
  fraction: float | None = None,
  subset_size: int | None = None,
  subset_seed: int = 0,
) -> FileSource:
  """ADP source; splits 'train', 'valid', 'test'; `level` in LEVELS."""
  check_split('adp', split, SPLITS)
  if level not in LEVELS:
    raise ValueError(f'adp: unknown level {level!r}; expected one of {tuple(LEVELS)}')
  base = find_release_dir(root)
  columns = LEVELS[level]
  names, labels = read_csv(os.path.join(base, CSV_NAME), columns)
  split_path = require_file(os.path.join(base, 'splits', f'{split}.npy'), 'ADP split file')
  try:
    rows = np.load(split_path)
  except (ValueError, OSError) as e:
    raise ValueError(f'{split_path}: not a numpy .npy file of row indices ({e})') from e
  if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(
      f'{split_path}: expected a 1-D integer array of csv row indices, got '
      f'{rows.dtype} {rows.shape}'
    )
  if len(rows) and (rows.min() < 0 or rows.max() >= len(names)):
    raise ValueError(
      f"{split_path}: row index {int(rows.max())} outside the csv's {len(names)} data rows"
    )
  image_dir = require_dir(os.path.join(base, IMAGE_DIR), 'ADP image folder')
  return FileSource(
    paths=[os.path.join(image_dir, names[r]) for r in rows],
    labels=labels[rows],
    difficult=None,
    ids=[names[r] for r in rows],
    class_names=columns,
    description=f'adp {level} {split} at {base}',
    decode_size=decode_size,
    keep_all_negative=keep_all_negative,
    fraction=fraction,
    subset_size=subset_size,
    subset_seed=subset_seed,
  )
