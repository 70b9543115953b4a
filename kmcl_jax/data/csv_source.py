"""Your own dataset: image paths and labels in one csv file per split (`dataset.name='csv'`).

Layout (any folder; image paths in the csv are relative to `root`):

  root/train.csv, root/val.csv, root/test.csv   one file per split (option `csv_file`)
  root/images/0001.jpg ...                      wherever the `image` column points

The header decides between two forms:

- label names: an `image` column and a `labels` column holding the image's label names
  separated by spaces (the common Kaggle form; option `label_delimiter`), e.g.
  `images/0001.jpg,cat dog`. An empty `labels` cell is an image with no positive label. Other
  columns are ignored.
- one 0/1 column per class (no `labels` column): `image`, then one column per class, named by
  the class, holding 0 or 1.

Class names, in label order: the lines of `classes_file` when given (in the 0/1 form it names
the class columns; other columns are then ignored); else, in the 0/1 form, the column order;
else the sorted set of label names in every csv of `root` that matches `csv_file` for some
split and has `image` and `labels` columns, so that all splits share one class list even when a
rare class is missing from one of them.

Files may be saved by a spreadsheet: a UTF-8 byte-order mark, Windows line endings, blank lines
and spaces around cells are accepted; backslashes in image paths are read as '/'. Everything
else that does not fit (an unknown label with a classes file, a missing image file, a repeated
image, a row with more or fewer cells than the header, a 0/1 cell with another value, an empty
label set with `allow_empty=False`) stops with one error naming the file, the row as a
spreadsheet numbers it (the header is row 1) and the column.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence

import numpy as np

from kmcl_jax.data.base import (
  FileSource,
  csv_rows,
  read_text,
  require_dir,
  require_file,
)

IMAGE_COLUMN = 'image'
LABELS_COLUMN = 'labels'
_SHOWN_NAMES = 20  # class names listed in an 'unknown label' message
Rows = Sequence[tuple[int, list[str]]]  # (spreadsheet row number, stripped cells)


def _where(path: str, row: int, column: str | int | None = None) -> str:
  """'<file>, row <n>, column <name>': the place of a bad cell, as a spreadsheet shows it."""
  where = f'{path}, row {row}'
  if column is not None:
    where += f', column {column!r}' if isinstance(column, str) else f', column {column}'
  return where


def _listing(names: Sequence[str]) -> str:
  shown = ', '.join(names[:_SHOWN_NAMES])
  return shown + (f', ... ({len(names)} in all)' if len(names) > _SHOWN_NAMES else '')


def read_classes(path: str) -> tuple[str, ...]:
  """Class names from a text file, one per line (blank lines and surrounding spaces ignored)."""
  names: dict[str, int] = {}
  for n, line in enumerate(read_text(require_file(path, 'classes file')).splitlines(), 1):
    name = line.strip()
    if not name:
      continue
    if name in names:
      raise ValueError(f'{path}, line {n}: class {name!r} is already on line {names[name]}')
    names[name] = n
  if not names:
    raise ValueError(f'{path}: no class names; expected one class name per line')
  return tuple(names)


def split_labels(cell: str, delimiter: str) -> list[str]:
  """The label names of one `labels` cell; a blank delimiter splits on any run of whitespace."""
  parts = cell.split() if not delimiter.strip() else cell.split(delimiter)
  return [p.strip() for p in parts if p.strip()]


def _header(path: str, table: list[list[str]]) -> list[str]:
  """The stripped header of a csv table, checked for an `image` column and repeated names."""
  if not table:
    raise ValueError(
      f'{path}: empty file; expected a header row with an {IMAGE_COLUMN!r} column '
      f'and either a {LABELS_COLUMN!r} column or one 0/1 column per class'
    )
  header = [cell.strip() for cell in table[0]]
  if IMAGE_COLUMN not in header:
    raise ValueError(
      f'{_where(path, 1)}: no {IMAGE_COLUMN!r} column in the header {header}; '
      f'expected {IMAGE_COLUMN!r} and either {LABELS_COLUMN!r} (label names) or '
      'one 0/1 column per class'
    )
  for k, name in enumerate(header):
    if name and name in header[:k]:
      raise ValueError(f'{_where(path, 1, name)}: the column name appears twice in the header')
  return header


def _data_rows(
  path: str, table: list[list[str]], header: list[str]
) -> Iterator[tuple[int, list[str]]]:
  """(spreadsheet row number, stripped cells) of each non-blank data row, checked for width."""
  for n, row in enumerate(table[1:], 2):
    cells = [cell.strip() for cell in row]
    if not any(cells):
      continue
    if len(cells) > len(header) and any(cells[len(header) :]):
      raise ValueError(
        f'{_where(path, n, len(header) + 1)}: the row has {len(cells)} cells but the header '
        f'has {len(header)} ({", ".join(header)}); a cell that contains a comma must be in '
        'double quotes'
      )
    if len(cells) < len(header):
      raise ValueError(
        f'{_where(path, n, header[len(cells)] or len(cells) + 1)}: missing; the '
        f'row has {len(cells)} cell(s) but the header has {len(header)} '
        f'({", ".join(header)})'
      )
    yield n, cells[: len(header)]


def _scan_label_names(paths: Sequence[str], delimiter: str) -> tuple[str, ...]:
  """Sorted label names of every label-name csv among `paths` (others are skipped)."""
  names = set()
  for path in paths:
    table = csv_rows(path)
    header = [cell.strip() for cell in table[0]] if table else []
    if IMAGE_COLUMN not in header or LABELS_COLUMN not in header:
      continue
    col = header.index(LABELS_COLUMN)
    for row in table[1:]:
      if len(row) > col:
        names.update(split_labels(row[col], delimiter))
  return tuple(sorted(names))


def _labels_from_names(
  path: str,
  rows: Rows,
  col: int,
  class_names: tuple[str, ...],
  classes_file: str | None,
  delimiter: str,
) -> list[np.ndarray]:
  index = {name: k for k, name in enumerate(class_names)}
  labels = []
  for n, cells in rows:
    row_labels = np.zeros(len(class_names), np.float32)
    for name in split_labels(cells[col], delimiter):
      if name not in index:  # only possible with a classes file; a scan finds every name
        raise ValueError(
          f'{_where(path, n, LABELS_COLUMN)}: unknown label {name!r}; '
          f'{classes_file} lists {_listing(class_names)}'
        )
      row_labels[index[name]] = 1.0
    labels.append(row_labels)
  return labels


def _labels_from_columns(
  path: str, rows: Rows, header: list[str], class_names: tuple[str, ...]
) -> list[np.ndarray]:
  cols = [header.index(name) for name in class_names]
  labels = []
  for n, cells in rows:
    row_labels = np.zeros(len(class_names), np.float32)
    for k, col in enumerate(cols):
      try:
        value = float(cells[col])
      except ValueError:
        value = None
      if value not in (0.0, 1.0):
        raise ValueError(f'{_where(path, n, header[col])}: expected 0 or 1, got {cells[col]!r}')
      row_labels[k] = value
    labels.append(row_labels)
  return labels


def _class_columns(
  path: str, header: list[str], classes_file: str | None, class_names: tuple[str, ...] | None
) -> tuple[str, ...]:
  """Class columns of a 0/1 csv: those of the classes file, or every column but `image`."""
  if class_names is not None:
    missing = [name for name in class_names if name not in header]
    if missing:
      raise ValueError(
        f'{_where(path, 1)}: no column for class(es) {missing} of {classes_file} (header: {header})'
      )
    return class_names
  columns = [(k, name) for k, name in enumerate(header) if name != IMAGE_COLUMN]
  if not columns:
    raise ValueError(
      f'{_where(path, 1)}: only an {IMAGE_COLUMN!r} column; expected '
      f'{LABELS_COLUMN!r} (label names) or one 0/1 column per class'
    )
  for k, name in columns:
    if not name:
      raise ValueError(
        f'{_where(path, 1, k + 1)}: empty column name; in the 0/1 form every '
        'column after the image names a class'
      )
  return tuple(name for _, name in columns)


def csv_source(
  *,
  root: str,
  split: str,
  csv_file: str = '{split}.csv',
  classes_file: str | None = None,
  label_delimiter: str = ' ',
  allow_empty: bool = True,
  decode_size: int | None = None,
  keep_all_negative: bool = True,
  fraction: float | None = None,
  subset_size: int | None = None,
  subset_seed: int = 0,
) -> FileSource:
  """The split's records from `root`/`csv_file` (see the module docstring).

  Args:
    root: the dataset folder; csv files, the classes file and image paths are relative to it.
    split: any name; '{split}' in `csv_file` is replaced by it.
    csv_file: the split's csv file under root (default '<split>.csv').
    classes_file: optional text file under root with the class names, one per line; labels
      not in it are errors.
    label_delimiter: separates label names in the `labels` column (' ': any whitespace).
    allow_empty: False makes a row without any positive label an error.
    decode_size, keep_all_negative, fraction, subset_size, subset_seed: as for every source
      (see `base.FileSource`).
  """
  require_dir(root, 'csv dataset root')
  if not label_delimiter:
    raise ValueError(
      'dataset.options.label_delimiter is empty; use " " (any whitespace) or e.g. "|"'
    )
  path = os.path.join(root, csv_file.replace('{split}', split))
  pattern = os.path.join(
    glob.escape(root), '*'.join(glob.escape(part) for part in csv_file.split('{split}'))
  )
  if not os.path.isfile(path):
    found = sorted(os.path.relpath(p, root) for p in glob.glob(pattern))
    raise FileNotFoundError(
      f'csv dataset: no file for split {split!r}: expected {path} '
      f'(found {found or "no matching csv file"})'
    )
  table = csv_rows(path)
  header = _header(path, table)
  rows = list(_data_rows(path, table, header))
  if not rows:
    raise ValueError(f'{path}: no data rows after the header')
  classes_path = None if classes_file is None else os.path.join(root, classes_file)
  class_names = None if classes_path is None else read_classes(classes_path)
  if LABELS_COLUMN in header:
    if class_names is None:
      class_names = _scan_label_names(sorted({path, *glob.glob(pattern)}), label_delimiter)
      if not class_names:
        raise ValueError(
          f'{path}: no label names in the {LABELS_COLUMN!r} column of any file '
          f'matching {os.path.join(root, csv_file.replace("{split}", "*"))}; '
          'list the classes in a file named by dataset.options.classes_file'
        )
    labels = _labels_from_names(
      path, rows, header.index(LABELS_COLUMN), class_names, classes_path, label_delimiter
    )
  else:
    class_names = _class_columns(path, header, classes_path, class_names)
    labels = _labels_from_columns(path, rows, header, class_names)

  image_col = header.index(IMAGE_COLUMN)
  paths, ids, first_row = [], [], {}
  for (n, cells), row_labels in zip(rows, labels):
    name = cells[image_col].replace('\\', '/')
    if not name:
      raise ValueError(
        f'{_where(path, n, IMAGE_COLUMN)}: empty; expected an image path relative to {root}'
      )
    key = os.path.normpath(name)
    if key in first_row:
      raise ValueError(
        f'{_where(path, n, IMAGE_COLUMN)}: {name} is already in row '
        f'{first_row[key]} (each image once, with all its labels)'
      )
    first_row[key] = n
    image = os.path.join(root, name)
    if not os.path.isfile(image):
      problem = 'is a directory, not an image file' if os.path.isdir(image) else 'not found'
      raise FileNotFoundError(f'{_where(path, n, IMAGE_COLUMN)}: image file {image} {problem}')
    if not allow_empty and not row_labels.any():
      where = (
        _where(path, n, LABELS_COLUMN)
        if LABELS_COLUMN in header
        else f'{_where(path, n)}, columns {class_names[0]!r} to {class_names[-1]!r}'
      )
      raise ValueError(
        f'{where}: no label, and dataset.options.allow_empty=False (set it to '
        'True if images without any positive label are intended)'
      )
    paths.append(image)
    ids.append(name)
  return FileSource(
    paths=paths,
    labels=np.stack(labels),
    difficult=None,
    ids=ids,
    class_names=class_names,
    description=f'csv {split} at {path}',
    decode_size=decode_size,
    keep_all_negative=keep_all_negative,
    fraction=fraction,
    subset_size=subset_size,
    subset_seed=subset_seed,
  )
