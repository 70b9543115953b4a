"""What every file-backed source shares: image decoding, record selection, input checks.

A source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose records are

  {'image': uint8 [H, W, 3], 'labels': float32 [K] (1 = positive),
   'difficult': bool [K], 'id': str}

Sources parse their annotation files once, in the constructor, into flat numpy arrays (paths,
labels, difficult flags). Records are decoded lazily in `__getitem__`, which runs inside grain
workers, so a source holds only picklable, cheap-to-copy state.

Decoding. JPEGs are decoded by libjpeg-turbo through simplejpeg. With a `decode_size` hint the
decoder applies DCT scaling (n/8 of the full resolution, n = 1..8) and returns the smallest
scale whose height and width are both >= `decode_size`: a 640x480 COCO image needed at 224 px
decodes at 320x240, which is several times faster than a full decode followed by a resize. The
pipeline resizes to the training square afterwards, so the hint never changes the output size,
only the interpolation source (like PIL's `draft` mode). Files simplejpeg cannot handle (PNG,
CMYK JPEG) go through PIL. Every decode forces the full image to load, so truncated files fail
here with the file's name rather than later as a silent grey block.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import simplejpeg
from grain.sources import RandomAccessDataSource
from PIL import Image, UnidentifiedImageError

_JPEG_MAGIC = b'\xff\xd8'


class UnreadableImageError(ValueError):
  """An image file exists but cannot be decoded (corrupt, truncated, unknown format)."""


def decode_image(path: str, *, decode_size: int | None = None) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3] RGB (grey and palette images are expanded).

  Args:
    path: image file.
    decode_size: optional hint; JPEGs are decoded at the smallest DCT scale whose sides are
      both >= decode_size (never upscaled). Other formats ignore it.

  Raises:
    FileNotFoundError: the file does not exist.
    UnreadableImageError: anything at `path` that is not a complete, decodable image (a
      directory, an empty, truncated or corrupt file, an unknown format, no read permission).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f'Image file not found: {path}') from None
  except IsADirectoryError:
    raise UnreadableImageError(
      f'Cannot read image {path}: it is a directory, not an image file'
    ) from None
  except OSError as e:  # permissions, I/O errors: skip_unreadable may skip these too
    raise UnreadableImageError(f'Cannot read image {path}: {e.strerror or e}') from e
  if data[:2] == _JPEG_MAGIC:
    try:
      size = decode_size or 0
      return simplejpeg.decode_jpeg(data, colorspace='RGB', min_height=size, min_width=size)
    except ValueError:
      pass  # CMYK/YCCK or a damaged file: PIL decides which, and names the error.
  try:
    with Image.open(io.BytesIO(data)) as img:
      if decode_size and img.format == 'JPEG':
        img.draft('RGB', (decode_size, decode_size))
      img.load()
      if img.mode in ('I;16', 'I;16B', 'I'):
        # 16-bit grey (some medical PNGs): scale the image's maximum to 255 instead of letting
        # convert('RGB') clip everything above 255.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.round(arr * (255.0 / max(float(arr.max()), 1.0))).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
      return np.asarray(img.convert('RGB'))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    reason = (
      'not a known image format, or its header is damaged'
      if isinstance(e, UnidentifiedImageError)
      else f'{type(e).__name__}: {e}'
    )
    raise UnreadableImageError(
      f'Cannot decode image {path}: {reason} (expected a complete JPEG or PNG file)'
    ) from e


def read_text(path: str) -> str:
  """A UTF-8 text file's contents, without a byte-order mark, line endings as written.

  Spreadsheets write a BOM and CRLF line endings; the csv module reads CRLF itself (give it
  `io.StringIO(text, newline='')`) and `str.splitlines` drops both kinds of ending.

  Raises:
    ValueError: the file is not UTF-8 (naming the file and line).
  """
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise ValueError(
      f'{path}: line {line} is not UTF-8 text (byte {data[e.start]:#04x}); save '
      'the file with UTF-8 encoding (e.g. "CSV UTF-8" in a spreadsheet)'
    ) from None


def csv_rows(path: str) -> list[list[str]]:
  """The rows of a UTF-8 csv file (see `read_text`), cells as written (not stripped)."""
  reader = csv.reader(io.StringIO(read_text(path), newline=''))
  try:
    return list(reader)
  except csv.Error as e:  # e.g. a NUL byte: not a text file
    raise ValueError(f'{path}: line {reader.line_num}: not a valid csv file ({e})') from None


def require_dir(path: str, what: str) -> str:
  """`path` if it is a directory, else FileNotFoundError naming `what` and the path."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{what} not found: expected a directory at {path}')
  return path


def require_file(path: str, what: str) -> str:
  """`path` if it is a file, else FileNotFoundError naming `what` and the path."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} not found: expected a file at {path}')
  return path


def check_split(dataset: str, split: str, splits: Sequence[str]) -> None:
  """ValueError naming the dataset and its splits unless `split` is one of them."""
  if split not in splits:
    raise ValueError(f'{dataset}: unknown split {split!r}; expected one of {tuple(splits)}')


def select(
  labels: np.ndarray,
  difficult: np.ndarray,
  *,
  keep_all_negative: bool,
  fraction: float | None,
  subset_size: int | None,
  subset_seed: int,
  description: str,
) -> np.ndarray:
  """Indices kept by the options common to all sources, applied in this order.

  1. keep_all_negative=False drops records with no positive and no difficult label.
  2. fraction keeps the first int(fraction * n) records in file order (the authors'
     ChestX-ray14 reader trains and tests on the first 10% of each list).
  3. subset_size keeps a fixed-seed random subset of that many records, in file order (the
     'COCOSub' experiments of paper Fig. 6 use 1k-40k training images).

  Raises ValueError (naming `description`) when nothing is left or an option is out of range.
  """
  idx = np.arange(len(labels))
  if not keep_all_negative:
    idx = idx[(labels[idx] > 0).any(axis=1) | difficult[idx].any(axis=1)]
  if fraction is not None:
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f'{description}: fraction must be in (0, 1], got {fraction}')
    idx = idx[: int(fraction * len(idx))]
  if subset_size is not None:
    if subset_size <= 0 or subset_size > len(idx):
      raise ValueError(
        f'{description}: subset_size={subset_size} but the split has {len(idx)} records'
      )
    chosen = np.random.default_rng(subset_seed).choice(len(idx), subset_size, replace=False)
    idx = idx[np.sort(chosen)]
  if len(idx) == 0:
    raise ValueError(
      f'{description}: the split is empty after selection '
      f'(keep_all_negative={keep_all_negative}, fraction={fraction})'
    )
  return idx


class FileSource:
  """Random-access source over image files with precomputed labels (see module docstring).

  Attributes:
    class_names: K class names, in label order.
    paths, labels, difficult, ids: per-record arrays after selection.
  """

  def __init__(
    self,
    *,
    paths: Sequence[str],
    labels: np.ndarray,
    difficult: np.ndarray | None,
    ids: Sequence[str],
    class_names: Sequence[str],
    description: str,
    decode_size: int | None = None,
    keep_all_negative: bool = True,
    fraction: float | None = None,
    subset_size: int | None = None,
    subset_seed: int = 0,
  ):
    labels = np.asarray(labels, np.float32)
    if difficult is None:
      difficult = np.zeros(labels.shape, bool)
    keep = select(
      labels,
      np.asarray(difficult, bool),
      keep_all_negative=keep_all_negative,
      fraction=fraction,
      subset_size=subset_size,
      subset_seed=subset_seed,
      description=description,
    )
    self.paths = np.asarray(paths, dtype=object)[keep]
    self.ids = np.asarray(ids, dtype=object)[keep]
    self.labels = labels[keep]
    self.difficult = np.asarray(difficult, bool)[keep]
    self.class_names = tuple(class_names)
    self.decode_size = decode_size
    self.description = description

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
    return {
      'image': decode_image(self.paths[index], decode_size=self.decode_size),
      'labels': self.labels[index].copy(),
      'difficult': self.difficult[index].copy(),
      'id': str(self.ids[index]),
    }

  def __repr__(self) -> str:
    return (
      f'{type(self).__name__}({self.description}, {len(self)} records, K={len(self.class_names)})'
    )


class Subset:
  """The records of `source` at `indices`, in that order, with the source's class names."""

  def __init__(self, source: RandomAccessDataSource, indices: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    self.class_names = source.class_names

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self._indices[index])]

  def __repr__(self) -> str:
    return f'Subset({self._source!r}, {len(self)} records)'


def holdout_split(
  source: RandomAccessDataSource, fraction: float, *, seed: int
) -> tuple[Subset, Subset]:
  """(rest, held out): a seeded random `fraction` of `source` set aside for model selection,
  for datasets without a validation split (VOC, COCO). Both keep the source's order."""
  if not 0 < fraction < 1:
    raise ValueError(f'holdout fraction must be in (0, 1), got {fraction}')
  if len(source) < 2:
    raise ValueError(f'cannot hold out part of {source!r}: it has {len(source)} record(s)')
  order = np.random.default_rng(seed).permutation(len(source))
  n_held = min(len(source) - 1, max(1, round(fraction * len(source))))
  return Subset(source, np.sort(order[n_held:])), Subset(source, np.sort(order[:n_held]))
