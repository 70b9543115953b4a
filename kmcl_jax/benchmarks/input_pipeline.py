"""Input pipeline throughput: images/s for decode + augment + batch, and the decode floor.

  python -m kmcl_jax.benchmarks.input_pipeline --source=synthetic [--cores=N] [--json=PATH]
  python -m kmcl_jax.benchmarks.input_pipeline --source=voc2007 --root=/data/voc
  python -m kmcl_jax.benchmarks.input_pipeline --source=voc2007 --root=/tmp/fakevoc \\
      --fake_voc_images=400      # first writes 400 VOC-like 500x375 JPEGs under --root

For each training size (224, 448) it prints
- the floor: decode + resize alone in one thread, with PIL's full decode, and for JPEG files
  also with simplejpeg's full decode and DCT-scaled decode (`decode_size` = the training size);
- the train pipeline as the trainer runs it (`pipeline.train_iterator`: decode, resize, batch,
  then global device arrays made by the prefetch thread) with 0, 1 and 2 worker processes,
  measured after a warm-up, for each --augment: 'host' (CutoutPIL + RandAugment, or
  RandomAffine, on the host: `dataset.augment_device=off`) and 'device' (the host only decodes
  and resizes: `augment_device=on`, the augmentation then costs device time instead).
--cores=N pins the run (worker processes included) to N cores, so that images/s per core can be
read off; figures depend on the CPU, and the number to compare with is the accelerator's step
rate divided by the host cores that feed it.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from kmcl_jax import allocator, distributed, evaluate
from kmcl_jax.data import get_source, pipeline
from kmcl_jax.data.base import decode_image

_SOURCE = flags.DEFINE_string('source', 'synthetic', 'dataset name for get_source')
_ROOT = flags.DEFINE_string('root', None, 'dataset root')
_SPLIT = flags.DEFINE_string('split', None, 'split (default: the first training split)')
_SIZES = flags.DEFINE_list('sizes', ['224', '448'], 'training image sizes')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'worker counts to measure')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'per-process batch size')
_SECONDS = flags.DEFINE_float('seconds', 8.0, 'measuring time per configuration')
_AUGMENT = flags.DEFINE_list(
  'augment', ['host', 'device'], "where augmentation runs: 'host' and/or 'device'"
)
flags.register_validator(
  'augment', lambda v: set(v) <= {'host', 'device'}, "--augment: 'host' and/or 'device'"
)
_CORES = flags.DEFINE_integer('cores', None, 'pin to this many cores (default: all)', lower_bound=1)
_JSON = flags.DEFINE_string('json', None, 'write the rows to this JSON file')
_PREFETCH = flags.DEFINE_integer(
  'device_prefetch', 2, 'dataset.device_prefetch: batches made into device arrays ahead'
)
_FAKE_VOC = flags.DEFINE_integer(
  'fake_voc_images', 0, 'if > 0, first write this many VOC-like JPEGs under --root'
)

_TRAIN_SPLIT = {
  'voc2007': 'trainval',
  'coco2014': 'train',
  'adp': 'train',
  'chestxray14': 'train_val',
  'synthetic': 'train',
  'tfds': 'train',
}


def write_fake_voc(root: str, n: int, seed: int = 0) -> None:
  """VOC layout with n photo-like 500x375 JPEGs (smooth field + texture, ~VOC file sizes)."""
  rng = np.random.default_rng(seed)
  base = os.path.join(root, 'VOCdevkit', 'VOC2007')
  main = os.path.join(base, 'ImageSets', 'Main')
  os.makedirs(main, exist_ok=True)
  os.makedirs(os.path.join(base, 'JPEGImages'), exist_ok=True)
  ids = [f'{i:06d}' for i in range(1, n + 1)]
  for i in ids:
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
      (500, 375), Image.BICUBIC
    )
    pixels = np.asarray(field, np.int16) + rng.integers(-30, 31, (375, 500, 1), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
      os.path.join(base, 'JPEGImages', f'{i}.jpg'), quality=90
    )
  with open(os.path.join(main, 'trainval.txt'), 'w') as f:
    f.write(''.join(f'{i}\n' for i in ids))
  from kmcl_jax.data.voc import CLASS_NAMES  # pylint: disable=g-import-not-at-top

  for name in CLASS_NAMES:
    with open(os.path.join(main, f'{name}_trainval.txt'), 'w') as f:
      f.write(''.join(f'{i} {rng.choice([-1, 1])}\n' for i in ids))


def _rate(fn, items, seconds: float) -> float:
  """Calls fn on items round-robin for about `seconds`; returns calls per second."""
  fn(items[0])
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    fn(items[count % len(items)])
    count += 1
  return count / (time.perf_counter() - start)


def floor_rates(source, size: int, seconds: float) -> dict[str, float]:
  """Decode + resize images/s in one thread, per decoder."""
  paths = list(getattr(source, 'paths', []))[:200]
  if not paths:  # synthetic: rendering is the decode
    return {
      'render+resize': _rate(
        lambda i: np.asarray(Image.fromarray(source[i]['image']).resize((size, size))),
        list(range(200)),
        seconds,
      )
    }
  rates = {
    'PIL full decode+resize': _rate(
      lambda p: np.asarray(Image.open(p).convert('RGB').resize((size, size), Image.BILINEAR)),
      paths,
      seconds,
    )
  }
  if paths[0].lower().endswith(('.jpg', '.jpeg')):
    rates['simplejpeg full decode+resize'] = _rate(
      lambda p: np.asarray(Image.fromarray(decode_image(p)).resize((size, size), Image.BILINEAR)),
      paths,
      seconds,
    )
    rates['simplejpeg DCT-scaled decode+resize'] = _rate(
      lambda p: np.asarray(
        Image.fromarray(decode_image(p, decode_size=size)).resize((size, size), Image.BILINEAR)
      ),
      paths,
      seconds,
    )
  return rates


def pipeline_rate(source, *, size: int, workers: int, augment: str, seconds: float) -> float:
  """Images/s of the trainer's feed: batches as global arrays on this host's devices."""
  mesh = distributed.data_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  it = pipeline.train_iterator(
    source,
    batch_size=_BATCH.value,
    image_size=size,
    augment=augment,
    seed=0,
    worker_count=workers,
    shard_index=0,
    shard_count=1,
    to_device=functools.partial(evaluate.to_global, sharding),
    device_prefetch=_PREFETCH.value,
  )
  for _ in range(2 + 2 * workers):  # warm-up, including worker start-up
    jax.block_until_ready(next(it))
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    count += jax.block_until_ready(next(it))['image'].shape[0]
  rate = count / (time.perf_counter() - start)
  it.close()
  return rate


def main(argv):
  del argv
  name = _SOURCE.value
  if _CORES.value:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: _CORES.value])
  cores = len(os.sched_getaffinity(0))
  if _BATCH.value % jax.local_device_count():
    raise app.UsageError(
      f'--batch_size={_BATCH.value} must be a multiple of the {jax.local_device_count()} devices'
    )
  if _FAKE_VOC.value:
    write_fake_voc(_ROOT.value, _FAKE_VOC.value)
  split = _SPLIT.value or _TRAIN_SPLIT.get(name, 'train')
  host_augment = 'affine' if name == 'chestxray14' else 'randaugment'
  print(
    f'source={name} root={_ROOT.value} split={split} host augmentation={host_augment} '
    f'batch={_BATCH.value} cores={cores} device_prefetch={_PREFETCH.value} '
    f'devices={jax.device_count()} ({jax.default_backend()})'
  )
  rows = []

  def report(size, where, workers, rate, decode=''):
    rows.append(
      dict(size=size, augmentation=where, workers=workers, decode=decode, images_per_s=rate)
    )
    label = f'{where} augmentation, workers={workers} {decode}'
    print(f'{size}px {label:45s} {rate:8.1f} images/s ({rate / cores:.1f} per core)')

  for size in map(int, _SIZES.value):
    if name == 'synthetic':
      source = get_source(name, split=split, num_examples=2000, image_size=size)
    else:
      source = get_source(name, root=_ROOT.value, split=split, decode_size=size)
      plain = get_source(name, root=_ROOT.value, split=split)
    for label, rate in floor_rates(source, size, _SECONDS.value / 2).items():
      rows.append(dict(size=size, floor=label, images_per_s=rate))
      print(f'{size}px floor  {label:40s} {rate:8.1f} images/s (1 thread)')
    for where in _AUGMENT.value:
      augment = {'host': host_augment, 'device': 'none'}[where]
      for workers in map(int, _WORKERS.value):
        rate = pipeline_rate(
          source, size=size, workers=workers, augment=augment, seconds=_SECONDS.value
        )
        report(size, where, workers, rate, '' if name == 'synthetic' else 'decode_size=size')
        if name != 'synthetic' and workers == 0:
          rate = pipeline_rate(plain, size=size, workers=0, augment=augment, seconds=_SECONDS.value)
          report(size, where, 0, rate, 'full decode')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      meta = dict(source=name, batch_size=_BATCH.value, cores=cores, backend=jax.default_backend())
      json.dump(dict(meta, device_prefetch=_PREFETCH.value, rows=rows), f, indent=1)


if __name__ == '__main__':
  allocator.run_on_tcmalloc()
  app.run(main)
