"""Train/eval pipelines: determinism, sharding, resume, padding, workers, unreadable images."""

import os
import subprocess
import sys
import time

import data_fixtures as fx
import jax
import numpy as np
import pytest
import run_helpers

from kmcl_jax.data import UnreadableImageError, get_source, pipeline


class _Tagged:
  """A source whose image encodes the record index (pixel [0, 0, 0..1] = index // 256, % 256)."""

  class_names = ('a', 'b', 'c')

  def __init__(self, n, size=12):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.full((self.size, self.size, 3), 7, np.uint8)
    image[..., 0], image[..., 1] = i // 256, i % 256
    labels = np.array([i % 2, (i // 2) % 2, 0], np.float32)
    difficult = np.array([False, False, i % 3 == 0])
    return {'image': image, 'labels': labels, 'difficult': difficult, 'id': str(i)}


def _index(batch):
  return batch['image'][:, 0, 0, 0].astype(int) * 256 + batch['image'][:, 0, 0, 1]


def _train(source, **kw):
  args = dict(batch_size=4, image_size=12, augment='none', seed=5, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.train_iterator(source, **args)


def test_epochs_cover_dataset_and_reshuffle():
  src = _Tagged(20)
  it = _train(src)
  seen = np.concatenate([_index(next(it)) for _ in range(10)])  # two epochs of 20
  assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
  assert list(seen[:20]) != list(seen[20:])  # a new permutation each epoch
  assert list(seen[:20]) != list(range(20))
  other = np.concatenate([_index(next(_train(src, seed=6))) for _ in range(1)])
  assert list(other) != list(seen[:4])


def test_labels_and_difficult_policy():
  src = _Tagged(12)
  for as_positive in (True, False):
    batch = next(_train(src, difficult_as_positive=as_positive))
    for i, labels in zip(_index(batch), batch['labels']):
      ref = src[i]['labels'].copy()
      if as_positive:
        ref[2] = float(i % 3 == 0)
      np.testing.assert_array_equal(labels, ref)
    assert set(batch) == {'image', 'labels'} and batch['labels'].dtype == np.float32


def test_same_seed_same_batches_with_augmentation():
  src = get_source('synthetic', split='train', num_examples=40, image_size=32)
  a = _train(src, augment='randaugment', image_size=32)
  b = _train(src, augment='randaugment', image_size=32)
  for _ in range(12):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['labels'], y['labels'])
    assert x['image'].shape == (4, 32, 32, 3) and x['image'].dtype == np.uint8


def test_shards_disjoint_and_cover_each_epoch():
  src = _Tagged(24)
  per_shard = [
    np.concatenate([_index(next(_train(src, shard_index=s, shard_count=3, batch_size=8)))])
    for s in range(3)
  ]
  assert all(len(p) == 8 for p in per_shard)
  union = np.concatenate(per_shard)
  assert sorted(union) == list(range(24))  # disjoint and covering the first epoch


def test_resume_from_state_gives_identical_batches():
  src = get_source('synthetic', split='train', num_examples=30, image_size=32)
  kw = dict(augment='randaugment', image_size=32, batch_size=4)
  it = _train(src, **kw)
  for _ in range(9):  # crosses an epoch boundary (30 records = 7.5 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = _train(src, **kw)
  resumed.set_state(state)
  for e in expected:
    r = next(resumed)
    np.testing.assert_array_equal(e['image'], r['image'])
    np.testing.assert_array_equal(e['labels'], r['labels'])


def test_multiprocess_workers_match_in_process_and_resume():
  src = _Tagged(40)
  reference = [_index(b) for b, _ in zip(_train(src), range(6))]
  it = _train(src, worker_count=2)
  got = [_index(next(it)) for _ in range(3)]
  state = it.get_state()
  resumed = _train(src, worker_count=2)
  resumed.set_state(state)
  got += [_index(next(resumed)) for _ in range(3)]
  for r, g in zip(reference, got):
    np.testing.assert_array_equal(r, g)
  it.close()
  resumed.close()


def test_device_prefetch_runs_ahead_and_checkpoints_the_batches_handed_out():
  src = _Tagged(40)
  reference = [_index(b) for b, _ in zip(_train(src), range(8))]
  made = []

  def to_device(batch):
    made.append(_index(batch))
    return {k: jax.device_put(v) for k, v in batch.items()}

  it = _train(src, to_device=to_device, device_prefetch=2)
  got = [next(it) for _ in range(3)]
  assert all(isinstance(b['image'], jax.Array) for b in got)
  deadline = time.monotonic() + 30
  while len(made) < 5 and time.monotonic() < deadline:  # the thread fills its buffer of 2
    time.sleep(0.01)
  assert len(made) >= 5
  state = it.get_state()  # after batch 3, though batches 4 and 5 are made already
  it.close()
  resumed = _train(src, to_device=to_device, device_prefetch=2)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(5)]
  resumed.close()
  for want, batch in zip(reference, got, strict=True):
    np.testing.assert_array_equal(want, _index(jax.device_get(batch)))


_WORKERS_TO_DEVICE = """
import jax
from absl import flags
from kmcl_jax.data import get_source, pipeline

if __name__ == '__main__':
  flags.FLAGS.mark_as_parsed()
  source = get_source('synthetic', split='train', num_examples=64, image_size=16)
  it = pipeline.train_iterator(
    source, batch_size=4, image_size=16, augment='none', seed=0, worker_count=2,
    shard_index=0, shard_count=1, to_device=jax.device_put, device_prefetch=2,
  )
  for _ in range(3):
    next(it)
  it.close()
"""


def test_worker_batches_made_device_arrays_release_their_shared_memory(tmp_path):
  """JAX's CPU arrays alias host memory; grain's shared-memory segments must not outlive the
  run (the resource tracker then warns of leaked shared_memory objects at exit)."""
  script = tmp_path / 'feed.py'
  script.write_text(_WORKERS_TO_DEVICE)
  done = subprocess.run(
    [sys.executable, str(script)],
    cwd=run_helpers.ROOT,
    env=run_helpers.env_without_forced_devices(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr
  assert 'leaked shared_memory' not in done.stderr, done.stderr


def test_workers_survive_ctrl_c():
  """Ctrl-C reaches grain's workers too; they ignore it and the trainer decides when to stop."""
  import multiprocessing
  import signal

  it = _train(_Tagged(40), worker_count=1)
  next(it)
  workers = multiprocessing.active_children()
  assert workers
  for worker in workers:
    os.kill(worker.pid, signal.SIGINT)
  for _ in range(4):
    next(it)
  assert all(worker.is_alive() for worker in workers)
  it.close()


def _broken_voc(tmp_path):
  fx.make_voc(str(tmp_path), n_trainval=9)
  jpeg = tmp_path / 'VOCdevkit/VOC2007/JPEGImages/000004.jpg'
  jpeg.write_bytes(jpeg.read_bytes()[:100])
  os.remove(tmp_path / 'VOCdevkit/VOC2007/JPEGImages/000007.jpg')
  return get_source('voc2007', root=str(tmp_path), split='trainval')


def test_unreadable_image_stops_with_its_name_also_from_a_worker(tmp_path):
  src = _broken_voc(tmp_path)
  for workers in (0, 1):
    it = _train(src, batch_size=9, worker_count=workers)
    with pytest.raises((UnreadableImageError, FileNotFoundError)) as info:
      next(it)  # grain re-raises a worker's exception, with its type, in this process
    assert '000004.jpg' in str(info.value) or '000007.jpg' in str(info.value)
    it.close()


def test_skip_unreadable_counts_and_keeps_order(tmp_path):
  src = _broken_voc(tmp_path)
  it = _train(src, batch_size=7, skip_unreadable=True, image_size=16)
  batches = [next(it) for _ in range(4)]  # 28 readable = 4 epochs of the 7 readable images
  assert all(b['image'].shape == (7, 16, 16, 3) for b in batches)
  assert pipeline.skipped_count(it) >= 2 * 3  # two bad images per epoch
  # The count is the iterator's: checkpointed with its state, and restored with it.
  resumed = _train(src, batch_size=7, skip_unreadable=True, image_size=16)
  resumed.set_state(it.get_state())
  assert pipeline.skipped_count(resumed) == pipeline.skipped_count(it)
  np.testing.assert_array_equal(next(resumed)['image'], next(it)['image'])
  # The readable images appear exactly once per epoch: each image's colour is its id.
  first = batches[0]['image'][:, 8, 8].astype(int)
  ids = sorted(min(range(1, 10), key=lambda n: np.abs(c - fx.colour_of(n)).max()) for c in first)
  assert ids == [1, 2, 3, 5, 6, 8, 9]


def test_eval_batches_padded_masked_and_sharded():
  src = _Tagged(23)
  for shards in (1, 3):
    seen, counts = [], []
    for s in range(shards):
      batches = list(
        pipeline.eval_batches(src, batch_size=4, image_size=12, shard_index=s, shard_count=shards)
      )
      counts.append(len(batches))
      for b in batches:
        assert b['image'].shape == (4, 12, 12, 3) and b['mask'].dtype == bool
        idx = _index(b)[b['mask']]
        seen += list(idx)
        for i, labels, difficult in zip(idx, b['labels'][b['mask']], b['difficult'][b['mask']]):
          np.testing.assert_array_equal(labels, src[i]['labels'])
          np.testing.assert_array_equal(difficult, src[i]['difficult'])
        assert not b['labels'][~b['mask']].any() and not b['image'][~b['mask']].any()
    assert sorted(seen) == list(range(23))  # every example exactly once
    assert len(set(counts)) == 1  # same number of batches on every process
  assert counts == [2, 2, 2]  # ceil(ceil(23 / 3) / 4)
  # eval is deterministic and re-iterable
  ev = pipeline.eval_batches(src, batch_size=5, image_size=12, shard_index=0, shard_count=1)
  a, b = list(ev), list(ev)
  assert all(np.array_equal(x['image'], y['image']) for x, y in zip(a, b))


def test_eval_pads_whole_batches_for_short_shards():
  src = _Tagged(5)
  lens = [
    len(list(pipeline.eval_batches(src, batch_size=1, image_size=12, shard_index=s, shard_count=4)))
    for s in range(4)
  ]
  assert lens == [2, 2, 2, 2]  # shard 0 has 2 records, the others 1 plus a masked batch


def test_normalize_matches_numpy():
  images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  for name, (mean, std) in pipeline.NORMALIZATION.items():
    out = np.asarray(pipeline.normalize(images, mean, std))
    ref = (images.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=name)
  assert pipeline.NORMALIZATION['none'] == ((0, 0, 0), (1, 1, 1))
