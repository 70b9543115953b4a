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

Batches stay uint8 until they are on the accelerator: `normalize` is a jnp function meant to run
inside the jitted step, so the host-to-device copy moves 1 byte per pixel instead of 4.

Eval (`eval_batches`). Records are dealt round-robin to processes (record r goes to process
r % shard_count), in file order, resized only. The last batch is padded with `mask=False`
examples and every process yields the same number of batches, so collectives in a multi-host
evaluation never wait on a process that ran out of data and metrics see each record once.

Unreadable images stop the pipeline with an error naming the file (also from inside a worker
process: grain re-raises it in the main process). With `skip_unreadable=True` such records are
dropped instead, counted, logged once per epoch, and readable with `skipped_count()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kmcl_jax.data import augment as augment_lib
from kmcl_jax.data.base import UnreadableImageError

# Per-dataset (mean, std) applied to images in [0, 1] (SPEC section 5). The ImageNet-pretrained
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


def normalize(images: jax.Array | np.ndarray, mean: Sequence[float], std: Sequence[float]
              ) -> jax.Array:
  """(images / 255 - mean) / std in float32, per channel (last axis).

  Written with jnp so that it runs on the accelerator inside the jitted train/eval step: the
  pipeline ships uint8 batches, and a uint8 host-to-device copy is 4x smaller than float32.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


_skip_lock = threading.Lock()
_skipped_total = 0


def skipped_count() -> int:
  """Records this process has dropped as unreadable (`skip_unreadable=True`) since start-up."""
  return _skipped_total


def _shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= index < count:
    raise ValueError(f'shard_index must be in [0, {count}), got {index}')
  return index, count


def _read_options(buffer: int) -> grain.ReadOptions:
  """`buffer` elements (batches, or records where batching happens later) read ahead."""
  return grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=buffer)


class _TrainTransform:
  """(stream position, record index) -> augmented example; picklable for grain workers."""

  def __init__(self, source, *, image_size: int, augment: str, seed: int,
               difficult_as_positive: bool, skip_unreadable: bool):
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
      except (UnreadableImageError, FileNotFoundError) as e:
        logging.warning('Skipping unreadable record: %s', e)
        return {'skipped': np.bool_(True), 'epoch': epoch}
    else:
      record = self.source[record_index]
    rng = np.random.default_rng([self.seed, position])
    image = augment_lib.train_augment(record['image'], rng, size=self.image_size,
                                      augment=self.augment)
    labels = np.asarray(record['labels'], np.float32)
    if self.difficult_as_positive:
      labels = np.maximum(labels, np.asarray(record['difficult'], np.float32))
    out = {'image': image, 'labels': labels}
    if self.skip_unreadable:
      out.update(skipped=np.bool_(False), epoch=epoch)
    return out


class _SkipFilter:
  """Main-process filter that drops skipped records, counts them and logs per epoch."""

  def __init__(self):
    self.epoch = None
    self.in_epoch = 0

  def __call__(self, element: Mapping[str, Any]) -> bool:
    global _skipped_total
    epoch = int(element['epoch'])
    if self.epoch is not None and epoch != self.epoch:
      logging.info('Input pipeline: epoch %d ended, %d unreadable records skipped on this '
                   'process (%d in total).', self.epoch, self.in_epoch, _skipped_total)
      self.in_epoch = 0
    self.epoch = epoch
    if bool(element['skipped']):
      with _skip_lock:
        _skipped_total += 1
      self.in_epoch += 1
      return False
    return True


def _strip(element: Mapping[str, Any]) -> dict[str, Any]:
  return {'image': element['image'], 'labels': element['labels']}


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

  Returns:
    A checkpointable grain iterator of {'image': uint8 [B, S, S, 3], 'labels': float32 [B, K]}.
  """
  shard_index, shard_count = _shards(shard_index, shard_count)
  if len(source) == 0:
    raise ValueError(f'train_iterator: the source {source!r} is empty')
  transform = _TrainTransform(source, image_size=image_size, augment=augment, seed=seed,
                              difficult_as_positive=difficult_as_positive,
                              skip_unreadable=skip_unreadable)
  # Records are read inside the transform, so that skip_unreadable can catch per record.
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  ds = ds.map_with_index(transform)[shard_index::shard_count]
  if not skip_unreadable:
    it = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_read_options(_READ_THREADS))
    if worker_count > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it)
  # Skipped records leave holes, so batches are formed after filtering, in this process.
  it = ds.to_iter_dataset(_read_options(2 * batch_size))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=batch_size))
  it = it.filter(_SkipFilter()).map(_strip).batch(batch_size, drop_remainder=True)
  return iter(it)


class _EvalRecord:
  """Position in the padded per-process sequence -> resized example or masked padding."""

  def __init__(self, source, *, image_size: int, shard_index: int, shard_count: int,
               num_classes: int):
    self.source = source
    self.image_size = image_size
    self.shard_index = shard_index
    self.shard_count = shard_count
    self.num_classes = num_classes

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    record_index = self.shard_index + position * self.shard_count
    if record_index >= len(self.source):
      k, s = self.num_classes, self.image_size
      return {'image': np.zeros((s, s, 3), np.uint8), 'labels': np.zeros(k, np.float32),
              'difficult': np.zeros(k, bool), 'mask': np.bool_(False)}
    record = self.source[record_index]
    image = np.asarray(augment_lib.resize(record['image'], self.image_size), np.uint8)
    return {'image': image, 'labels': np.asarray(record['labels'], np.float32),
            'difficult': np.asarray(record['difficult'], bool), 'mask': np.bool_(True)}


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
  fn = _EvalRecord(source, image_size=image_size, shard_index=shard_index,
                   shard_count=shard_count, num_classes=len(source.class_names))
  ds = grain.MapDataset.range(num_batches * batch_size).map(fn).batch(batch_size)
  it = ds.to_iter_dataset(_read_options(_READ_THREADS))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it
