"""One metric writer for a run: metrics.jsonl, TensorBoard events and a concise log line.

Only process 0 writes (`enabled`); the others get a no-op writer, so the loop needs no `if`s.
TensorBoard files come from tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging
import tensorboardX


# The terminal log shows these; metrics.jsonl and TensorBoard get everything.
_LOGGED = ('/loss', '/mAP', '/mAUC', '/learning_rate', '/images_per_sec', '/skipped_steps')


def _jsonable(value: Any) -> Any:
  value = float(value) if hasattr(value, '__float__') else value
  return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
  """`write(step, {name: value})` appends one JSON line {"step": step, name: value, ...}."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    line = {'step': int(step), **{k: _jsonable(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(line) + '\n')
    self._jsonl.flush()
    for name, value in line.items():
      if name != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, int(step))
    self._tb.flush()
    shown = ', '.join(f'{k}={v:.4g}' for k, v in line.items()
                      if isinstance(v, float) and k.endswith(_LOGGED))
    logging.info('step %d: %s', step, shown)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
