"""Speed of the train augmentation on the device against the host's PIL chain, per batch.

  python -m kmcl_jax.benchmarks.augment_device [--sizes=224] [--batch_size=16] [--json=PATH]

Times, on the first device, `kmcl_jax.data.augment_device.augment_batch` jitted: CutoutPIL +
RandAugment with both strategies of `rand_augment` (per image through a switch, the trainer's;
and the whole batch through every op, then a select) and CutoutPIL + RandomAffine
(ChestX-ray14), as images/s (median over --steps calls after a warm-up call, whose time is
reported as compile time). Beside them, the host's PIL chain for the same augmentation in one
thread (images already resized, as the device gets them). On an accelerator the device figure
is what the step pays for `dataset.augment_device=on`; the host figure, times the cores feeding
one device, is what `off` can deliver. Figures only: nothing here asserts on time.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from kmcl_jax import allocator
from kmcl_jax.data import augment as host, augment_device as dev

_SIZES = flags.DEFINE_list('sizes', ['224'], 'image sizes')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'images per call', lower_bound=1)
_STEPS = flags.DEFINE_integer('steps', 5, 'timed calls per row (median)', lower_bound=1)
_HOST_SECONDS = flags.DEFINE_float('host_seconds', 3.0, 'measuring time of the host chain')
_JSON = flags.DEFINE_string('json', None, 'write the rows to this JSON file')


def device_rate(kind: str, per_image: bool, images: np.ndarray) -> dict[str, float]:
  """Compile seconds, median ms per call and images/s of one device chain."""
  fn = jax.jit(
    lambda x, step, indices: dev.augment_batch(
      x, kind=kind, seed=0, step=step, global_indices=indices, per_image=per_image
    )
  )
  x = jax.device_put(images, jax.devices()[0])
  indices = jnp.arange(len(images))
  start = time.perf_counter()
  jax.block_until_ready(fn(x, 0, indices))
  compile_s = time.perf_counter() - start
  times = []
  for step in range(1, _STEPS.value + 1):  # new draws each call, as in training
    start = time.perf_counter()
    jax.block_until_ready(fn(x, step, indices))
    times.append(time.perf_counter() - start)
  ms = float(np.median(times)) * 1e3
  return {'compile_s': compile_s, 'ms_per_call': ms, 'images_per_s': len(images) / ms * 1e3}


def host_rate(kind: str, images: np.ndarray, seconds: float) -> float:
  """Images/s of the host's PIL chain (CutoutPIL, then RandAugment or RandomAffine), 1 thread."""
  rng = np.random.default_rng(0)
  second = host.randaugment if kind == 'randaugment' else host.random_affine
  pils = [Image.fromarray(x) for x in images]
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    np.asarray(second(host.cutout_pil(pils[count % len(pils)], rng), rng))
    count += 1
  return count / (time.perf_counter() - start)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f'device: {device.device_kind} ({jax.default_backend()}), batch {_BATCH.value}')
  rows = []
  cases = (
    ('randaugment', True, 'CutoutPIL + RandAugment, per image (switch)'),
    ('randaugment', False, 'CutoutPIL + RandAugment, whole batch (every op)'),
    ('affine', True, 'CutoutPIL + RandomAffine'),
  )
  for size in map(int, _SIZES.value):
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (_BATCH.value, size, size, 3), dtype=np.uint8)
    host_rates = {kind: host_rate(kind, images, _HOST_SECONDS.value) for kind, _, _ in cases}
    for kind, per_image, label in cases:
      row = dict(size=size, kind=kind, per_image=per_image, **device_rate(kind, per_image, images))
      row['host_images_per_s'] = host_rates[kind]
      rows.append(row)
      print(
        f'{size}px {label:48s} device {row["images_per_s"]:9.1f} images/s '
        f'({row["ms_per_call"]:8.1f} ms per call, compile {row["compile_s"]:5.1f} s) | '
        f'host PIL {row["host_images_per_s"]:7.1f} images/s per core'
      )
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(
        {'device': device.device_kind, 'batch_size': _BATCH.value, 'rows': rows}, f, indent=1
      )


if __name__ == '__main__':
  allocator.run_on_tcmalloc()
  app.run(main)
