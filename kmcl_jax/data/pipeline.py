"""grain input pipelines: an endless, resumable train stream and exact, padded eval batches.

Train (`train_iterator`). The sample order is a pure function of (seed, step):

  source -> global shuffle, new permutation each epoch (seed + epoch)
         -> augment record at stream position i with a Generator seeded by (seed, i)
         -> this process takes positions shard_index, shard_index + shard_count, ...
         -> batches of the per-process batch size

Shuffling the whole dataset before sharding means that the processes together see every
record exactly once per epoch, and a process sees different records in different epochs.
Because the batch is formed at the MapDataset level, a batch's content does not depend on the
number of worker processes, and the grain iterator state (a stream position) is enough to resume
the exact same batches after a restart (`get_state` / `set_state`, or orbax's grain handler).
With `to_device` and `device_prefetch`, a thread turns the next batches into device arrays
while the step runs; the state it reports stays that of the batches handed out.

Batches stay uint8 until they are on the accelerator: `normalize` is a jnp function meant to run
inside the jitted step, so the host-to-device copy moves 1 byte per pixel instead of 4.

Eval (`eval_batches`). Records are dealt round-robin to processes (record r goes to process
r % shard_count), in file order, resized only. The last batch is padded with `mask=False`
examples and every process yields the same number of batches, so collectives in a multi-host
evaluation never wait on a process that ran out of data and metrics see each record once.

Unreadable images. `preflight` checks, before training, that every image file of a split exists
and is not empty (a stat per file). While reading, an image that does not decode stops the
pipeline with an error naming the file (also from inside a worker process: grain re-raises it in
the main process). With `skip_unreadable=True` instead: `preflight` drops missing and empty
files from the split and counts them; the train stream drops records that do not decode, counts
them in its iterator state (`skipped_count(iterator)`, checkpointed with the iterator) and fails
within one epoch when an epoch holds less than one batch of readable records; an eval source
wrapped in `SkipUnreadable` turns them into masked-out records and counts them.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kmcl_jax.data import augment as augment_lib
from kmcl_jax.data.base import Subset, UnreadableImageError

# Per-dataset (mean, std) applied to images in [0, 1] (docs/datasets.md). The ImageNet-pretrained
# TResNet weights (timm 'tresnet_*.miil_*', ASL) were trained on raw [0, 1] inputs, i.e. 'none';
# the authors normalise anyway, so the choice is a config setting.
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
  'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  'adp': ((0.81233799, 0.64032477, 0.81902153), (0.18129702, 0.25731668, 0.16800649)),
  'chestxray14': ((0.50576189, 0.50576189, 0.50576189), (1.0, 1.0, 1.0)),
  'none': ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

# Threads per process (main or worker) that read and augment ahead of use. PIL and libjpeg
# release the GIL while decoding, resizing and warping, so a few threads overlap usefully.
_READ_THREADS = 4


def normalize(
  images: jax.Array | np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
  """(images / 255 - mean) / std in float32, per channel (last axis).

  Written with jnp so that it runs on the accelerator inside the jitted train/eval step: the
  pipeline ships uint8 batches, and a uint8 host-to-device copy is 4x smaller than float32.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


_SKIPPED_KEY = 'skipped_unreadable'
# What reading an image raises when the file is missing, empty, corrupt or not a file.
_UNREADABLE = (UnreadableImageError, OSError)


class InputError(ValueError):
  """A split cannot feed the run (unreadable images, too few readable ones); names the split."""


def image_paths(source) -> np.ndarray | None:
  """The image file of each record of a file-backed source (or a subset of one), else None."""
  if hasattr(source, 'paths'):
    return np.asarray(source.paths, dtype=object)
  inner, indices = getattr(source, '_source', None), getattr(source, '_indices', None)
  if inner is not None and indices is not None:  # data.base.Subset (holdout splits)
    paths = image_paths(inner)
    return None if paths is None else paths[indices]
  return None


def _problem(path: str) -> str | None:
  """Why `path` cannot be an image ('missing', 'empty', 'not a file'), or None."""
  try:
    info = os.stat(path)
  except FileNotFoundError:
    return 'missing'
  except OSError as e:
    return e.strerror or type(e).__name__
  if not stat.S_ISREG(info.st_mode):
    return 'not a file'
  return 'empty' if info.st_size == 0 else None


def preflight(source, *, split: str, skip_unreadable: bool):
  """Checks that every image file of `source` exists and is non-empty (one stat per file).

  Returns (source, number of records dropped): with `skip_unreadable`, the records whose file
  failed are dropped (a `data.base.Subset` of the others); otherwise any failure raises an
  `InputError` naming the split, the count and the first files. Sources without files
  (synthetic, TFDS) pass unchanged.
  """
  paths = image_paths(source)
  if paths is None:
    return source, 0
  problems = [_problem(p) for p in paths]
  bad = [i for i, p in enumerate(problems) if p]
  if not bad:
    return source, 0
  shown = ', '.join(f'{paths[i]} ({problems[i]})' for i in bad[:3])
  more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
  if not skip_unreadable:
    raise InputError(
      f'the {split} split has {len(bad)} unreadable image(s) of {len(paths)}: '
      f'{shown}{more}. Restore the files, or set dataset.skip_unreadable=True to '
      'skip and count them.'
    )
  if len(bad) == len(paths):
    raise InputError(
      f'the {split} split has no readable image ({len(bad)} of {len(paths)} '
      f'missing or empty, e.g. {shown}).'
    )
  logging.warning(
    'The %s split: skipping %d unreadable image(s) of %d: %s%s.',
    split,
    len(bad),
    len(paths),
    shown,
    more,
  )
  return Subset(source, np.setdiff1d(np.arange(len(paths)), bad)), len(bad)


class SkipUnreadable:
  """An eval source whose unreadable records come out masked (`unreadable`) and are counted.

  Counts in this process (evaluation reads with threads, not worker processes).
  """

  def __init__(self, source):
    self._source = source
    self.class_names = source.class_names
    self._bad: set[int] = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return self._source[index]
    except _UNREADABLE as e:
      with self._lock:
        if index not in self._bad:
          logging.warning('Skipping unreadable record: %s', e)
        self._bad.add(index)
      k = len(self.class_names)
      return {
        'image': np.zeros((1, 1, 3), np.uint8),
        'labels': np.zeros(k, np.float32),
        'difficult': np.zeros(k, bool),
        'id': '',
        'unreadable': True,
      }

  @property
  def skipped(self) -> int:
    """Distinct records of this source that failed to read so far."""
    return len(self._bad)

  def __repr__(self) -> str:
    return f'SkipUnreadable({self._source!r})'


def skipped_count(iterator) -> int:
  """Records a `train_iterator` with skip_unreadable has dropped on this process (checkpointed
  with the iterator state, so it counts across restarts); 0 without skip_unreadable."""
  state = iterator.get_state()
  return int(state.get(_SKIPPED_KEY, 0)) if isinstance(state, dict) else 0


def _shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= index < count:
    raise ValueError(f'shard_index must be in [0, {count}), got {index}')
  return index, count


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: Ctrl-C reaches the whole process group, workers included. The
  trainer handles it (checkpoint, then exit), so the workers must keep serving batches until
  the agreed stop step instead of dying with KeyboardInterrupt."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _workers(it: grain.IterDataset, options: grain.MultiprocessingOptions) -> grain.IterDataset:
  return it.mp_prefetch(options, worker_init_fn=_ignore_sigint)


def _out_of_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A copy of a batch that grain's workers delivered in shared memory.

  grain unlinks a segment from a background thread when its array dies. JAX's CPU backend
  aliases host arrays instead of copying them, which kept the last batches' segments alive
  until the end of the run and after that thread ('leaked shared_memory objects' at exit). One
  host copy (0.5 ms for 64 x 224 x 224 x 3 bytes) releases each segment at once.
  """
  return {k: np.array(v) for k, v in batch.items()}


def _read_options(buffer: int) -> grain.ReadOptions:
  """`buffer` elements (batches, or records where batching happens later) read ahead."""
  return grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=buffer)


class _TrainTransform:
  """(stream position, record index) -> augmented example; picklable for grain workers."""

  def __init__(
    self,
    source,
    *,
    image_size: int,
    augment: str,
    seed: int,
    difficult_as_positive: bool,
    skip_unreadable: bool,
  ):
    if augment not in augment_lib.AUGMENTS:
      raise ValueError(f'unknown augment {augment!r}; expected one of {augment_lib.AUGMENTS}')
    self.source = source
    self.image_size = image_size
    self.augment = augment
    self.seed = seed
    self.difficult_as_positive = difficult_as_positive
    self.skip_unreadable = skip_unreadable

  def __call__(self, position: int, record_index: int) -> dict[str, Any]:
    if self.skip_unreadable:
      epoch = np.int64(position // len(self.source))
      try:
        record = self.source[record_index]
      except _UNREADABLE as e:
        if epoch == 0:  # later epochs: the per-epoch count only (no line per record)
          logging.warning('Skipping unreadable record: %s', e)
        return {'skipped': np.bool_(True), 'epoch': epoch}
    else:
      record = self.source[record_index]
    rng = np.random.default_rng([self.seed, position])
    image = augment_lib.train_augment(
      record['image'], rng, size=self.image_size, augment=self.augment
    )
    labels = np.asarray(record['labels'], np.float32)
    if self.difficult_as_positive:
      labels = np.maximum(labels, np.asarray(record['difficult'], np.float32))
    out = {'image': image, 'labels': labels}
    if self.skip_unreadable:
      out.update(skipped=np.bool_(False), epoch=epoch)
    return out


class _SkipIterator(grain.DatasetIterator):
  """Drops skipped records (main process), counts them in its state, and ends a stream that
  cannot fill a batch: an epoch seen whole with fewer than `batch_size` readable records."""

  def __init__(self, parent, *, records_per_epoch: int, batch_size: int):
    super().__init__(parent)
    self._records_per_epoch = records_per_epoch
    self._batch_size = batch_size
    self._skipped = 0
    self._epoch, self._kept_in_epoch, self._skipped_in_epoch = None, 0, 0

  def _check_epoch(self) -> None:
    seen = self._kept_in_epoch + self._skipped_in_epoch
    if seen >= self._records_per_epoch and self._kept_in_epoch < self._batch_size:
      raise InputError(
        f'the train split has {self._kept_in_epoch} readable record(s) of {seen} per epoch on '
        f'this process; one batch needs {self._batch_size}. Restore the unreadable images '
        '(see the warnings above).'
      )

  def __next__(self) -> dict[str, Any]:
    while True:
      element = next(self._parent)
      epoch = int(element['epoch'])
      if epoch != self._epoch:
        if self._epoch is not None:
          self._check_epoch()
          logging.info(
            'Input pipeline: epoch %d ended, %d unreadable records skipped on this '
            'process (%d in total).',
            self._epoch,
            self._skipped_in_epoch,
            self._skipped,
          )
        self._epoch, self._kept_in_epoch, self._skipped_in_epoch = epoch, 0, 0
      if not bool(element['skipped']):
        self._kept_in_epoch += 1
        return {'image': element['image'], 'labels': element['labels']}
      self._skipped += 1
      self._skipped_in_epoch += 1
      self._check_epoch()  # an epoch of unreadable records fails here, not one epoch later

  def get_state(self) -> dict[str, Any]:
    return {'parent': self._parent.get_state(), _SKIPPED_KEY: self._skipped}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._skipped = int(state[_SKIPPED_KEY])
    self._epoch, self._kept_in_epoch, self._skipped_in_epoch = None, 0, 0


class _SkipDataset(grain.IterDataset):
  """`_SkipIterator` over a parent IterDataset."""

  def __init__(self, parent, **kwargs):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self) -> _SkipIterator:
    return _SkipIterator(self._parent.__iter__(), **self._kwargs)


def train_iterator(
  source,
  *,
  batch_size: int,
  image_size: int,
  augment: str,
  seed: int,
  difficult_as_positive: bool = True,
  worker_count: int = 0,
  shard_index: int | None = None,
  shard_count: int | None = None,
  skip_unreadable: bool = False,
  to_device: Callable[[dict[str, np.ndarray]], Any] | None = None,
  device_prefetch: int = 0,
) -> grain.DatasetIterator:
  """Endless stream of per-process train batches (see module docstring).

  Args:
    source: a random-access source from `kmcl_jax.data.get_source`.
    batch_size: per-process batch size B (global batch = B x shard_count).
    image_size: training square S.
    augment: 'randaugment', 'affine' (ChestX-ray14) or 'none' (resize only).
    seed: shuffle and augmentation seed, in [0, 2**32).
    difficult_as_positive: labels = max(labels, difficult), as the authors (VOC label >= 0).
    worker_count: grain worker processes (0: augment in this process with threads).
    shard_index, shard_count: this process's shard; default jax.process_index()/count().
    skip_unreadable: drop undecodable or missing images instead of raising.
    to_device: applied to each batch, e.g. to make global device arrays of it.
    device_prefetch: batches passed through `to_device` ahead of use, by a background thread,
      so that host work and the host-to-device copy overlap the train step (0: on demand).
      The iterator state stays that of the batches handed out, so a checkpoint resumes exactly.

  Returns:
    A checkpointable grain iterator of {'image': uint8 [B, S, S, 3], 'labels': float32 [B, K]}
    (as `to_device` returns them, when given).
  """
  shard_index, shard_count = _shards(shard_index, shard_count)
  if len(source) == 0:
    raise ValueError(f'train_iterator: the source {source!r} is empty')
  transform = _TrainTransform(
    source,
    image_size=image_size,
    augment=augment,
    seed=seed,
    difficult_as_positive=difficult_as_positive,
    skip_unreadable=skip_unreadable,
  )
  # Records are read inside the transform, so that skip_unreadable can catch per record.
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  ds = ds.map_with_index(transform)[shard_index::shard_count]
  if not skip_unreadable:
    it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_read_options(_READ_THREADS))
    if worker_count > 0:
      it = _workers(it, grain.MultiprocessingOptions(num_workers=worker_count))
  else:
    # Skipped records leave holes, so batches are formed after filtering, in this process.
    it = ds.to_iter_dataset(_read_options(2 * batch_size))
    if worker_count > 0:
      options = grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=batch_size
      )
      it = _workers(it, options)
    records_per_epoch = max(1, len(source) // shard_count)
    it = _SkipDataset(it, records_per_epoch=records_per_epoch, batch_size=batch_size)
    it = it.batch(batch_size, drop_remainder=True)
  if to_device is not None:
    if worker_count > 0:
      it = it.map(_out_of_shared_memory)
    it = it.map(to_device)
  if device_prefetch > 0:
    # grain's thread prefetch keeps, with each buffered batch, the state after it.
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=device_prefetch)
  return iter(it)


class _EvalRecord:
  """Position in the padded per-process sequence -> resized example or masked padding (also
  for a record `SkipUnreadable` marks unreadable)."""

  def __init__(
    self, source, *, image_size: int, shard_index: int, shard_count: int, num_classes: int
  ):
    self.source = source
    self.image_size = image_size
    self.shard_index = shard_index
    self.shard_count = shard_count
    self.num_classes = num_classes

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    record_index = self.shard_index + position * self.shard_count
    record = self.source[record_index] if record_index < len(self.source) else None
    if record is None or record.get('unreadable'):
      k, s = self.num_classes, self.image_size
      return {
        'image': np.zeros((s, s, 3), np.uint8),
        'labels': np.zeros(k, np.float32),
        'difficult': np.zeros(k, bool),
        'mask': np.bool_(False),
      }
    image = np.asarray(augment_lib.resize(record['image'], self.image_size), np.uint8)
    return {
      'image': image,
      'labels': np.asarray(record['labels'], np.float32),
      'difficult': np.asarray(record['difficult'], bool),
      'mask': np.bool_(True),
    }


def eval_batches(
  source,
  *,
  batch_size: int,
  image_size: int,
  shard_index: int | None = None,
  shard_count: int | None = None,
  worker_count: int = 0,
) -> Iterable[dict[str, np.ndarray]]:
  """Deterministic, padded eval batches for this process (see module docstring).

  Returns:
    A re-iterable of {'image': uint8 [B, S, S, 3], 'labels': float32 [B, K],
    'difficult': bool [B, K], 'mask': bool [B]}; the same number of batches on every process,
    ceil(ceil(N / shard_count) / B).
  """
  shard_index, shard_count = _shards(shard_index, shard_count)
  n = len(source)
  if n == 0:
    raise ValueError(f'eval_batches: the source {source!r} is empty')
  per_process = -(-n // shard_count)
  num_batches = -(-per_process // batch_size)
  fn = _EvalRecord(
    source,
    image_size=image_size,
    shard_index=shard_index,
    shard_count=shard_count,
    num_classes=len(source.class_names),
  )
  ds = grain.MapDataset.range(num_batches * batch_size).map(fn).batch(batch_size)
  it = ds.to_iter_dataset(_read_options(_READ_THREADS))
  if worker_count > 0:
    it = _workers(it, grain.MultiprocessingOptions(num_workers=worker_count))
  return it
