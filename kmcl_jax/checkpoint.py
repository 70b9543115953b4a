"""Checkpoints in the workdir: orbax managers for the latest and the best train state.

  workdir/checkpoints/latest/<step>/{state, data}   every checkpoint_every_steps, each eval,
                                                    on SIGTERM and at the end (keeps 1)
  workdir/checkpoints/best/<step>/{state, data}     the best validation mAP so far (keeps 1)

`state` is the whole train state pytree (parameters, BatchNorm statistics, optimizer state, EMA,
step and skipped-step count); `data` is this process's grain iterator state, so a resumed run
reads the same batches as an uninterrupted one. Saves are asynchronous; `wait()` before exit.

Failures are one `CheckpointError` naming the checkpoint and the cause. A save that fails (disk
full, permissions) stops the run at the next save or `wait()`; the previous checkpoint stays, and
the unfinished one (`<step>.orbax-checkpoint-tmp`) is removed when the workdir is next opened. A
checkpoint that cannot be restored is named; with `fallback=True` it is moved to
`checkpoints/unreadable/` and the next newest (latest, then best) is tried instead.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging

BEST_METRIC = 'val_mAP'
UNREADABLE_DIR = 'unreadable'


class CheckpointError(RuntimeError):
  """A checkpoint cannot be saved or restored; the message names it and the cause."""


def _cause(error: BaseException) -> str:
  """The short reason of an orbax/tensorstore/OS error (they run to hundreds of characters)."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  first = text.strip().splitlines()[0] if text.strip() else ''
  return f'{type(error).__name__}: {first[:300]}'


def _manager(directory: str, *, best: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1,
    create=True,
    cleanup_tmp_directories=True,
    best_fn=(lambda metrics: metrics[BEST_METRIC]) if best else None,
    best_mode='max',
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=options,
    item_names=('state', 'data'),
    item_handlers={
      'state': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(),
    },
  )


class Checkpoints:
  """The latest and best train states of one run."""

  def __init__(self, workdir: str):
    self.root = os.path.join(workdir, 'checkpoints')
    self.latest = _manager(os.path.join(self.root, 'latest'), best=False)
    self.best = _manager(os.path.join(self.root, 'best'), best=True)
    self._pending: list[str] = []  # saves that may still be running

  def _save(self, manager, step: int, state: Any, data_iterator, **kwargs) -> None:
    self._check_pending()
    path = os.path.join(manager.directory, str(step))
    try:
      manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        ),
        **kwargs,
      )
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all end the run here
      raise CheckpointError(f'cannot save checkpoint {path}: {_cause(e)}') from e
    self._pending.append(path)

  def _check_pending(self) -> None:
    """Waits for running saves; raises if one of them failed."""
    try:
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      paths = ' or '.join(self._pending) or self.root
      raise CheckpointError(
        f'cannot save checkpoint {paths}: {_cause(e)}. Checkpoints saved '
        'before it are kept; free space (or fix permissions) and rerun to '
        'resume from them.'
      ) from e
    self._pending = []

  def save_latest(self, step: int, state: Any, data_iterator) -> None:
    if self.latest.latest_step() == step:
      return
    self._save(self.latest, step, state, data_iterator)

  def save_best(self, step: int, state: Any, data_iterator, val_map: float) -> None:
    self._save(self.best, step, state, data_iterator, metrics={BEST_METRIC: float(val_map)})

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
      raise CheckpointError(f'no {which} checkpoint in {manager.directory}')
    return self._restore(manager, step, abstract_state, data_iterator)

  def _restore(self, manager, step: int, abstract_state: Any, data_iterator) -> Any:
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      return manager.restore(step, args=ocp.args.Composite(**items))['state']
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
      raise CheckpointError(
        f'checkpoint {os.path.join(manager.directory, str(step))} cannot be restored ({_cause(e)})'
      ) from e

  def resume(self, abstract_state: Any, data_iterator, *, fallback: bool) -> Any | None:
    """The newest restorable train state (latest, else best), or None without checkpoints.

    A checkpoint that fails to restore raises a `CheckpointError` naming it, unless `fallback`:
    then it is moved to checkpoints/unreadable/ and the next newest one is tried.
    """
    candidates = sorted(
      [(s, 1, self.latest) for s in self.latest.all_steps()]
      + [(s, 0, self.best) for s in self.best.all_steps()],
      reverse=True,
    )
    for step, _, manager in candidates:
      path = os.path.join(manager.directory, str(step))
      try:
        return self._restore(manager, step, abstract_state, data_iterator)
      except CheckpointError as e:
        if not fallback:
          raise CheckpointError(
            f'{e}. Rerun with --resume_fallback to set it aside and resume from the newest '
            f'checkpoint that restores, or delete {path} yourself.'
          ) from e.__cause__
        aside = os.path.join(
          self.root, UNREADABLE_DIR, f'{os.path.basename(manager.directory)}-{step}'
        )
        logging.warning('%s; moving it to %s and trying the next checkpoint.', e, aside)
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(path, aside)
        manager.reload()
    if candidates:
      raise CheckpointError(
        f'no checkpoint in {self.root} could be restored (moved to '
        f'{os.path.join(self.root, UNREADABLE_DIR)}); rerun to start from '
        'scratch, or use a new --workdir.'
      )
    return None

  def wait(self) -> None:
    self._check_pending()

  def close(self) -> None:
    """Closes both managers; a failed save already raised, so its echo here is only logged."""
    for manager in (self.latest, self.best):
      try:
        manager.close()
      except Exception as e:  # noqa: BLE001
        logging.warning('Closing %s: %s', manager.directory, _cause(e))
