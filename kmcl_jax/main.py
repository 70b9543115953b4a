"""Command line: python -m kmcl_jax.main --config=configs/adp.py --workdir=runs/adp [--config.x=y]

Flags only; the work is `train.train_and_evaluate(config, workdir)`. The config is locked, so a
misspelt `--config.key` is an error rather than a silently ignored setting.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from kmcl_jax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                          lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax and grain (dozens of lines per checkpoint)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain'))
    return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info('JAX process %d/%d, local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.ConfigError as e:
    sys.exit(str(e))  # the message names the setting; a traceback would only bury it


if __name__ == '__main__':
  app.run(main)
