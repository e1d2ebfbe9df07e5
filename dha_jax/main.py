"""Command line: `python -m dha_jax.main --config=configs/default.py --workdir=DIR`.

Fields of the config are overridden with `--config.field=value`. Everything
else lives in `dha_jax.train`, which Colab notebooks import directly.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dha_jax import data
from dha_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and '
                    'results; rerunning on it resumes.')
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def enable_compilation_cache(cache_dir: str) -> None:
  """Turns on JAX's persistent compilation cache in `cache_dir`."""
  if not cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


class _QuietLibraries(std_logging.Filter):
  """Drops the checkpoint library's INFO chatter from the run's log."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return ('orbax' not in record.pathname
            or record.levelno >= std_logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info('JAX %s on %d %s device(s).', jax.__version__,
               jax.device_count(), jax.default_backend())
  enable_compilation_cache(FLAGS.config.compilation_cache_dir)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (data.DataError, train.RunError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f"test_accuracy {summary['test_accuracy']:.4f} "
        f"(workdir {FLAGS.workdir})")


if __name__ == '__main__':
  app.run(main)
