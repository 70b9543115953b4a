"""Command line: python -m kmcl_jax.main --config=configs/adp.py --workdir=runs/adp [--config.x=y]

Flags only; the work is `train.train_and_evaluate(config, workdir)`. The config is locked, so a
misspelt `--config.key` is an error rather than a silently ignored setting.

Several processes (one per host, or several on one host): give each the same
--coordinator_address=HOST:PORT and --num_processes=N and its own --process_id=I, or none of them
under SLURM and on Cloud TPU VM pods (detected by JAX); launch/ has a script per platform.
"""

import logging as std_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kmcl_jax import allocator, checkpoint, distributed, train, workdir
from kmcl_jax.data import pipeline
from kmcl_jax.data.base import UnreadableImageError

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Training configuration file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])
_ALLOW_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Continue a workdir with deliberately changed settings (more '
  'steps, another evaluation schedule, a moved dataset.root); recorded in '
  'config_changes.jsonl. Changes of model, data, batch, optimizer, seed or loss are refused '
  'anyway.',
)
_RESUME_FALLBACK = flags.DEFINE_bool(
  'resume_fallback',
  False,
  'If the newest checkpoint cannot be restored, move it to '
  'checkpoints/unreadable/ and resume from the next newest one.',
)
_DEBUG = flags.DEFINE_bool('debug', False, 'Show the full traceback of an error.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'HOST:PORT of process 0, reachable from every process. With '
  '--num_processes and --process_id; all unset: detected under SLURM and on Cloud TPU VM '
  'pods, else one process.',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
  'coordinator_timeout_s',
  300,
  'Seconds to wait at start-up for the coordinator and all '
  'processes (nodes of a cluster job may start minutes apart).',
  lower_bound=1,
)


@flags.multi_flags_validator(['coordinator_address', 'num_processes', 'process_id'])
def _check_process_flags(values):
  error = distributed.flag_error(
    values['coordinator_address'], values['num_processes'], values['process_id']
  )
  if error:
    raise flags.ValidationError(error)
  return True


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax, grain and JAX (dozens of lines per checkpoint), and the
  tracebacks of their error lines (a failed save logs one per thread); --debug keeps those."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'jax'))
    if noisy and not _DEBUG.value:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= std_logging.WARNING or not noisy


def _user_error(error: BaseException) -> str | None:
  """The one-line message of an error a user can cause and fix; None for anything else."""
  if isinstance(
    error,
    (train.ConfigError, workdir.WorkdirError, checkpoint.CheckpointError, pipeline.InputError),
  ):
    return str(error)
  if isinstance(error, UnreadableImageError) or (
    isinstance(error, FileNotFoundError) and not error.filename
  ):
    return (
      f'{error}. Restore the file, or set dataset.skip_unreadable=True to skip and '
      'count unreadable images.'
    )
  if isinstance(error, OSError) and error.strerror:  # disk full, permissions, ...
    return f'{error.filename or "error"}: {error.strerror}'
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a misspelt or mistyped --config.key as one line, not a traceback.

  ml_collections raises AttributeError/KeyError/TypeError/ValueError (not a flags error) there.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if '--debug' in argv:
      raise
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = lines[0].strip('\'"') if lines else ''
    flag = next(
      (
        a.split('=')[0]
        for a in argv[1:]
        if a.startswith('--config.') and key and key in a.split('=')[0].split('.')
      ),
      None,
    )
    if flag:
      sys.exit(f'config error: {flag}: no such setting. {" ".join(lines[1:])}'.rstrip())
    sys.exit(f'config error: {" ".join(lines)}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before any library logs: the platform line below is the run's first.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before anything touches a device: jax.distributed must see the backends start.
  distributed.initialize(
    _COORDINATOR.value,
    _NUM_PROCESSES.value,
    _PROCESS_ID.value,
    timeout_s=_COORDINATOR_TIMEOUT.value,
  )
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # one log of the run: process 0's; others warn
  logging.info('%s; host malloc: %s', distributed.platform_line(), allocator.malloc_name())
  logging.info(
    '%s', distributed.batch_line(_CONFIG.value.batch_size, _CONFIG.value.eval_batch_size)
  )
  try:
    train.train_and_evaluate(
      _CONFIG.value,
      _WORKDIR.value,
      allow_config_change=_ALLOW_CHANGE.value,
      resume_fallback=_RESUME_FALLBACK.value,
    )
  except KeyboardInterrupt:
    if _DEBUG.value:
      raise
    print(
      f'Interrupted. Rerun the same command to resume from the last checkpoint in '
      f'{_WORKDIR.value}/checkpoints (if any).',
      file=sys.stderr,
    )
    sys.exit(130)
  except Exception as e:  # noqa: BLE001 - user errors become one line; others keep tracebacks
    message = _user_error(e)
    if message is None or _DEBUG.value:
      raise
    sys.exit(message)  # the message names the setting or file; a traceback would bury it


def run() -> None:
  """Console entry point `kmcl-train`."""
  allocator.run_on_tcmalloc()
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
