"""The workdir as a record of one run: the config that made it, its deliberate changes, a lock.

  workdir/config.json           the config that created the workdir; written once, never changed
  workdir/config_changes.jsonl  one line per rerun that changed a setting: {"time", "changes":
                                {name: [old, new]}}; config.json + these lines = the current config
  workdir/run.lock              {"pid", "host", "started"} of the run using the workdir

A rerun compares its config with the recorded one (`check_config`). Settings in `OPERATIONAL`
do not change what a run computes and may change freely; settings in `DELIBERATE` (more steps,
another evaluation schedule, a moved dataset folder) change only with `allow_change=True`; any
other difference (model, data, batch, optimizer, schedule, seed, loss) is refused: it would mix
two experiments in one set of checkpoints. Either way the differences are listed by their
config names, and nothing in the workdir changes before the check passes.

The lock refuses a second run on a workdir in use and names its holder. A lock left by a process
that is gone (same host, no such process id) is stale and taken over with a warning.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

CONFIG_FILE = 'config.json'
CHANGES_FILE = 'config_changes.jsonl'
LOCK_FILE = 'run.lock'

# No effect on the numbers a run produces: change freely (still recorded).
OPERATIONAL = (
  'dataset.worker_count',
  'dataset.device_prefetch',
  'log_every_steps',
  'checkpoint_every_steps',
  'eval_batch_size',
  'compilation_cache_dir',
)
# Change what the run does from now on, not what it did: allowed with allow_change=True.
DELIBERATE = (
  'num_epochs',
  'num_train_steps',
  'eval_every_epochs',
  'dataset.root',
  'dataset.skip_unreadable',
  'eval.threshold',
  'eval.top_k',
  'eval.with_auc',
  'export_weights',
)


class WorkdirError(RuntimeError):
  """The workdir cannot be used as asked; the message says why and what to do."""


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists (as they are in JSON)."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      nested = flatten(value, name + '.')
      out.update(nested if nested else {name: {}})
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_usable(workdir: str) -> None:
  """Fails unless `workdir` is a directory (or can be created) that this user can write."""
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise WorkdirError(f'workdir {workdir} is a file, not a directory: pass another --workdir.')
    if not os.access(path, os.W_OK | os.X_OK):
      raise WorkdirError(f'workdir {workdir} is not writable by this user.')
    return
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(
      f'workdir {workdir} cannot be created: {parent} is not a writable directory.'
    )


def recorded_config(workdir: str) -> dict[str, Any] | None:
  """The workdir's current config, flattened (config.json plus its recorded changes)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      recorded = flatten(json.load(f))
    changes = os.path.join(workdir, CHANGES_FILE)
    if os.path.exists(changes):
      with open(changes) as f:
        for line in f:
          if line.strip():
            recorded.update({k: new for k, (_, new) in json.loads(line)['changes'].items()})
  except (ValueError, KeyError, TypeError) as e:
    raise WorkdirError(
      f'{path} (or {CHANGES_FILE} beside it) is damaged ({e}); the workdir '
      'no longer says what made its checkpoints: use a new --workdir.'
    ) from e
  return recorded


def differences(
  recorded: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
  """{name: (recorded value, new value)} of every flattened setting that differs."""
  missing = object()
  return {
    k: (recorded.get(k), config.get(k))
    for k in sorted(set(recorded) | set(config))
    if recorded.get(k, missing) != config.get(k, missing)
  }


def check_config(
  workdir: str, config: ml_collections.ConfigDict, *, allow_change: bool
) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the workdir's record; returns the accepted changes, or raises.

  Reads only: nothing is written (see `record_config`).
  """
  recorded = recorded_config(workdir)
  if recorded is None:
    if os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise WorkdirError(
        f'workdir {workdir} has checkpoints but no {CONFIG_FILE}, so nothing '
        'says what made them: use a new --workdir.'
      )
    return {}
  diff = differences(recorded, flatten(_as_json(config)))
  fixed = {k: v for k, v in diff.items() if k not in OPERATIONAL + DELIBERATE}
  deliberate = {k: v for k, v in diff.items() if k in DELIBERATE}

  def listing(items):
    return '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in items.items())

  if fixed:
    raise WorkdirError(
      f'workdir {workdir} was made with other settings, which its checkpoints depend on: '
      f'{listing(fixed)}. Use a new --workdir for these settings (or rerun with the '
      f'recorded ones, see {os.path.join(workdir, CONFIG_FILE)}).'
    )
  if deliberate and not allow_change:
    raise WorkdirError(
      f'workdir {workdir} was made with other settings: {listing(deliberate)}. To continue '
      'this run with them, rerun with --allow_config_change (the change is recorded in '
      f'{CHANGES_FILE}); otherwise use a new --workdir.'
    )
  return diff


def record_config(
  workdir: str, config: ml_collections.ConfigDict, changes: Mapping[str, tuple[Any, Any]]
) -> None:
  """Writes config.json on creation, or appends the accepted `changes` to the change log."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
    os.replace(tmp, path)
  elif changes:
    line = {'time': _now(), 'changes': {k: list(v) for k, v in changes.items()}}
    with open(os.path.join(workdir, CHANGES_FILE), 'a') as f:
      f.write(json.dumps(line) + '\n')
    logging.warning(
      'Settings changed for this run (recorded in %s): %s', CHANGES_FILE, ', '.join(changes)
    )


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  return True


class Lock:
  """workdir/run.lock held by this process; `release()` removes it. Create with `acquire`."""

  def __init__(self, path: str, created_workdir: str | None):
    self.path = path
    self._created_workdir = created_workdir

  @classmethod
  def acquire(cls, workdir: str) -> Lock:
    """Creates the workdir if needed and takes its lock, or raises naming the holder."""
    created = None if os.path.isdir(workdir) else os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': _now()}
    tmp = f'{path}.{me["host"]}.{me["pid"]}'
    with open(tmp, 'w') as f:
      json.dump(me, f)
    try:
      for _ in range(2):
        try:
          os.link(tmp, path)  # atomic: fails if another run holds the lock
          return cls(path, created)
        except FileExistsError:
          holder = _read_lock(path)
          if holder and (holder.get('host') != me['host'] or _alive(int(holder['pid']))):
            raise WorkdirError(
              f'workdir {workdir} is in use by process {holder.get("pid")} on host '
              f'{holder.get("host")} (started {holder.get("started")}). Wait for it to end '
              f'or use another --workdir; if that process is gone, delete {path}.'
            ) from None
          if holder:
            logging.warning(
              'Removing the stale lock %s of process %s on this host (no longer running).',
              path,
              holder['pid'],
            )
          try:
            os.remove(path)
          except FileNotFoundError:
            pass  # released meanwhile
      raise WorkdirError(f'cannot take the lock {path}: another run keeps creating it.')
    finally:
      os.remove(tmp)

  def release(self) -> None:
    """Removes the lock (and the workdir if this run created it and left it empty)."""
    if os.path.exists(self.path):
      os.remove(self.path)
    if self._created_workdir and not os.listdir(self._created_workdir):
      os.rmdir(self._created_workdir)


def _read_lock(path: str) -> dict[str, Any] | None:
  """The lock's holder, or None for a lock file that is gone or half-written."""
  try:
    with open(path) as f:
      holder = json.load(f)
    int(holder['pid'])
    return holder
  except (OSError, ValueError, KeyError, TypeError):
    return None
