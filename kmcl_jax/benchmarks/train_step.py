"""Speed of the jitted train step: step time, images/s, compile time, memory and MFU.

  python -m kmcl_jax.benchmarks.train_step                       # TResNet-M 224, batch 8
  python -m kmcl_jax.benchmarks.train_step --models=tresnet_m@224,tresnet_l@448 \\
      --batch_size=64 --dtype=bfloat16 --json=/tmp/step.json  # accelerator sizes
  python -m kmcl_jax.benchmarks.train_step --end_to_end          # + the whole training loop
  python -m kmcl_jax.benchmarks.train_step --smoke               # tiny model, seconds
  python -m kmcl_jax.benchmarks.train_step --compare_pinned_layouts  # CPU A/B in one process

For each model@size: `kmcl_jax.train.train_step` (KMCL head, paper objective, Adam, EMA) jitted
as the trainer jits it, on a batch already on the devices. Compile time is lower + compile;
the step time is the median of `--steps` calls after `--warmup`, each waited for. MFU uses the
FLOPs of the compiled step from XLA's cost analysis when it counts the convolutions (XLA:CPU
does), else 3x the analytic forward count (forward + two backward passes), over the peak of the
device in `PEAK_TFLOPS` (none for CPUs). Peak memory is the device's own counter where it has
one (GPU), else XLA's buffer estimate for the compiled step.

`--end_to_end` also runs `kmcl_jax.train.train_and_evaluate` on synthetic images of the same
size (real input pipeline, `--workers` grain processes), with host augmentation
(`dataset.augment_device='off'`) and device augmentation ('on'), and reports the images/s of
the `--steps` steps that follow the first (compiling) one, next to the step alone.

`--compare_pinned_layouts` also builds the step with and without the layout pins (the 1x1
convolutions' backward and the residual blocks' outputs: `kmcl_jax.models.tresnet.pin_layouts`,
on by default on CPUs) and
alternates the two, `--steps` calls each, in one process: machine noise that shifts whole
processes (2-10% here) then cancels. Adds `unpinned_step_ms`, `pinned_step_ms` and their ratio.

Prints a table; `--json=PATH` writes {"device": ..., "rows": [...]} with the keys printed.
Figures only: nothing here asserts on time.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from kmcl_jax import allocator
from kmcl_jax.benchmarks import common

_MODELS = flags.DEFINE_list('models', ['tresnet_m@224'], 'model@image_size entries to measure')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'global batch size')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype')
_CLASSES = flags.DEFINE_integer('num_classes', 20, 'K of the KMM head')
_STEPS = flags.DEFINE_integer('steps', 20, 'timed steps (median reported)')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed steps after compilation')
_END_TO_END = flags.DEFINE_bool('end_to_end', False, 'also time the whole training loop')
_WORKERS = flags.DEFINE_integer('workers', 2, 'grain worker processes for --end_to_end')
_COMPARE_PINNED = flags.DEFINE_bool(
  'compare_pinned_layouts', False, 'also alternate the step with and without the layout pins'
)
_SMOKE = flags.DEFINE_bool('smoke', False, 'tiny model at 64 px, 3 steps (tests)')
_JSON = flags.DEFINE_string('json', None, 'write the rows to this JSON file')

# Dense peak TFLOP/s per device by device_kind substring (vendor data sheets, SXM parts).
# float32 convolutions and matmuls run as TF32 on these GPUs under JAX's default precision.
PEAK_TFLOPS = {
  'H200': {'bfloat16': 989.0, 'float32': 494.0},
  'H100': {'bfloat16': 989.0, 'float32': 494.0},
  'A100': {'bfloat16': 312.0, 'float32': 156.0},
}


def peak_flops(device_kind: str, dtype: str) -> tuple[str | None, float | None]:
  """(table key, peak FLOP/s) of the device, or (None, None) when it is not in the table."""
  for key, peaks in PEAK_TFLOPS.items():
    if key in device_kind:
      return key, peaks[dtype] * 1e12
  return None, None


def analytic_step_flops(config, num_classes: int) -> float:
  """3 x the inference-forward FLOPs of the model (forward + input and weight gradients)."""
  from kmcl_jax import experiment  # pylint: disable=g-import-not-at-top
  from kmcl_jax.models import summary  # pylint: disable=g-import-not-at-top

  model_fn = functools.partial(experiment.create_model, config, num_classes, 0)
  # Counted by XLA:CPU, which includes the convolutions (compiled only, never run).
  with jax.default_device(jax.devices('cpu')[0]):
    macs = summary.forward_macs(model_fn, config.model.image_size)
  return 3 * 2 * macs * config.batch_size


def time_steps(step, state, batch, *, steps: int, warmup: int):
  """(compile seconds, per-step seconds list, compiled) for the jitted step."""
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  # Called through `step` (jit's C++ dispatch, as the trainer calls it), not `compiled`, whose
  # Python call path costs more per argument; jit reuses the executable compiled above.
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return compile_s, times, compiled


def _peak_memory(compiled) -> tuple[float | None, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30, 'device counter'
  memory = compiled.memory_analysis()
  if memory is None:
    return None, 'unknown'
  total = (
    memory.temp_size_in_bytes
    + memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
  )
  return total / 2**30, 'XLA estimate'


def measure(
  model: str,
  image_size: int,
  *,
  batch_size: int,
  dtype: str,
  num_classes: int,
  steps: int,
  warmup: int,
  overrides: dict | None = None,
) -> dict[str, Any]:
  """One row of the table: the step alone."""
  config = common.make_config(
    model,
    image_size,
    batch_size=batch_size,
    dtype=dtype,
    num_classes=num_classes,
    overrides=overrides,
  )
  step, state, batch = common.build_step(config, num_classes)
  compile_s, times, compiled = time_steps(step, state, batch, steps=steps, warmup=warmup)
  step_s = float(np.median(times))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Per device (the step is partitioned over the batch): times the devices for the whole step.
  xla_flops = float((cost or {}).get('flops', 0.0)) * jax.device_count()
  flops, flops_source = xla_flops, 'XLA cost analysis'
  if jax.default_backend() != 'cpu':  # XLA:CPU counts convolutions; check the others
    analytic = analytic_step_flops(config, num_classes)
    # XLA:GPU leaves cuDNN convolutions out of its count: it then falls far below.
    if xla_flops < 0.5 * analytic:
      flops, flops_source = analytic, 'analytic 3x forward'
  device_kind = jax.devices()[0].device_kind
  peak_key, peak = peak_flops(device_kind, dtype)
  memory_gib, memory_source = _peak_memory(compiled)
  return dict(
    model=model,
    image_size=image_size,
    batch_size=batch_size,
    dtype=dtype,
    step_ms=round(1e3 * step_s, 2),
    images_per_s=round(batch_size / step_s, 1),
    compile_s=round(compile_s, 1),
    peak_memory_gib=None if memory_gib is None else round(memory_gib, 2),
    memory_source=memory_source,
    step_tflop=round(flops / 1e12, 4),
    flops_source=flops_source,
    peak_card=peak_key,
    mfu=None if peak is None else round(flops / step_s / peak, 4),
  )


def end_to_end(
  model: str,
  image_size: int,
  *,
  batch_size: int,
  dtype: str,
  num_classes: int,
  steps: int,
  workers: int,
  augment_device: bool,
  overrides: dict | None = None,
) -> dict[str, Any]:
  """images/s of the whole training loop over `steps` logged steps after the first one."""
  from kmcl_jax import train  # pylint: disable=g-import-not-at-top

  config = common.make_config(
    model,
    image_size,
    batch_size=batch_size,
    dtype=dtype,
    num_classes=num_classes,
    overrides=overrides,
  )
  config.dataset.options.num_examples = batch_size * (steps + 1)
  config.dataset.worker_count = workers
  config.dataset.val_split = ''
  config.num_train_steps = steps + 1
  config.log_every_steps = steps + 1  # one window: the steps after the first (compiling) one
  config.checkpoint_every_steps = 10**9
  config.eval_every_epochs = 10.0**9
  config.dataset.augment_device = 'on' if augment_device else 'off'
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [
        line['train/images_per_sec']
        for line in map(json.loads, f)
        if 'train/images_per_sec' in line
      ]
  return dict(
    model=model,
    image_size=image_size,
    batch_size=batch_size,
    dtype=dtype,
    workers=workers,
    augment_device=augment_device,
    end_to_end_images_per_s=round(float(rates[-1]), 1),
  )


def compare_pinned_layouts(config, num_classes: int, *, steps: int) -> dict[str, Any]:
  """Median step times with and without `tresnet.pin_layouts`, alternated in one process."""
  from kmcl_jax.models import tresnet  # pylint: disable=g-import-not-at-top

  steps_by, states = {}, {}  # keyed by pinned; both steps take the same synthetic batch
  default = tresnet.pin_layouts
  try:
    for pinned in (False, True):
      tresnet.pin_layouts = lambda pinned=pinned: pinned  # read when the step is traced
      step, state, batch = common.build_step(config, num_classes)
      states[pinned], metrics = step(state, batch)  # traces and compiles now, under this setting
      jax.block_until_ready(metrics)
      steps_by[pinned] = step
  finally:
    tresnet.pin_layouts = default
  times = {False: [], True: []}
  for i in range(steps):
    for pinned in (False, True) if i % 2 == 0 else (True, False):  # either order equally often
      start = time.perf_counter()
      states[pinned], metrics = steps_by[pinned](states[pinned], batch)
      jax.block_until_ready(metrics)
      times[pinned].append(time.perf_counter() - start)
  unpinned, pinned = (1e3 * float(np.median(times[k])) for k in (False, True))
  return dict(
    unpinned_step_ms=round(unpinned, 2),
    pinned_step_ms=round(pinned, 2),
    pinned_to_unpinned=round(pinned / unpinned, 3),
  )


def _entries(models) -> list[tuple[str, int]]:
  out = []
  for entry in models:
    name, _, size = entry.partition('@')
    out.append((name, int(size or 224)))
  return out


def main(argv):
  del argv
  device_kind, malloc = jax.devices()[0].device_kind, allocator.malloc_name()
  print(
    f'device: {device_kind} ({jax.default_backend()}), {jax.device_count()} device(s), '
    f'{os.cpu_count()} host cores, malloc: {malloc}'
  )
  if _SMOKE.value:
    entries, overrides, steps, warmup = [('tresnet_m', 64)], common.SMOKE_OVERRIDES, 3, 1
  else:
    entries, overrides, steps, warmup = _entries(_MODELS.value), None, _STEPS.value, _WARMUP.value
  settings = dict(
    batch_size=_BATCH.value, dtype=_DTYPE.value, num_classes=_CLASSES.value, overrides=overrides
  )
  rows = []
  for name, size in entries:
    row = measure(name, size, steps=steps, warmup=warmup, **settings)
    print(
      f'{name:10s} {size:4d}px b{row["batch_size"]:<4d} {row["dtype"]:8s} '
      f'step {row["step_ms"]:9.2f} ms  {row["images_per_s"]:8.1f} img/s  '
      f'compile {row["compile_s"]:6.1f} s  memory {row["peak_memory_gib"]} GiB '
      f'({row["memory_source"]})  {row["step_tflop"]} TFLOP/step ({row["flops_source"]})  '
      f'MFU {row["mfu"] if row["mfu"] is not None else "-"} '
      f'({row["peak_card"] or "no peak for this device"})',
      flush=True,
    )
    if _COMPARE_PINNED.value:
      config = common.make_config(name, size, **settings)
      row.update(compare_pinned_layouts(config, settings['num_classes'], steps=steps))
      print(
        f'{"":10s} layouts pinned / not pinned, alternated: {row["pinned_step_ms"]:.2f} / '
        f'{row["unpinned_step_ms"]:.2f} ms = {row["pinned_to_unpinned"]:.3f}',
        flush=True,
      )
    if _END_TO_END.value:
      for augment_device in (False, True):
        e2e = end_to_end(
          name, size, steps=steps, workers=_WORKERS.value, augment_device=augment_device, **settings
        )
        row[f'end_to_end_{"device" if augment_device else "host"}_images_per_s'] = e2e[
          'end_to_end_images_per_s'
        ]
        print(
          f'{"":10s} end to end, {"device" if augment_device else "host"} augmentation, '
          f'{_WORKERS.value} workers: {e2e["end_to_end_images_per_s"]:8.1f} img/s '
          f'({e2e["end_to_end_images_per_s"] / row["images_per_s"]:.0%} of the step)',
          flush=True,
        )
    rows.append(row)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(
        {
          'device': device_kind,
          'backend': jax.default_backend(),
          'host_cores': os.cpu_count(),
          'jax': jax.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'malloc': malloc,
          'rows': rows,
        },
        f,
        indent=1,
      )


if __name__ == '__main__':
  allocator.run_on_tcmalloc()
  app.run(main)
