"""The train-step benchmarks run end to end at their tiny --smoke size and write their JSON keys.

Nothing here looks at the figures (no timed assertions).
"""

import json
from pathlib import Path

import pytest
import run_helpers
from absl.testing import flagsaver

from kmcl_jax.benchmarks import train_step


def test_train_step_benchmark_smoke_writes_its_rows(tmp_path):
  path = str(tmp_path / 'step.json')
  with flagsaver.flagsaver(smoke=True, json=path):
    train_step.main([])
  result = json.loads(Path(path).read_text())
  assert result['backend'] == 'cpu'
  assert result['malloc'] in ('glibc', 'tcmalloc', 'jemalloc', 'mimalloc')
  (row,) = result['rows']
  for key in ('step_ms', 'images_per_s', 'compile_s', 'peak_memory_gib', 'step_tflop', 'mfu'):
    assert key in row, key
  assert row['step_ms'] > 0 and row['step_tflop'] > 0
  assert row['flops_source'] == 'XLA cost analysis'  # XLA:CPU counts the convolutions
  assert row['mfu'] is None  # no peak FLOP/s for a CPU


def test_train_step_benchmark_alternates_pinned_and_unpinned_layouts(tmp_path):
  from kmcl_jax.models import tresnet

  default = tresnet.pin_layouts
  path = str(tmp_path / 'step.json')
  with flagsaver.flagsaver(smoke=True, compare_pinned_layouts=True, json=path):
    train_step.main([])
  (row,) = json.loads(Path(path).read_text())['rows']
  assert row['unpinned_step_ms'] > 0 and row['pinned_step_ms'] > 0
  # The ratio comes from the unrounded medians; the ms are rounded to 0.01.
  pinned, unpinned = row['pinned_step_ms'], row['unpinned_step_ms']
  rounding = 5e-4 + pinned / unpinned * (0.005 / pinned + 0.005 / unpinned)
  assert row['pinned_to_unpinned'] == pytest.approx(pinned / unpinned, abs=rounding)
  assert tresnet.pin_layouts is default  # the comparison put the setting back


def _run_benchmark(module, *flags, env=None):
  """`python -m kmcl_jax.benchmarks.<module> FLAGS` to the end; returns its stdout."""
  return run_helpers.python_stdout('-m', f'kmcl_jax.benchmarks.{module}', *flags, env=env)


def test_vs_pytorch_smoke_writes_the_ratio(tmp_path):
  path = str(tmp_path / 'vs.json')
  # One CPU device (not the session's eight): the step compiles faster.
  _run_benchmark(
    'vs_pytorch', '--smoke', f'--json={path}', env=run_helpers.env_without_forced_devices()
  )
  result = json.loads(Path(path).read_text())
  assert result['ratio'] == pytest.approx(
    result['jax_step_s'] / result['torch_step_s'], rel=0.02
  )  # from unrounded medians
  assert result['jax_step_s'] > 0 and result['torch_step_s'] > 0
  assert result['malloc'] == run_helpers.expected_malloc(run_helpers.env_without_forced_devices())


def test_input_pipeline_benchmark_measures_host_and_device_augmentation(tmp_path):
  path = tmp_path / 'pipeline.json'
  flags = ['--sizes=32', '--workers=0', '--seconds=0.2', '--batch_size=8', f'--json={path}']
  out = _run_benchmark('input_pipeline', *flags)
  for where in ('host', 'device'):
    (line,) = [x for x in out.splitlines() if f'32px {where} augmentation, workers=0' in x]
    assert line.endswith(' per core)'), line
  rows = json.loads(path.read_text())['rows']
  measured = [(r['augmentation'], r['workers']) for r in rows if 'augmentation' in r]
  assert measured == [('host', 0), ('device', 0)]
  assert all(r['images_per_s'] > 0 for r in rows)


def test_augment_device_benchmark_times_both_strategies_and_the_host(tmp_path):
  path = tmp_path / 'augment.json'
  flags = ['--sizes=16', '--batch_size=4', '--steps=1', '--host_seconds=0.1', f'--json={path}']
  _run_benchmark('augment_device', *flags)
  rows = json.loads(path.read_text())['rows']
  cases = [(r['kind'], r['per_image']) for r in rows]
  assert cases == [('randaugment', True), ('randaugment', False), ('affine', True)]
  for row in rows:
    assert row['images_per_s'] > 0 and row['host_images_per_s'] > 0 and row['compile_s'] > 0
