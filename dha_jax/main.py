"""Command line: `python -m dha_jax.main --config=configs/default.py --workdir=DIR`.

Fields of the config are overridden with `--config.field=value`. Everything
else lives in `dha_jax.train`, which Colab notebooks import directly.
"""

import ast
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dha_jax import data
from dha_jax import host_memory
from dha_jax import parallel
from dha_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and '
                    'results; rerunning on it resumes.')
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=True)
flags.DEFINE_bool('retain_host_memory', False, 'Keep freed host memory in the '
                  'process (glibc malloc settings, dha_jax/host_memory.py) '
                  'so that XLA:CPU does not page-fault each step\'s buffers '
                  'in anew: CPU steps up to 2x faster, but with one malloc '
                  'arena XLA compiles 3-4x slower on several threads, so it '
                  'pays only in long runs that rarely recompile.')
flags.DEFINE_bool('distributed', False, 'Run as one process of a multi-process '
                  'job (TPU pod slice, several GPU hosts): initialises '
                  'jax.distributed. On Cloud TPU, SLURM and Open MPI the '
                  'three flags below are detected and may be left unset.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, the '
                    'same on every process (implies --distributed).')
flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
flags.DEFINE_integer('process_id', None, 'This process, 0 to '
                     'num_processes - 1; process 0 writes the files.')
flags.mark_flags_as_required(['config', 'workdir'])
# The exit status of a bad command line (the shell's convention for misuse).
USAGE_EXIT_CODE = 2


def check_process_flags() -> None:
  """Refuses --num_processes / --process_id without --distributed: alone
  they would leave every process thinking it is process 0, all writing the
  workdir."""
  given = [f'--{name}' for name in ('num_processes', 'process_id')
           if FLAGS[name].value is not None]
  if given and not (FLAGS.distributed or FLAGS.coordinator_address):
    raise flags.ValidationError(
        f'{" and ".join(given)} describe a multi-process job: add '
        '--distributed (and --coordinator_address where it is not '
        'detected), or drop them to run one process.')


def initialize_distributed() -> None:
  """Joins the multi-process job the flags describe (before any JAX work)."""
  if not (FLAGS.distributed or FLAGS.coordinator_address):
    return
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes,
                             process_id=FLAGS.process_id)


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


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags; a bad flag or config field is one line and exit 2."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises here
    check_process_flags()
    return remaining
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError,
          OSError) as e:
    # A misspelt --config.field raises from inside the config override with
    # the suggestion ('Did you mean ...') as a quoted message.
    message = str(e)
    try:
      message = ast.literal_eval(message)
    except (ValueError, SyntaxError):
      pass
    message = ' '.join(str(message).split())
    print(f'error: {message}', file=sys.stderr)
    print(f'Usage: python -m dha_jax.main --config=configs/<name>.py '
          '--workdir=DIR [--config.field=value ...]', file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def warn_ignored_overrides(argv: list[str]) -> None:
  """Warns about `--config.field=...` flags that this mode ignores."""
  try:
    ignored = train.ignored_fields(FLAGS.config)
  except ValueError:
    return  # an invalid config: train_and_evaluate says why
  for arg in argv:
    field = arg.removeprefix('--config.').split('=', 1)[0]
    if arg.startswith('--config.') and field in ignored:
      message = (f'--config.{field} has no effect in mode '
                 f'{FLAGS.config.mode!r}; it is set by {ignored[field]}.')
      logging.warning('%s', message)
      print(f'warning: {message}', file=sys.stderr)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Before JAX starts its backend's threads.
  if FLAGS.retain_host_memory and not host_memory.retain_freed_memory():
    message = ('--retain_host_memory has no effect here: the C library is '
               'not glibc, whose malloc settings it changes.')
    logging.warning('%s', message)
    print(f'warning: {message}', file=sys.stderr)
  initialize_distributed()
  logging.info('JAX %s on %d %s device(s), %d process(es); this is process '
               '%d.', jax.__version__, jax.device_count(),
               jax.default_backend(), jax.process_count(), jax.process_index())
  enable_compilation_cache(FLAGS.config.compilation_cache_dir)
  warn_ignored_overrides(sys.argv)
  try:
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (data.DataError, train.RunError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(getattr(e, 'exit_code', 1))
  if parallel.is_primary_process():
    print(f"test_accuracy {summary['test_accuracy']:.4f} "
          f"(workdir {FLAGS.workdir})")


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
