"""NIH ChestX-ray14 labels from Data_Entry_2017.csv and the official train/test lists.

Layout (NIH Clinical Center release, nihcc.app.box.com/v/ChestXray-NIHCC, or its Kaggle copy):

  root/Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv)   'Image Index', 'Finding Labels',
                                                            'Patient ID', ...
  root/train_val_list.txt, root/test_list.txt               one image name per line
  root/images/00000001_000.png ...                          or the 12 archive folders
  root/images_001/images/00000001_000.png ...               (images_001 .. images_012)

'Finding Labels' is split on '|'; 'No Finding' means all 14 labels 0. Grey PNGs are replicated
to 3 channels. Splits: 'train_val' and 'test' (the official lists), and 'train' / 'val' carved
from train_val by patient (a fixed-seed `val_fraction` of the patients, so no patient is in
both). All-negative ('No Finding') images are kept by default, as in the standard benchmark;
the authors' reader drops them and uses only the first 10% of each list, which
`keep_all_negative=False, fraction=0.1` reproduces.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from kmcl_jax.data.base import (
  FileSource,
  check_split,
  csv_rows,
  read_text,
  require_dir,
  require_file,
)

CLASS_NAMES = (
  'Atelectasis',
  'Cardiomegaly',
  'Effusion',
  'Infiltration',
  'Mass',
  'Nodule',
  'Pneumonia',
  'Pneumothorax',
  'Consolidation',
  'Edema',
  'Emphysema',
  'Fibrosis',
  'Pleural_Thickening',
  'Hernia',
)
NO_FINDING = 'No Finding'
CSV_NAMES = ('Data_Entry_2017.csv', 'Data_Entry_2017_v2020.csv')
LIST_FILES = {'train_val': 'train_val_list.txt', 'test': 'test_list.txt'}
SPLITS = ('train_val', 'test', 'train', 'val')
_COLUMNS = ('Image Index', 'Finding Labels', 'Patient ID')


def read_entries(path: str) -> dict[str, tuple[np.ndarray, str]]:
  """Image name -> (labels float32 [14], patient id) from the Data_Entry csv."""
  index = {name: k for k, name in enumerate(CLASS_NAMES)}
  entries = {}
  table = csv_rows(path)
  header = [h.strip() for h in (table[0] if table else [])]
  missing = [c for c in _COLUMNS if c not in header]
  if missing:
    raise ValueError(f'{path}: missing column(s) {missing}; expected {list(_COLUMNS)}')
  name_col, label_col, patient_col = (header.index(c) for c in _COLUMNS)
  width = max(name_col, label_col, patient_col) + 1
  for n, row in enumerate(table[1:], 2):
    if not any(cell.strip() for cell in row):
      continue
    if len(row) < width:
      raise ValueError(
        f'{path}:{n}: {len(row)} field(s), expected at least {width} to reach '
        f'the columns {list(_COLUMNS)}'
      )
    labels = np.zeros(len(CLASS_NAMES), np.float32)
    for finding in row[label_col].split('|'):
      finding = finding.strip()
      if finding == NO_FINDING:
        continue
      if finding not in index:
        raise ValueError(
          f'{path}:{n}: unknown finding {finding!r}; expected one of {CLASS_NAMES + (NO_FINDING,)}'
        )
      labels[index[finding]] = 1.0
    entries[row[name_col].strip()] = (labels, row[patient_col].strip())
  return entries


def index_images(root: str) -> dict[str, str]:
  """Image name -> path over root/images/ and root/images_*/images/ (both archive layouts)."""
  folders = [os.path.join(root, 'images')] + sorted(
    glob.glob(os.path.join(root, 'images_*', 'images'))
  )
  paths = {}
  for folder in folders:
    if os.path.isdir(folder):
      with os.scandir(folder) as it:
        for entry in it:
          paths.setdefault(entry.name, entry.path)
  if not paths:
    raise FileNotFoundError(
      f'ChestX-ray14: no images found in {root}/images/ or {root}/images_*/images/'
    )
  return paths


def _read_list(path: str) -> list[str]:
  text = read_text(require_file(path, 'ChestX-ray14 split list'))
  names = [line.strip() for line in text.splitlines() if line.strip()]
  if not names:
    raise ValueError(f'{path}: empty split list; expected one image name per line')
  return names


def patient_split(
  patients: list[str], *, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
  """Positions of train and val images, splitting the patients with a fixed seed."""
  unique = sorted(set(patients))
  rng = np.random.default_rng(seed)
  val_patients = set(rng.permutation(unique)[: round(val_fraction * len(unique))])
  val = [i for i, p in enumerate(patients) if p in val_patients]
  train = [i for i, p in enumerate(patients) if p not in val_patients]
  return train, val


def chestxray14(
  *,
  root: str,
  split: str,
  decode_size: int | None = None,
  keep_all_negative: bool = True,
  fraction: float | None = None,
  subset_size: int | None = None,
  subset_seed: int = 0,
  val_fraction: float = 0.1,
  split_seed: int = 0,
) -> FileSource:
  """ChestX-ray14 source (see module docstring); 14 classes in the standard order."""
  check_split('chestxray14', split, SPLITS)
  require_dir(root, 'ChestX-ray14 root')
  csv_path = next(
    (os.path.join(root, n) for n in CSV_NAMES if os.path.isfile(os.path.join(root, n))), None
  )
  if csv_path is None:
    raise FileNotFoundError(
      f'ChestX-ray14 label csv not found: expected {root}/{CSV_NAMES[0]} or {root}/{CSV_NAMES[1]}'
    )
  entries = read_entries(csv_path)
  list_path = os.path.join(root, LIST_FILES['test' if split == 'test' else 'train_val'])
  names = _read_list(list_path)
  unknown = [n for n in names if n not in entries]
  if unknown:
    raise ValueError(
      f'{list_path}: {len(unknown)} image(s) missing from {csv_path}, e.g. {unknown[0]!r}'
    )
  if split in ('train', 'val'):
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f'chestxray14: val_fraction must be in (0, 1), got {val_fraction}')
    train, val = patient_split(
      [entries[n][1] for n in names], val_fraction=val_fraction, seed=split_seed
    )
    names = [names[i] for i in (train if split == 'train' else val)]
  paths = index_images(root)
  absent = [n for n in names if n not in paths]
  if absent:
    raise FileNotFoundError(
      f'ChestX-ray14: {len(absent)} image(s) of {list_path} not found in '
      f'{root}/images/ or {root}/images_*/images/, e.g. {absent[0]!r}'
    )
  return FileSource(
    paths=[paths[n] for n in names],
    labels=np.stack([entries[n][0] for n in names]),
    difficult=None,
    ids=names,
    class_names=CLASS_NAMES,
    description=f'chestxray14 {split} at {root}',
    decode_size=decode_size,
    keep_all_negative=keep_all_negative,
    fraction=fraction,
    subset_size=subset_size,
    subset_seed=subset_seed,
  )
