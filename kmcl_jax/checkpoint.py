"""Checkpoints in the workdir: orbax managers for the latest and the best train state.

  workdir/checkpoints/latest/<step>/{state, data}   every checkpoint_every_steps, each eval,
                                                    on SIGTERM and at the end (keeps 1)
  workdir/checkpoints/best/<step>/{state, data}     the best validation mAP so far (keeps 1)

`state` is the whole train state pytree (parameters, BatchNorm statistics, optimizer state, EMA,
step and skipped-step count); `data` is this process's grain iterator state, so a resumed run
reads the same batches as an uninterrupted one. Saves are asynchronous; `wait()` before exit.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

BEST_METRIC = 'val_mAP'


def _manager(directory: str, *, best: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True,
      best_fn=(lambda metrics: metrics[BEST_METRIC]) if best else None, best_mode='max')
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options, item_names=('state', 'data'),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})


class Checkpoints:
  """The latest and best train states of one run."""

  def __init__(self, workdir: str):
    root = os.path.join(workdir, 'checkpoints')
    self.latest = _manager(os.path.join(root, 'latest'), best=False)
    self.best = _manager(os.path.join(root, 'best'), best=True)

  def save_latest(self, step: int, state: Any, data_iterator) -> None:
    if self.latest.latest_step() == step:
      return
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def save_best(self, step: int, state: Any, data_iterator, val_map: float) -> None:
    self.best.save(step, metrics={BEST_METRIC: float(val_map)}, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_step(self) -> int | None:
    return self.best.best_step()

  def restore(self, which: str, abstract_state: Any, data_iterator=None) -> Any:
    """Restores `which` ('latest' or 'best') into the shapes and shardings of abstract_state.

    The data iterator, when given, is restored in place; returns the train state.
    """
    manager = self.latest if which == 'latest' else self.best
    step = manager.latest_step() if which == 'latest' else manager.best_step()
    if step is None:
      raise FileNotFoundError(f'no {which} checkpoint in {manager.directory}')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))['state']

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
