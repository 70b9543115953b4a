"""One metric writer for a run: metrics.jsonl, TensorBoard events and a concise log line.

Only process 0 writes (`enabled`); the others get a no-op writer, so the loop needs no `if`s.
TensorBoard files come from tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

# The terminal log shows these; metrics.jsonl and TensorBoard get everything.
_LOGGED = ('/loss', '/mAP', '/mAUC', '/learning_rate', '/images_per_sec', '/skipped_steps')


def _jsonable(value: Any) -> Any:
  value = float(value) if hasattr(value, '__float__') else value
  return None if isinstance(value, float) and not math.isfinite(value) else value


def truncate_metrics(path: str, start_step: int) -> None:
  """Rewrites metrics.jsonl without lines past `start_step` or test lines at it (atomically)."""
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for text in lines:
    try:
      line = json.loads(text)
    except ValueError:
      continue  # a line cut short by a kill
    if line['step'] < start_step or (
      line['step'] == start_step and not any(k.startswith('test/') for k in line)
    ):
      keep.append(text)
  if len(keep) != len(lines):
    logging.info(
      'metrics.jsonl: dropping %d lines written after step %d (resumed run).',
      len(lines) - len(keep),
      start_step,
    )
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


class MetricWriter:
  """`write(step, {name: value})` appends one JSON line {"step": step, name: value, ...}.

  `start_step`: the step the run starts (or resumes) from. Lines a killed run wrote after its
  last checkpoint (step > start_step), and test lines of a finish that will run again, are
  dropped first, so a resumed run's metrics.jsonl has each step once.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(path):
      truncate_metrics(path, start_step)
    self._jsonl = open(path, 'a')
    # Imported here: tensorboardX imports torch when it is installed (~2 s of start-up).
    import tensorboardX  # pylint: disable=g-import-not-at-top

    # purge_step: TensorBoard hides the killed run's events past the resumed step, likewise.
    self._tb = tensorboardX.SummaryWriter(
      os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1 if start_step else None
    )

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
    shown = ', '.join(
      f'{k}={v:.4g}' for k, v in line.items() if isinstance(v, float) and k.endswith(_LOGGED)
    )
    logging.info('step %d: %s', step, shown)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
