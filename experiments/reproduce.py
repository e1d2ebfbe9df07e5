"""The paper's CIFAR-10 comparison (Tables 1 and 3) at CPU scale.

Runs `ista_one_stage` (One-Stage ISTA), `nas_da` (Joint NAS+DA), `nas_hpo`
(Joint NAS+HPO), `sequential_dha` (Sequential DHA) and `dha` (DHA) with the
same network, data, budget and seeds, each (mode, seed) in its own workdir
`--out/<mode>_seed<seed>` through `python -m dha_jax.main` in a subprocess (a
fresh process per run keeps compile caches and memory apart; JAX's persistent
compilation cache is still shared). Then it writes

  experiments/RESULTS.md    the section between `<!-- reproduce:begin -->` and
                            `<!-- reproduce:end -->` (replaced; the rest of
                            the file is kept): test accuracy mean ± sd over
                            seeds, every seed's accuracy, wall time;
  experiments/results.json  the same, machine-readable, with every run;
  experiments/reproduce.png accuracy per mode, error bars and every seed.

Every run that was made is reported; a failed run is listed as failed and
left out of its mode's mean. Interrupt it at any time and rerun the same
command: finished runs are not retrained, an interrupted one resumes from
its last checkpoint. Each run records its flags (run_flags.json); a command
of another budget is refused before it reuses or reports such a run.

  python -m experiments.reproduce                      # the budget below
  python -m experiments.reproduce --steps 4 --train-examples 200 \
    --batch-size 16 --test-examples 200 --channels 4 --layers 2 --seeds 0 \
    --out /tmp/dha_smoke --report-dir /tmp/dha_smoke   # a smoke test

Base config: `configs/cifar10_cell.py` with these overrides: the image-folder
source on `--data`; `--train-examples` (a class-balanced subset, of which
`--val-ratio` is the HPO split) and `--test-examples`, at `--image-size`
pixels, with the paper's crop padding (4) and Cutout (16) scaled to that
size; C = `--channels`, `--layers` cells, no auxiliary head (at C = 8 its
128/768 channels would cost more than the network); `--steps` training steps
with `--batch-size`; `nas.search_epochs` = `--search-epochs`; an `eval`
record (clean train and HPO-split accuracy) every 5 epochs; and, as short
runs need, the short-run search dynamics of configs/default.py
(`SHORT_RUN_SEARCH`: α normalised per node, so that b keeps the
reference's scale, 1e-3; relative freezing; Adam on τ at most 1 nat from
uniform). Everything else is the config's (drop-path 0.2, cosine SGD from
0.025, a learned η annealed by the same cosine,
`optimizer.anneal_learned_lr`, the exact hypergradient, Eq. 4).
The one-stage modes search within their `--steps` (the search ends when every
node is frozen or after `--search-epochs`); the two-stage `sequential_dha`
first searches for `--search-epochs` and then trains its genotype from
scratch for `--steps`, as in the paper, whose tables charge it the longer
time.

Budget (default): a regime where generalisation, not optimisation speed,
decides. 600 training images (480 train + 120 HPO: 10 steps of 48 per
epoch), the full 10,000 test images, 16 px, C = 8, 3 cells, 600 steps (60
epochs), a search of at most 10 epochs (100 steps, a sixth of the run;
the paper's 120 of 600 epochs are a fifth), seeds 0, 1, 2: 15 runs. Why:
DA and HPO are for generalisation, so the networks must overfit without
them; the first reproduction (2 epochs of 4,500 images, RESULTS.md, its
history) underfit.
A pilot `ista_one_stage` run of this budget (2,000 test images) ended at
54.2 % clean train accuracy against 37.5 % on the HPO split and 36.6 % on
the test split, the HPO-split accuracy flat from epoch 10 on: it overfits.
At 16 px a DHA step costs a quarter of one at 32 px; the one-stage search
recovers its support once per epoch, and a new support is a new XLA
compilation (20-40 s each on this CPU), so the search's 10 epochs cost more
compile time than steps. The pilot took 15 min beside two other runs on the
2 cores.

`--steps`, `--train-examples`, `--test-examples`, `--image-size`,
`--channels`, `--layers`, `--modes` and `--seeds` shrink it (see the smoke
test above) or, on a faster machine, grow it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from configs import default as default_config
from dha_jax import plots
from dha_jax import train
from experiments.paths import CIFAR10_ZIP, EXPERIMENTS_DIR, REPO_ROOT

BASE_CONFIG = os.path.join(REPO_ROOT, 'configs', 'cifar10_cell.py')
DEFAULT_DATA = CIFAR10_ZIP
# Inside the repository: what finished runs leave (summary.json,
# metrics.jsonl, genotype.json, reproduce_wall.json, run_flags.json) is
# committed between sessions, so the comparison resumes on a fresh clone;
# checkpoints, models, plots, logs and config.json are ignored (.gitignore).
DEFAULT_OUT = os.path.join(EXPERIMENTS_DIR, 'reproduce_runs')

MODES = ('ista_one_stage', 'nas_da', 'nas_hpo', 'sequential_dha', 'dha')
PAPER_NAMES = {'ista_one_stage': 'One-Stage ISTA', 'nas_da': 'Joint NAS+DA',
               'nas_hpo': 'Joint NAS+HPO', 'sequential_dha': 'Sequential DHA',
               'dha': 'DHA'}
# CIFAR-10 top-1 % of the paper (Table 1: mean ± sd; Table 3: the ablations
# give a mean only) at full scale (C = 36, 20 cells, 600 epochs).
PAPER_ACCURACY = {'ista_one_stage': '97.64 ± 0.20', 'nas_da': '97.78',
                  'nas_hpo': '97.75', 'sequential_dha': '97.77 ± 0.14',
                  'dha': '98.11 ± 0.26'}

BEGIN_MARKER = '<!-- reproduce:begin -->'
END_MARKER = '<!-- reproduce:end -->'
RESULTS_MD = 'RESULTS.md'
RESULTS_JSON = 'results.json'
PLOT_FILE = 'reproduce.png'
CURVES_FILE = 'reproduce_curves.png'
WALL_FILE = 'reproduce_wall.json'
LOG_FILE = 'reproduce.log'
# A run's defining flags, written beside its results and committed with
# them: a finished or interrupted run is reused (or reported) only by a
# command that gives it the same flags. Path-valued fields are left out:
# the same data and genotype files may lie elsewhere on another machine.
FLAGS_FILE = 'run_flags.json'
PATH_FIELDS = ('dataset.path', 'model.genotype')
CONFIG_FLAG_PREFIX = '--config.'
PERCENT = 100.0
SECONDS_PER_MINUTE = 60.0
SECONDS_PER_HOUR = 3600.0
LOG_TAIL_LINES = 20

# Runs of minutes: log and checkpoint every minute or two (a kill loses at
# most that much); neither changes what is computed.
LOG_EVERY_STEPS = 10
CHECKPOINT_EVERY_STEPS = 20
# The learning curves (clean train and HPO-split accuracy) every this many
# epochs.
EVAL_EVERY_EPOCHS = 5
# The paper's CIFAR-10 augmentation is for 32-pixel images: its crop padding
# and Cutout scale with `--image-size`.
PAPER_IMAGE_SIZE, PAPER_PAD, PAPER_CUTOUT = 32, 4, 16
# DHA's search cost over One-Stage ISTA's in the paper's Table 1 (GPU days).
PAPER_COST_RATIO = 1.39


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every run gets: network, data and training length."""
  steps: int = 600
  search_epochs: int = 10
  batch_size: int = 48
  train_examples: int = 600
  test_examples: int = 10_000
  channels: int = 8
  layers: int = 3
  image_size: int = 16
  val_ratio: float = 0.2

  @property
  def pad(self) -> int:
    return PAPER_PAD * self.image_size // PAPER_IMAGE_SIZE

  @property
  def cutout(self) -> int:
    return PAPER_CUTOUT * self.image_size // PAPER_IMAGE_SIZE


def config_overrides(budget: Budget, data: str, mode: str, seed: int,
                     extra: Sequence[str] = ()) -> list[str]:
  """The `--config.x=y` flags of one run on top of configs/cifar10_cell.py.

  Args:
    budget: the shared budget.
    data: path of the CIFAR-10 image-folder zip (or directory).
    mode: one of `dha_jax.modes.MODES`.
    seed: the run's seed.
    extra: more 'field=value' overrides (`--set`), applied last.

  Returns:
    Command-line flags for `python -m dha_jax.main`.
  """
  fields = {
      'mode': mode, 'seed': seed,
      'dataset.source': 'image_folder', 'dataset.path': data,
      'dataset.max_train_examples': budget.train_examples,
      'dataset.max_test_examples': budget.test_examples,
      'dataset.image_size': budget.image_size,
      'dataset.val_ratio': budget.val_ratio,
      'preprocess.pad': budget.pad, 'preprocess.cutout_size': budget.cutout,
      'model.channels': budget.channels, 'model.layers': budget.layers,
      'model.auxiliary': False,
      'num_train_steps': budget.steps, 'batch_size': budget.batch_size,
      'nas.search_epochs': budget.search_epochs,
      **default_config.SHORT_RUN_SEARCH,
      'log_every_steps': LOG_EVERY_STEPS,
      'checkpoint_every_steps': CHECKPOINT_EVERY_STEPS,
      'eval_every_epochs': EVAL_EVERY_EPOCHS}
  flags = [f'--config.{k}={v}' for k, v in fields.items()]
  return flags + [f'--config.{e}' for e in extra]


def workdir_of(out: str, mode: str, seed: int) -> str:
  return os.path.join(out, f'{mode}_seed{seed}')


def read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def clock(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


def _finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, train.SUMMARY_FILE))


def defining_flags(command: Sequence[str]) -> list[str]:
  """The `--config.field=value` flags of `command`, path fields left out."""
  return [a for a in command if a.startswith(CONFIG_FLAG_PREFIX)
          and a[len(CONFIG_FLAG_PREFIX):].split('=', 1)[0] not in PATH_FIELDS]


def reuse_conflict(workdir: str, command: Sequence[str]) -> str | None:
  """None, or why the run in `workdir` was made by other flags than
  `command`'s (from its FLAGS_FILE; a run without one is not checked)."""
  recorded = read_json(os.path.join(workdir, FLAGS_FILE))
  if recorded is None or recorded['flags'] == defining_flags(command):
    return None
  theirs, ours = set(recorded['flags']), set(defining_flags(command))
  return (f'{os.path.relpath(workdir)} holds a run made with '
          f'{sorted(theirs - ours)} where this command gives '
          f'{sorted(ours - theirs)}')


def refuse_reuse(conflicts: Sequence[str]) -> int:
  """Prints the runs whose workdirs hold other budgets; returns 2."""
  print('error: these workdirs hold runs of another budget, which this '
        'command would reuse or report as its own:\n  '
        + '\n  '.join(conflicts)
        + '\nPass the flags that made them, or a new --out.', file=sys.stderr)
  return 2


def run_one(workdir: str, command: Sequence[str],
            env: dict[str, str] | None = None) -> int:
  """Runs one (mode, seed) to its end, appending its output to its log.

  The process's wall time is added to workdir/reproduce_wall.json (also when
  interrupted), so a resumed run reports the time of all its sessions; a run
  that was already finished adds nothing. The command's defining flags are
  recorded in workdir/run_flags.json on the first session.

  Args:
    workdir: the run's workdir.
    command: the command line.
    env: the process's environment (None: this process's).

  Returns:
    The exit status of the run.

  Raises:
    ValueError: the workdir holds a run made with other flags.
  """
  os.makedirs(workdir, exist_ok=True)
  conflict = reuse_conflict(workdir, command)
  if conflict is not None:
    raise ValueError(conflict)
  flags_path = os.path.join(workdir, FLAGS_FILE)
  if not os.path.exists(flags_path):
    train.write_json_atomic(flags_path, {'flags': defining_flags(command)})
  finished = _finished(workdir)
  start, rc = time.time(), None
  try:
    with open(os.path.join(workdir, LOG_FILE), 'a') as log:
      log.write(f'$ {" ".join(command)}\n')
      log.flush()
      rc = subprocess.run(command, cwd=REPO_ROOT, stdout=log,
                          stderr=subprocess.STDOUT, check=False,
                          env=env).returncode
  finally:
    if not finished:
      path = os.path.join(workdir, WALL_FILE)
      wall = read_json(path) or {'seconds': 0.0, 'sessions': 0}
      train.write_json_atomic(path, {
          'seconds': wall['seconds'] + time.time() - start,
          'sessions': wall['sessions'] + 1, 'last_rc': rc})
  return rc


def log_tail(workdir: str, lines: int = LOG_TAIL_LINES) -> str:
  path = os.path.join(workdir, LOG_FILE)
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    return ''.join(f.readlines()[-lines:])


def search_outcome(workdir: str) -> dict[str, Any]:
  """What the searches of a finished run learned, from its metrics.jsonl.

  Returns:
    `tau_entropy`: τ's entropy (nats) at the last DA epoch (None without DA);
    `support_changed`: whether the final support differs from the initial
    one (None without NAS); `curve`: the 'eval' records (epoch,
    train_accuracy, hpo_accuracy).
  """
  records = train.read_metrics(workdir)
  da = [r for r in records if r['phase'] == 'da_epoch']
  nas = [r for r in records if r['phase'] == 'nas_epoch']
  return {
      'tau_entropy': da[-1]['entropy'] if da else None,
      'support_changed': (nas[-1]['pairs_changed_from_start'] > 0
                          if nas else None),
      'curve': [{k: r[k] for k in ('epoch', 'train_accuracy', 'hpo_accuracy')}
                for r in records if r['phase'] == 'eval']}


def collect(out: str, modes: Sequence[str], seeds: Sequence[int]
            ) -> list[dict[str, Any]]:
  """One record per (mode, seed): its summary, or why it has none.

  Returns:
    Dicts with `mode`, `seed`, `workdir`, `status` ('finished', 'failed',
    'interrupted' or 'not run'), and for finished runs `test_accuracy`,
    `hpo_accuracy`, `train_accuracy` (clean, on the training split),
    `wall_seconds` (all sessions), `train_steps`, `search_steps`,
    `param_count`, `genotype` and `search_outcome`'s keys.
  """
  records = []
  for mode in modes:
    for seed in seeds:
      workdir = workdir_of(out, mode, seed)
      summary = read_json(os.path.join(workdir, train.SUMMARY_FILE))
      wall = read_json(os.path.join(workdir, WALL_FILE))
      # Relative to the repository: results name no path of this machine.
      record = {'mode': mode, 'seed': seed,
                'workdir': os.path.relpath(workdir, REPO_ROOT)}
      if summary is not None:
        record.update(
            status='finished', test_accuracy=summary['test_accuracy'],
            hpo_accuracy=summary['hpo_accuracy'],
            train_accuracy=summary.get('train_accuracy'),
            wall_seconds=(wall['seconds'] if wall
                          else summary['wall_seconds']),
            train_steps=summary['train_steps'],
            search_steps=summary['search_steps'],
            param_count=summary['param_count'],
            genotype=summary['genotype'], **search_outcome(workdir))
      elif wall is not None:
        # No exit status: the last session was interrupted (it resumes).
        record.update(status=('interrupted' if wall['last_rc'] is None
                              else 'failed'),
                      exit_status=wall['last_rc'],
                      wall_seconds=wall['seconds'])
      else:
        record.update(status='not run')
      records.append(record)
  return records


def summarize(records: Sequence[dict[str, Any]], modes: Sequence[str]
              ) -> dict[str, dict[str, Any]]:
  """Per mode: finished runs' accuracy mean and sample sd, mean wall time.

  The standard deviation is the sample one (n - 1); None with one run.
  """
  def mean_of(done, key):
    values = [r[key] for r in done if r.get(key) is not None]
    return statistics.fmean(values) if values else None

  out = {}
  for mode in modes:
    done = [r for r in records
            if r['mode'] == mode and r['status'] == 'finished']
    acc = [r['test_accuracy'] for r in done]
    changed = [r['support_changed'] for r in done
               if r.get('support_changed') is not None]
    out[mode] = {
        'runs': len(done),
        'accuracies': acc,
        'mean_accuracy': statistics.fmean(acc) if acc else None,
        'sd_accuracy': statistics.stdev(acc) if len(acc) > 1 else None,
        'mean_train_accuracy': mean_of(done, 'train_accuracy'),
        'mean_hpo_accuracy': mean_of(done, 'hpo_accuracy'),
        'mean_tau_entropy': mean_of(done, 'tau_entropy'),
        'support_changed': (f'{sum(changed)} of {len(changed)}' if changed
                            else None),
        'mean_wall_seconds': (statistics.fmean(r['wall_seconds'] for r in done)
                              if done else None),
        'mean_search_steps': (statistics.fmean(r['search_steps'] for r in done)
                              if done else None),
        'mean_param_count': (statistics.fmean(r['param_count'] for r in done)
                             if done else None)}
  return out


def format_mean_sd(values: Sequence[float], scale: float = PERCENT,
                   digits: int = 2) -> str:
  """'mean ± sd' of `values` × scale (sample sd; 'mean (n=1)' for one)."""
  if not values:
    return '—'
  mean = statistics.fmean(values) * scale
  if len(values) == 1:
    return f'{mean:.{digits}f} (n=1)'
  return f'{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}'


def _optional(value: float | None, scale: float, digits: int) -> str:
  return '—' if value is None else f'{value * scale:.{digits}f}'


def cost_ratio(records: Sequence[dict[str, Any]]) -> float | None:
  """Mean wall time per run of `dha` over that of `ista_one_stage` (the
  paper's Table 1 compares the same two: 1.39)."""
  stats = summarize(records, ('dha', 'ista_one_stage'))
  dha, ista = (stats[m]['mean_wall_seconds'] for m in ('dha', 'ista_one_stage'))
  return None if dha is None or ista is None else dha / ista


def _seed_cell(record: dict[str, Any]) -> str:
  if record['status'] == 'finished':
    return f"{record['test_accuracy'] * PERCENT:.2f}"
  if record['status'] == 'failed':
    return f"failed (exit {record['exit_status']})"
  return record['status']


def format_table(records: Sequence[dict[str, Any]], modes: Sequence[str],
                 seeds: Sequence[int]) -> str:
  """The Markdown table: one row per mode, every seed's accuracy listed."""
  head = (['method', 'mode', 'test acc. % (mean ± sd)']
          + [f'seed {s}' for s in seeds]
          + ['HPO split acc. %', 'train acc. % (clean)', 'τ entropy (nats)',
             'support changed', 'wall / run (min)', 'search steps', 'params',
             'paper (full scale)'])
  rows = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  stats = summarize(records, modes)
  for mode in modes:
    by_seed = {r['seed']: r for r in records if r['mode'] == mode}
    s = stats[mode]
    done = s['runs'] > 0
    cells = ([PAPER_NAMES.get(mode, mode), f'`{mode}`',
              format_mean_sd(s['accuracies'])]
             + [_seed_cell(by_seed[seed]) for seed in seeds]
             + [_optional(s['mean_hpo_accuracy'], PERCENT, 2),
                _optional(s['mean_train_accuracy'], PERCENT, 2),
                _optional(s['mean_tau_entropy'], 1.0, 3),
                s['support_changed'] or '—',
                f"{s['mean_wall_seconds'] / SECONDS_PER_MINUTE:.1f}"
                if done else '—',
                f"{s['mean_search_steps']:.0f}" if done else '—',
                f"{s['mean_param_count']:,.0f}" if done else '—',
                PAPER_ACCURACY.get(mode, '—')])
    rows.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def replace_section(text: str, body: str, begin: str = BEGIN_MARKER,
                    end: str = END_MARKER) -> str:
  """`text` with the part between the markers replaced by `body`.

  Text outside the markers is kept byte for byte; without markers the section
  is appended at the end.

  Raises:
    ValueError: when the markers are not one well-ordered pair.
  """
  section = f'{begin}\n{body.strip()}\n{end}'
  if text.count(begin) != text.count(end) or text.count(begin) > 1:
    raise ValueError(f'Expected at most one {begin} ... {end} pair; fix the '
                     'markers by hand and rerun.')
  if begin not in text:
    sep = '' if not text or text.endswith('\n\n') else (
        '\n' if text.endswith('\n') else '\n\n')
    return f'{text}{sep}{section}\n'
  head, rest = text.split(begin, 1)
  if end not in rest:
    raise ValueError(f'{end} comes before {begin}; fix the markers by hand '
                     'and rerun.')
  return head + section + rest.split(end, 1)[1]


def machine() -> str:
  try:
    jax_version = importlib.metadata.version('jax')
  except importlib.metadata.PackageNotFoundError:
    jax_version = 'unknown'
  return (f'{platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} CPU cores, jax {jax_version}')


def report_body(records: Sequence[dict[str, Any]], args: argparse.Namespace,
                budget: Budget) -> str:
  """The RESULTS.md section: what ran, the table, the plot, caveats."""
  finished = [r for r in records if r['status'] == 'finished']
  total = sum(r.get('wall_seconds', 0.0) for r in records)
  lines = [
      '### CIFAR-10: DHA against its ablations at CPU scale',
      '',
      f'Written by `python -m experiments.reproduce {" ".join(args.argv)}`'
      .rstrip() + f' on {datetime.date.today().isoformat()} ({machine()}).',
      f'{len(finished)} of {len(records)} runs finished, '
      f'{total / SECONDS_PER_HOUR:.2f} h of run wall time in all.',
      '',
      f'Budget, identical for every mode: {budget.train_examples:,} CIFAR-10 '
      f'training images (the HPO split {budget.val_ratio:.0%} of them) and '
      f'{budget.test_examples:,} test images at {budget.image_size} px (crop '
      f'padding {budget.pad}, Cutout {budget.cutout}: the paper\'s, scaled '
      'to the image size), a DARTS network of '
      f'C = {budget.channels} and {budget.layers} cells (no auxiliary head), '
      f'{budget.steps} training steps of batch {budget.batch_size}, a search '
      f'of at most {budget.search_epochs} epoch(s) (the two-stage '
      '`sequential_dha` searches first, then trains its genotype from '
      f'scratch for the {budget.steps} steps); `configs/cifar10_cell.py` '
      'otherwise. Test accuracy of the final network; the sd is the sample '
      'sd over seeds. The HPO split and clean train accuracies are means '
      'over seeds, measured on the final network without augmentation; τ\'s '
      'entropy is the last DA epoch\'s (uniform: 5.278); "support changed" '
      'counts the seeds whose final support differs from the initial one. '
      'Wall time is the whole process (data loading and compilation '
      'included).',
      '',
      format_table(records, args.modes, args.seeds),
      '',
      _cost_line(records),
      '',
      f'![test accuracy per mode]({PLOT_FILE})',
      f'![learning curves, first seed of each mode]({CURVES_FILE})',
      '',
      'The paper column is CIFAR-10 at full scale (C = 36, 20 cells, 600 '
      'epochs; Tables 1 and 3) and is not comparable in absolute terms: '
      'these runs are minutes long.',
  ]
  failed = [r for r in records if r['status'] != 'finished']
  if failed:
    lines += ['', 'Unfinished runs (logs in their workdirs): '
              + ', '.join(f"`{r['workdir']}` ({r['status']})" for r in failed)
              + '.']
  return '\n'.join(lines)


def _cost_line(records: Sequence[dict[str, Any]]) -> str:
  ratio = cost_ratio(records)
  if ratio is None:
    return ('Cost ratio DHA / One-Stage ISTA: not measured (a mode has no '
            f'finished run); the paper\'s is {PAPER_COST_RATIO}.')
  return (f'Cost ratio DHA / One-Stage ISTA (mean wall time per run): '
          f'{ratio:.2f}, against the paper\'s {PAPER_COST_RATIO} (Table 1, '
          'GPU days).')


def plot_curves(records: Sequence[dict[str, Any]], modes: Sequence[str],
                path: str) -> None:
  """Clean train and HPO-split accuracy against the epoch, one panel per
  mode, of the first finished seed of each mode."""
  fig, axes = plots.plt.subplots(1, len(modes), sharey=True, squeeze=False,
                                 figsize=(2.6 * len(modes), 3.0))
  for ax, mode in zip(axes[0], modes):
    done = [r for r in records
            if r['mode'] == mode and r['status'] == 'finished']
    ax.set_xlabel('epoch')
    if not done or not done[0]['curve']:
      ax.set_title(PAPER_NAMES.get(mode, mode), fontsize=9)
      continue
    ax.set_title(f"{PAPER_NAMES.get(mode, mode)}, seed {done[0]['seed']}",
                 fontsize=9)
    curve = done[0]['curve']
    for key, label in (('train_accuracy', 'train (clean)'),
                       ('hpo_accuracy', 'HPO split')):
      ax.plot([p['epoch'] for p in curve],
              [p[key] * PERCENT for p in curve], marker='.', label=label)
  axes[0, 0].set_ylabel('accuracy (%)')
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  train.save_figure(fig, path)


def plot(records: Sequence[dict[str, Any]], modes: Sequence[str],
         path: str) -> None:
  """Accuracy per mode: mean ± sd error bars and every seed as a cross."""
  stats = summarize(records, modes)
  fig, ax = plots.plt.subplots(figsize=plots.FIGSIZE)
  for i, mode in enumerate(modes):
    s = stats[mode]
    if not s['runs']:
      continue
    ax.errorbar(i, s['mean_accuracy'] * PERCENT,
                yerr=(s['sd_accuracy'] or 0.0) * PERCENT, fmt='o',
                capsize=6, color='C0', markersize=8)
    ax.scatter([i] * s['runs'], [a * PERCENT for a in s['accuracies']],
               color='C1', marker='x', zorder=3)
  ax.set_xticks(range(len(modes)), [PAPER_NAMES.get(m, m) for m in modes],
                rotation=15)
  ax.set_ylabel('test accuracy (%)')
  ax.set_title('CIFAR-10 at CPU scale: mean ± sd (o), seeds (x)')
  fig.tight_layout()
  train.save_figure(fig, path)


def write_reports(records: Sequence[dict[str, Any]],
                  args: argparse.Namespace, budget: Budget) -> None:
  """RESULTS.md (its section), results.json and the plot in report_dir."""
  os.makedirs(args.report_dir, exist_ok=True)
  md_path = os.path.join(args.report_dir, RESULTS_MD)
  text = ''
  if os.path.exists(md_path):
    with open(md_path) as f:
      text = f.read()
  text = replace_section(text, report_body(records, args, budget))
  train.write_text_atomic(md_path, text)
  train.write_json_atomic(os.path.join(args.report_dir, RESULTS_JSON), {
      'command': ['python', '-m', 'experiments.reproduce', *args.argv],
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': machine(), 'budget': dataclasses.asdict(budget),
      'data': os.path.relpath(args.data, REPO_ROOT), 'overrides': args.set, 'modes': list(args.modes),
      'seeds': list(args.seeds), 'summary': summarize(records, args.modes),
      'runs': list(records)})
  plot(records, args.modes, os.path.join(args.report_dir, PLOT_FILE))
  plot_curves(records, args.modes, os.path.join(args.report_dir, CURVES_FILE))


def _int_list(text: str) -> list[int]:
  return [int(s) for s in text.split(',') if s.strip()]


def _mode_list(text: str) -> list[str]:
  modes = [m.strip() for m in text.split(',') if m.strip()]
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    raise argparse.ArgumentTypeError(
        f'unknown modes {unknown}; choose from {",".join(MODES)}')
  return modes


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  defaults = Budget()
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', default=DEFAULT_DATA,
                      help='CIFAR-10 image-folder zip or directory')
  parser.add_argument('--out', default=DEFAULT_OUT,
                      help='parent of the runs\' workdirs (resumable)')
  parser.add_argument('--report-dir', default=EXPERIMENTS_DIR,
                      help=f'where {RESULTS_MD}, {RESULTS_JSON} and '
                      f'{PLOT_FILE} go')
  parser.add_argument('--modes', type=_mode_list, default=list(MODES),
                      help='comma-separated modes')
  parser.add_argument('--seeds', type=_int_list, default=[0, 1, 2],
                      help='comma-separated seeds')
  parser.add_argument('--steps', type=int, default=defaults.steps)
  parser.add_argument('--search-epochs', type=int,
                      default=defaults.search_epochs)
  parser.add_argument('--batch-size', type=int, default=defaults.batch_size)
  parser.add_argument('--train-examples', type=int,
                      default=defaults.train_examples)
  parser.add_argument('--test-examples', type=int,
                      default=defaults.test_examples)
  parser.add_argument('--channels', type=int, default=defaults.channels)
  parser.add_argument('--layers', type=int, default=defaults.layers)
  parser.add_argument('--image-size', type=int, default=defaults.image_size,
                      help='pixels; crop padding and Cutout scale with it')
  parser.add_argument('--val-ratio', type=float, default=defaults.val_ratio,
                      help='share of the training images in the HPO split')
  parser.add_argument('--set', action='append', default=[],
                      metavar='FIELD=VALUE',
                      help='another config override, e.g. hpo.mode=online '
                      '(repeatable; the same for every run)')
  parser.add_argument('--report-only', action='store_true',
                      help='write the reports from the workdirs, run nothing')
  args = parser.parse_args(argv)
  args.argv = list(argv)
  args.data = os.path.abspath(args.data)
  args.out = os.path.abspath(args.out)
  return args


def run_command(args: argparse.Namespace, budget: Budget, mode: str,
                seed: int) -> list[str]:
  """The `dha_jax.main` command line of one (mode, seed)."""
  return ([sys.executable, '-m', 'dha_jax.main', f'--config={BASE_CONFIG}',
           f'--workdir={workdir_of(args.out, mode, seed)}']
          + config_overrides(budget, args.data, mode, seed, args.set))


def run_all(jobs: Sequence[tuple[str, int]], args: argparse.Namespace,
            budget: Budget) -> None:
  """Runs every (mode, seed) in turn, printing progress and an ETA."""
  start, durations = time.time(), []
  for i, (mode, seed) in enumerate(jobs, 1):
    workdir = workdir_of(args.out, mode, seed)
    command = run_command(args, budget, mode, seed)
    pending = sum(not _finished(workdir_of(args.out, m, s))
                  for m, s in jobs[i - 1:])
    eta = (clock(statistics.fmean(durations) * pending) if durations
           else '?')
    print(f'[run {i}/{len(jobs)}] {mode} seed {seed}  (elapsed '
          f'{clock(time.time() - start)}, ETA {eta})  {workdir}', flush=True)
    was_finished = _finished(workdir)
    run_start = time.time()
    rc = run_one(workdir, command)
    if rc != 0:
      print(f'  FAILED (exit {rc}); the end of {workdir}/{LOG_FILE}:\n'
            f'{log_tail(workdir)}', flush=True)
      continue
    summary = read_json(os.path.join(workdir, train.SUMMARY_FILE))
    if not was_finished:
      durations.append(time.time() - run_start)
    print(f"  {'already finished' if was_finished else 'done'}: test "
          f"accuracy {summary['test_accuracy']:.4f} "
          f'({clock(time.time() - run_start)})', flush=True)
  if jobs:
    print(f'{len(jobs)} runs done in {clock(time.time() - start)}.')



def _interrupt(signum: int, frame: Any) -> None:
  del frame
  raise KeyboardInterrupt(f'signal {signum}')


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  # `kill PID` stops the running run as Ctrl-C does (its wall time is kept;
  # the run resumes from its last checkpoint next time).
  signal.signal(signal.SIGTERM, _interrupt)
  budget = Budget(steps=args.steps, search_epochs=args.search_epochs,
                  batch_size=args.batch_size,
                  train_examples=args.train_examples,
                  test_examples=args.test_examples, channels=args.channels,
                  layers=args.layers, image_size=args.image_size,
                  val_ratio=args.val_ratio)
  if not args.report_only and not os.path.exists(args.data):
    print(f'error: no CIFAR-10 data at {args.data}; pass --data PATH of the '
          'image-folder zip (train/<class>/*.jpg, test/<class>/*.jpg).',
          file=sys.stderr)
    return 1
  # Seed-major order: should the budget run out, every mode has as many
  # finished seeds as any other (less one), so the comparison stays fair.
  everything = [(m, s) for s in args.seeds for m in args.modes]
  conflicts = [c for c in (
      reuse_conflict(workdir_of(args.out, m, s),
                     run_command(args, budget, m, s)) for m, s in everything)
               if c is not None]
  if conflicts:
    return refuse_reuse(conflicts)
  jobs = [] if args.report_only else everything
  try:
    run_all(jobs, args, budget)
  except KeyboardInterrupt:
    print('Interrupted: rerun the same command to resume.', file=sys.stderr)
    return 130
  records = collect(args.out, args.modes, args.seeds)
  write_reports(records, args, budget)
  print(format_table(records, args.modes, args.seeds))
  print(f'Reports in {args.report_dir}: {RESULTS_MD}, {RESULTS_JSON}, '
        f'{PLOT_FILE}, {CURVES_FILE}.')
  return 0 if all(r['status'] == 'finished' for r in records) else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
