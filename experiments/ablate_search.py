"""Does each search beat its baseline? NAS, DA and HPO under one budget.

Each learned component is compared with the baseline it replaces, with
everything else identical (data, network width and depth, steps, seeds,
`configs/default.py`'s short-run search dynamics):

  NAS  the genotype that `ista_one_stage` searched, trained from scratch in
       `train` mode, against 5 genotypes drawn at random from the same space
       (`search_space.random_genotype`), each trained the same way;
  DA   `nas_da` (τ learned) against `nas_da` with τ frozen at uniform
       (`da.policy_lr=0`: uniform RandAugment over pairs) and against
       `ista_one_stage` (no DA);
  HPO  `nas_hpo` (η learned) against `ista_one_stage` (the config's fixed
       schedule: constant during the search, cosine after it); and, as NAS
       against random genotypes, from 3 starts η₀ drawn log-uniformly from
       HPO's bounds: `nas_hpo` starting at η₀ (annealed by the schedule)
       against `ista_one_stage` with η₀ as its fixed schedule, pair by pair.

More arms change the search dynamics, against the same baselines:
`search_heldout` / `searched_heldout` (b learns on the held-out batch),
`da_slow` and `da_fast` (τ's Adam rate 0.01 and 0.05 around the config's
0.02; 0.01 was the config's when the campaign began; `da_fast` without the
config's `da.max_kl_from_uniform`), `hpo_annealed`
(`optimizer.anneal_learned_lr`: η times the schedule's multiplier),
`hpo_exact` (annealed, with the exact arm's settings below),
`hpo_eta_fast` (from the drawn η₀, η's rate `hpo.meta_lr` 3x the config's),
`hpo_eta_exact` (the same with the paper's exact hypergradient, Eq. 4
on the HPO batch, instead of the config's online one) and `hpo_eta_exact_lr`
(the exact arm learning the learning rate alone, weight decay pinned at η₀).

Datasets: scikit-learn's digits (offline), a class-balanced CIFAR-10
subset from the image-folder zip (`--cifar10`, default
experiments/paths.CIFAR10_ZIP), and `digits_small`: 200 digits, half of
them the HPO split, on which the network overfits its 100 training images
(chosen because uniform DA beat no DA there on the HPO split of a pilot
seed, 9); only the DA, HPO and NAS arms with the config's dynamics run
there (`DATASET_ARMS`). Seeds 0, 1, 2. Every run is
`python -m dha_jax.main` in its own process and workdir,
`--out/<dataset>/seed<seed>/<arm>`; a finished run (summary.json) is never
rerun and an interrupted one resumes from its checkpoint, so the command can
be repeated across sessions until everything ran. A run records its flags
(run_flags.json), and a command of another budget is refused before it
reuses or reports such a run (the runs made before that record are not
checked). Order: dataset, then seed,
then arm, so that a cut-short campaign has whole seeds.

Nothing is selected on the test set: every arm is a fixed setting, and the
summary reports accuracy on the HPO split (held out from training) beside
the test accuracy; changes to the search dynamics are chosen on the former.

  python -m experiments.ablate_search                  # the whole campaign
  python -m experiments.ablate_search --datasets cifar10 --seeds 3,4 \
    --arms fixed_eta,hpo_eta_exact --report-dir /tmp/replication  # some arms
  python -m experiments.ablate_search --datasets digits --seeds 0 \
    --digits-steps 6 --search-epochs 1 --random-genotypes 1 \
    --set dataset.image_size=8 --set model.channels=4 --set model.layers=2 \
    --out /tmp/ablate_smoke --report-dir /tmp/ablate_smoke  # a smoke test

Writes the section between `<!-- ablate:begin -->` and `<!-- ablate:end -->`
of `--report-dir`/RESULTS.md and `ablate_search.json` (every run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Sequence

import numpy as np
from scipy import stats

from dha_jax import hpo
from dha_jax import train
from dha_jax.nas import search_space
from experiments import benchlib
from experiments import reproduce
from experiments.paths import CIFAR10_ZIP, EXPERIMENTS_DIR, REPO_ROOT

BASE_CONFIG = os.path.join(REPO_ROOT, 'configs', 'default.py')
# Inside the repository: the results of finished runs (summary.json,
# metrics.jsonl, genotype.json, run_flags.json and the random genotypes) are
# committed between sessions, so a campaign resumes on a fresh clone;
# checkpoints, models, plots, logs and config.json (which hold local paths)
# are ignored (.gitignore), so an unfinished run restarts from scratch there.
DEFAULT_OUT = os.path.join(EXPERIMENTS_DIR, 'ablate_search_runs')
BEGIN_MARKER = '<!-- ablate:begin -->'
END_MARKER = '<!-- ablate:end -->'
RESULTS_JSON = 'ablate_search.json'
DIGITS_SMALL = 'digits_small'
DATASETS = ('digits', 'cifar10', DIGITS_SMALL)
# digits_small holds out half its images: an HPO split as large as the
# training split, so that choices on it, and Eq. 4's batches drawn from it,
# are not dominated by a handful of images.
DIGITS_SMALL_VAL_RATIO = 0.5
PERCENT = 100.0
# Confidence of the t interval of a paired mean difference.
CONFIDENCE = 0.95
LOG_EVERY_STEPS = 20
CHECKPOINT_EVERY_STEPS = 50

SEARCH, SEARCHED = 'search', 'searched'
DA_LEARNED, DA_UNIFORM = 'da_learned', 'da_uniform'
HPO_LEARNED = 'hpo_learned'
RANDOM_PREFIX = 'random'
# Changes of the search dynamics tried when a learned component did not
# beat its baseline (experiments/RESULTS.md says why each was chosen).
SEARCH_HELDOUT, SEARCHED_HELDOUT = 'search_heldout', 'searched_heldout'
DA_SLOW, DA_FAST = 'da_slow', 'da_fast'
HPO_ANNEALED, HPO_EXACT = 'hpo_annealed', 'hpo_exact'
# HPO against a fixed η from the same drawn start (`drawn_eta`); the fast
# arm with 3x the config's rate of η (hpo.meta_lr 0.01), the exact arm also
# with the paper's hypergradient (Eq. 4 on the HPO batch) instead of the
# config's online one; the exact-lr arm learns the learning rate alone
# (weight decay pinned at η₀ by its bounds).
FIXED_ETA_PREFIX, HPO_ETA_PREFIX = 'fixed_eta', 'hpo_eta'
HPO_ETA_FAST_PREFIX, HPO_ETA_EXACT_PREFIX = 'hpo_eta_fast', 'hpo_eta_exact'
HPO_ETA_EXACT_LR_PREFIX = 'hpo_eta_exact_lr'
LEARNED_ETA_PREFIXES = (HPO_ETA_PREFIX, HPO_ETA_FAST_PREFIX,
                        HPO_ETA_EXACT_PREFIX, HPO_ETA_EXACT_LR_PREFIX)
FIXED_ETA_FIELDS = ('optimizer.learning_rate', 'optimizer.weight_decay')
LEARNED_ETA_FIELDS = ('hpo.init_lr', 'hpo.init_wd')
# The learned-η arms' settings, each adding one to the one before: η
# annealed by the schedule, 3x the config's rate of η, Eq. 4.
ANNEALED = ('optimizer.anneal_learned_lr=True',)
FAST_ETA_OVERRIDES = ANNEALED + ('hpo.meta_lr=0.03',)
EXACT_ETA_OVERRIDES = FAST_ETA_OVERRIDES + ('hpo.mode=exact',)
# Arms named by a prefix and an index; a comparison with a prefix takes
# every such arm.
PREFIXES = (RANDOM_PREFIX, FIXED_ETA_PREFIX) + LEARNED_ETA_PREFIXES
# Keeps the η draws of (seed, k) apart from the random genotypes' (seed, k).
ETA_DRAW_STREAM = 1


@dataclasses.dataclass(frozen=True)
class Arm:
  """One setting of the campaign.

  Attributes:
    name: the workdir name.
    mode: `config.mode`.
    overrides: more `field=value` settings.
    genotype: for `train` arms: the name of the search arm whose
      genotype.json it trains, or the index of a random genotype.
    eta_draw: the index k of the drawn η₀ (`drawn_eta`) the arm starts
      from, set in `eta_fields` (learning rate, weight decay).
    pin_weight_decay: HPO's weight-decay bounds are both η₀'s, so that only
      the learning rate is learned.
  """
  name: str
  mode: str
  overrides: tuple[str, ...] = ()
  genotype: str | int | None = None
  eta_draw: int | None = None
  eta_fields: tuple[str, str] = FIXED_ETA_FIELDS
  pin_weight_decay: bool = False

  @property
  def waits_for_search(self) -> bool:
    return isinstance(self.genotype, str)


def drawn_eta(seed: int, k: int) -> tuple[float, float]:
  """The k-th start η₀ = (learning rate, weight decay) of a seed, each
  log-uniform within HPO's default bounds (configs/default.py keeps them),
  rounded to 4 significant digits so that the runs' flags show it whole."""
  bounds = hpo.default_config()
  rng = np.random.default_rng((seed, k, ETA_DRAW_STREAM))
  lr, wd = (math.exp(rng.uniform(math.log(lo), math.log(hi)))
            for lo, hi in (bounds.lr_bounds, bounds.wd_bounds))
  return float(f'{lr:.4g}'), float(f'{wd:.4g}')


def arms(random_genotypes: int, eta_draws: int) -> tuple[Arm, ...]:
  """The arms of one (dataset, seed): the components with the config's
  dynamics, their baselines, the changed dynamics, then HPO from drawn
  starts."""
  return ((Arm(SEARCH, 'ista_one_stage'),
           Arm(DA_LEARNED, 'nas_da'),
           Arm(DA_UNIFORM, 'nas_da', ('da.policy_lr=0.0',)),
           Arm(HPO_LEARNED, 'nas_hpo'),
           Arm(SEARCHED, 'train', genotype=SEARCH))
          + tuple(Arm(f'{RANDOM_PREFIX}{k}', 'train', genotype=k)
                  for k in range(random_genotypes))
          # b learns on the held-out batch (ISTA-NAS two-stage's signal).
          + (Arm(SEARCH_HELDOUT, 'ista_one_stage', ('nas.code_loss=heldout',)),
             Arm(SEARCHED_HELDOUT, 'train', genotype=SEARCH_HELDOUT),
             # τ at half and 2.5x the config's Adam rate; the fast arm
             # without the bound on τ's distance from uniform (its runs were
             # made before the bound, which would have stopped them).
             Arm(DA_SLOW, 'nas_da', ('da.policy_lr=0.01',)),
             Arm(DA_FAST, 'nas_da', ('da.policy_lr=0.05',
                                     'da.max_kl_from_uniform=0.0')),
             # η before the schedule's multiplier: annealed like the baseline.
             Arm(HPO_ANNEALED, 'nas_hpo', ANNEALED),
             # The settings of the HPO-from-η₀ arm whose gain on CIFAR-10
             # was the most consistent, from the config's start.
             Arm(HPO_EXACT, 'nas_hpo', EXACT_ETA_OVERRIDES))
          # The fixed η₀ against η learned from η₀; η annealed like the
          # fixed schedule, so that the pair differs in learning η alone.
          # At the config's rate η moved at most 0.6 in log over a CIFAR-10
          # run, while a start lies up to 3 from the schedule's 0.05: the
          # fast arm lets it move 3x as far. The online hypergradient (the
          # config's) sees only training batches, so nothing in it rewards
          # generalisation; the exact arm measures the paper's Eq. 4 on the
          # HPO batch, at the fast arm's rate.
          + tuple(arm for k in range(eta_draws) for arm in (
              Arm(f'{FIXED_ETA_PREFIX}{k}', 'ista_one_stage', eta_draw=k),
              Arm(f'{HPO_ETA_PREFIX}{k}', 'nas_hpo', ANNEALED, eta_draw=k,
                  eta_fields=LEARNED_ETA_FIELDS),
              Arm(f'{HPO_ETA_FAST_PREFIX}{k}', 'nas_hpo', FAST_ETA_OVERRIDES,
                  eta_draw=k, eta_fields=LEARNED_ETA_FIELDS),
              Arm(f'{HPO_ETA_EXACT_PREFIX}{k}', 'nas_hpo', EXACT_ETA_OVERRIDES,
                  eta_draw=k, eta_fields=LEARNED_ETA_FIELDS),
              # The exact arm drove weight decay to its upper bound from 7 of
              # 9 CIFAR-10 starts: does learning the learning rate alone do
              # better? (It did not: experiments/RESULTS.md.)
              Arm(f'{HPO_ETA_EXACT_LR_PREFIX}{k}', 'nas_hpo',
                  EXACT_ETA_OVERRIDES, eta_draw=k,
                  eta_fields=LEARNED_ETA_FIELDS, pin_weight_decay=True))))


def dataset_arms(args: argparse.Namespace, dataset: str) -> tuple[Arm, ...]:
  """The arms that run on `dataset`: all, or those `DATASET_ARMS` names;
  of these, those `args.arms` names, if it names any."""
  chosen = arms(args.random_genotypes, args.eta_draws)
  for names in (DATASET_ARMS.get(dataset), args.arms):
    if names:
      chosen = tuple(a for a in chosen
                     if any(_named(a.name, n) for n in names))
  return chosen


# (component, learned arm, baseline arms) of each comparison; a prefix
# stands for every arm it names (`PREFIXES`).
COMPARISONS = (
    ('NAS', SEARCHED, (RANDOM_PREFIX,)),
    ('DA', DA_LEARNED, (DA_UNIFORM, SEARCH)),
    ('HPO', HPO_LEARNED, (SEARCH,)),
    ('NAS, b on the HPO batch', SEARCHED_HELDOUT, (RANDOM_PREFIX,)),
    ('DA, τ at half the rate', DA_SLOW, (DA_UNIFORM, SEARCH)),
    ('DA, τ 2.5x faster', DA_FAST, (DA_UNIFORM, SEARCH)),
    ('HPO, η annealed', HPO_ANNEALED, (SEARCH,)),
    ('HPO, η annealed, 3x faster, exact Eq. 4', HPO_EXACT, (SEARCH,)),
    ('HPO from drawn η₀', HPO_ETA_PREFIX, (FIXED_ETA_PREFIX,)),
    ('HPO from drawn η₀, η 3x faster', HPO_ETA_FAST_PREFIX,
     (FIXED_ETA_PREFIX,)),
    ('HPO from drawn η₀, η 3x faster, exact Eq. 4', HPO_ETA_EXACT_PREFIX,
     (FIXED_ETA_PREFIX,)),
    ('HPO from drawn η₀, η 3x faster, exact Eq. 4, learning rate only',
     HPO_ETA_EXACT_LR_PREFIX, (FIXED_ETA_PREFIX,)),
)
BASELINE_NAMES = {RANDOM_PREFIX: 'random genotypes', DA_UNIFORM: 'τ uniform',
                  SEARCH: 'no DA / fixed schedule',
                  FIXED_ETA_PREFIX: 'fixed η₀ (paired)'}
# The arms of a dataset that does not run them all: at the campaign's
# budget DA lost to no DA on digits and CIFAR-10 alike, so digits_small
# asks whether learned τ beats uniform τ where the network overfits,
# whether HPO finds the regularisation that such a network needs, and
# whether the searched cell beats random ones there (a prefix names every
# arm it prefixes).
DATASET_ARMS = {DIGITS_SMALL: (SEARCH, DA_LEARNED, DA_UNIFORM, HPO_LEARNED,
                               SEARCHED, RANDOM_PREFIX, HPO_EXACT)}
# Comparisons made pair by pair: arm k of a seed against arm k of the seed.
PAIRED = {(prefix, FIXED_ETA_PREFIX) for prefix in LEARNED_ETA_PREFIXES}


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every run of a dataset gets."""
  digits_steps: int = 200
  cifar10_steps: int = 250
  # Epochs of the training split: the search recovers its support once per
  # epoch (digits: 20 steps; the CIFAR-10 subset: 28).
  search_epochs: int = 3
  cifar10_train_examples: int = 2_000
  cifar10_test_examples: int = 2_000
  cifar10_image_size: int = 16
  # digits_small: training + HPO split.
  digits_small_examples: int = 200


def dataset_overrides(dataset: str, budget: Budget, cifar10: str
                      ) -> list[str]:
  """Settings of a dataset on top of configs/default.py."""
  if dataset == 'digits':
    return [f'num_train_steps={budget.digits_steps}']
  if dataset == DIGITS_SMALL:
    return dataset_overrides('digits', budget, cifar10) + [
        f'dataset.max_train_examples={budget.digits_small_examples}',
        f'dataset.val_ratio={DIGITS_SMALL_VAL_RATIO}']
  return ['dataset.source=image_folder', f'dataset.path={cifar10}',
          f'dataset.image_size={budget.cifar10_image_size}',
          f'dataset.max_train_examples={budget.cifar10_train_examples}',
          f'dataset.max_test_examples={budget.cifar10_test_examples}',
          'preprocess.flip=True', f'num_train_steps={budget.cifar10_steps}']


def workdir_of(out: str, dataset: str, seed: int, arm: str) -> str:
  return os.path.join(out, dataset, f'seed{seed}', arm)


def genotype_path(out: str, dataset: str, seed: int, arm: Arm) -> str:
  """The genotype.json a `train` arm trains (written on first use)."""
  if arm.waits_for_search:
    return os.path.join(workdir_of(out, dataset, seed, arm.genotype),
                        train.GENOTYPE_FILE)
  path = os.path.join(out, dataset, f'seed{seed}',
                      f'{RANDOM_PREFIX}{arm.genotype}.genotype.json')
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng((seed, arm.genotype))
    train.write_text_atomic(
        path, search_space.random_genotype(rng).to_json())
  return path


def command(args: argparse.Namespace, budget: Budget, dataset: str,
            seed: int, arm: Arm) -> list[str]:
  fields = ([f'mode={arm.mode}', f'seed={seed}',
             f'nas.search_epochs={budget.search_epochs}',
             f'log_every_steps={LOG_EVERY_STEPS}',
             f'checkpoint_every_steps={CHECKPOINT_EVERY_STEPS}']
            + dataset_overrides(dataset, budget, args.cifar10)
            + list(arm.overrides) + list(args.set))
  if arm.genotype is not None:
    fields.append(f'model.genotype={genotype_path(args.out, dataset, seed, arm)}')
  if arm.eta_draw is not None:
    eta = drawn_eta(seed, arm.eta_draw)
    fields += [f'{field}={value}' for field, value in zip(arm.eta_fields, eta)]
    if arm.pin_weight_decay:
      fields.append(f'hpo.wd_bounds=({eta[1]}, {eta[1]})')
  return ([sys.executable, '-m', 'dha_jax.main', f'--config={BASE_CONFIG}',
           f'--workdir={workdir_of(args.out, dataset, seed, arm.name)}']
          + [f'--config.{f}' for f in fields])


def _finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, train.SUMMARY_FILE))


def run_campaign(args: argparse.Namespace, budget: Budget) -> None:
  """Runs every unfinished (dataset, seed, arm), `args.jobs` at a time.

  Within a (dataset, seed) the `train` arms of searched genotypes wait for
  their searches.
  """
  env = dict(os.environ)
  # One thread per process when several run at once: small networks use a
  # second core poorly, a second process uses it fully.
  if args.jobs > 1:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' '
                        + benchlib.SINGLE_THREAD_XLA).strip()
  start = time.time()
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for dataset in args.datasets:
      for seed in args.seeds:
        pending = [a for a in dataset_arms(args, dataset)
                   if not _finished(workdir_of(args.out, dataset, seed,
                                               a.name))]
        waves = ([a for a in pending if not a.waits_for_search],
                 [a for a in pending if a.waits_for_search])
        for wave in waves:
          futures = {pool.submit(_run, args, budget, dataset, seed, a, env): a
                     for a in wave}
          for future in concurrent.futures.as_completed(futures):
            arm = futures[future]
            rc, seconds = future.result()
            print(f'[{reproduce.clock(time.time() - start)}] {dataset} seed '
                  f'{seed} {arm.name}: '
                  + ('done' if rc == 0 else f'FAILED (exit {rc})')
                  + f' in {reproduce.clock(seconds)}', flush=True)


def _run(args, budget, dataset, seed, arm, env) -> tuple[int, float]:
  workdir = workdir_of(args.out, dataset, seed, arm.name)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  rc = reproduce.run_one(workdir, command(args, budget, dataset, seed, arm),
                         env=env)
  return rc, time.time() - start


# ------------------------------------------------------------- the report
def _records(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def run_record(args: argparse.Namespace, dataset: str, seed: int, arm: Arm
               ) -> dict[str, Any]:
  """A run's results and search diagnostics, or its status."""
  workdir = workdir_of(args.out, dataset, seed, arm.name)
  record = {'dataset': dataset, 'seed': seed, 'arm': arm.name,
            'mode': arm.mode, 'overrides': list(arm.overrides),
            'workdir': os.path.relpath(workdir, REPO_ROOT)}
  summary = reproduce.read_json(os.path.join(workdir, train.SUMMARY_FILE))
  if summary is None:
    record['status'] = 'not run' if not os.path.exists(workdir) else (
        'unfinished')
    return record
  metrics = _records(os.path.join(workdir, train.METRICS_FILE))
  nas = [r for r in metrics if r['phase'] == 'nas_epoch']
  da = [r for r in metrics if r['phase'] == 'da_epoch']
  hpo_epochs = [r for r in metrics if r['phase'] == 'hpo_epoch']
  record.update(
      status='finished', test_accuracy=summary['test_accuracy'],
      hpo_accuracy=summary['hpo_accuracy'],
      wall_seconds=summary['wall_seconds'],
      genotype={k: summary['genotype'][k] for k in ('normal', 'reduce')})
  if nas:
    record.update(
        support_changes=sum(bool(r['support_changed']) for r in nas),
        pairs_changed_from_start=nas[-1]['pairs_changed_from_start'],
        frozen_nodes=nas[-1]['frozen_nodes'])
  if da:
    record.update(tau_entropy=da[-1]['entropy'],
                  tau_kl_from_uniform=da[-1]['kl_from_uniform'],
                  tau_top_pair=da[-1]['top_pair'])
  if hpo_epochs:
    record.update(final_learning_rate=hpo_epochs[-1]['learning_rate'],
                  final_weight_decay=hpo_epochs[-1]['weight_decay'])
  if arm.eta_draw is not None:
    record.update(zip(('initial_learning_rate', 'initial_weight_decay'),
                      drawn_eta(seed, arm.eta_draw)))
  return record


def _named(arm: str, name: str) -> bool:
  """Whether `arm` is the arm `name`, or one of the arms a prefix names."""
  return arm == name or (name in PREFIXES and arm.startswith(name)
                         and arm[len(name):].isdigit())


def _has_arm(records, dataset, name) -> bool:
  """Whether `dataset` runs the arm `name` (or an arm the prefix names)."""
  return any(r['dataset'] == dataset and _named(r['arm'], name)
             for r in records)


def _values(records, dataset, arm_prefix, key) -> list[float]:
  return [r[key] for r in records
          if r['dataset'] == dataset and r['status'] == 'finished'
          and _named(r['arm'], arm_prefix)]


def paired_runs(records, dataset, learned_prefix, base_prefix
                ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """(learned, baseline) run records of the same seed and index k, both
  finished, in the records' order."""
  done = {(r['seed'], r['arm']): r for r in records
          if r['dataset'] == dataset and r['status'] == 'finished'}
  pairs = []
  for (seed, arm), run in done.items():
    if _named(arm, learned_prefix):
      base = done.get((seed, base_prefix + arm[len(learned_prefix):]))
      if base is not None:
        pairs.append((run, base))
  return pairs


def _judged(diff: float, sd: float, tally: str | None = None) -> str:
  """'beats by', 'loses by' or 'tie': a difference (a fraction) against one
  sd; `tally` (paired comparisons) is appended."""
  tag, tail = ('', '') if tally is None else ('paired; ', f'; {tally}')
  if abs(diff) > sd:
    return (f"{'beats' if diff > 0 else 'loses'} by {abs(diff) * PERCENT:.2f} "
            f'({tag}> 1 sd = {sd * PERCENT:.2f}{tail})')
  return (f"tie: {diff * PERCENT:+.2f}{'' if tally is None else ' (paired)'}, "
          f'within 1 sd = {sd * PERCENT:.2f}{tail}')


def verdict(learned: Sequence[float], baseline: Sequence[float]) -> str:
  """'beats', 'loses' or 'tie': the difference of the means against the
  larger sample sd (a difference within one sd is a tie)."""
  if len(learned) < 2 or len(baseline) < 2:
    return 'too few runs'
  return _judged(statistics.fmean(learned) - statistics.fmean(baseline),
                 max(statistics.stdev(learned), statistics.stdev(baseline)))


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
  """The two-sided Student-t interval of the mean at `CONFIDENCE`."""
  n = len(values)
  half = (stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * statistics.stdev(values)
          / math.sqrt(n))
  mean = statistics.fmean(values)
  return mean - half, mean + half


def paired_verdict(differences: Sequence[float]) -> str:
  """'beats', 'loses' or 'tie' by the differences learned − baseline of
  paired runs: their mean against their sample sd, as `verdict`; then how
  many pairs the learned run wins and the t interval of the mean difference,
  which tells whether its sign is established (the 1-sd rule asks more: a
  gain larger than the pairs' spread)."""
  if len(differences) < 2:
    return 'too few pairs'
  wins = sum(d > 0 for d in differences)
  lo, hi = mean_interval(differences)
  return _judged(statistics.fmean(differences), statistics.stdev(differences),
                 f'higher in {wins} of {len(differences)} pairs; '
                 f'{CONFIDENCE:.0%} CI of the mean {lo * PERCENT:+.2f} to '
                 f'{hi * PERCENT:+.2f}')


def comparison_table(records: Sequence[dict[str, Any]], dataset: str) -> str:
  head = ['component', 'learned', 'test acc. % (HPO split %)', 'baseline',
          'test acc. % (HPO split %)', 'learned vs baseline (test)']
  rows = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for component, learned, baselines in COMPARISONS:
    if not _has_arm(records, dataset, learned):
      continue
    ours = _values(records, dataset, learned, 'test_accuracy')
    ours_hpo = _values(records, dataset, learned, 'hpo_accuracy')
    for base in baselines:
      theirs = _values(records, dataset, base, 'test_accuracy')
      theirs_hpo = _values(records, dataset, base, 'hpo_accuracy')
      if (learned, base) in PAIRED:
        outcome = paired_verdict(
            [a['test_accuracy'] - b['test_accuracy']
             for a, b in paired_runs(records, dataset, learned, base)])
      else:
        outcome = verdict(ours, theirs)
      rows.append('| ' + ' | '.join([
          component, f'`{learned}`',
          f'{reproduce.format_mean_sd(ours)} '
          f'({reproduce.format_mean_sd(ours_hpo)})',
          BASELINE_NAMES[base],
          f'{reproduce.format_mean_sd(theirs)} '
          f'({reproduce.format_mean_sd(theirs_hpo)})',
          outcome]) + ' |')
  return '\n'.join(rows)


def eta_table(records: Sequence[dict[str, Any]], dataset: str,
              learned_prefix: str) -> str:
  """The HPO-from-η₀ pairs of an arm: the start, where HPO took η, both
  accuracies."""
  head = ['seed', 'k', 'η₀: lr, wd', 'η learned: final lr, wd',
          'fixed η₀: test % (HPO split %)', 'η learned: test % (HPO split %)',
          'learned − fixed (test)']
  rows = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  pct = lambda r: (f"{r['test_accuracy'] * PERCENT:.2f} "
                   f"({r['hpo_accuracy'] * PERCENT:.2f})")
  for learned, fixed in paired_runs(records, dataset, learned_prefix,
                                    FIXED_ETA_PREFIX):
    rows.append('| ' + ' | '.join([
        str(learned['seed']), learned['arm'][len(learned_prefix):],
        f"{learned['initial_learning_rate']:.4g}, "
        f"{learned['initial_weight_decay']:.4g}",
        f"{learned['final_learning_rate']:.4g}, "
        f"{learned['final_weight_decay']:.4g}",
        pct(fixed), pct(learned),
        f"{(learned['test_accuracy'] - fixed['test_accuracy']) * PERCENT:+.2f}"
    ]) + ' |')
  return '\n'.join(rows)


def runs_table(records: Sequence[dict[str, Any]], dataset: str) -> str:
  head = ['seed', 'arm', 'mode', 'status', 'test %', 'HPO split %',
          'support changes', 'pairs moved', 'τ entropy', 'final lr',
          'wall (min)']
  rows = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  fmt = lambda r, k, f: f.format(r[k]) if k in r else '—'
  for r in records:
    if r['dataset'] != dataset:
      continue
    done = r['status'] == 'finished'
    rows.append('| ' + ' | '.join([
        str(r['seed']), r['arm'], f"`{r['mode']}`", r['status'],
        f"{r['test_accuracy'] * PERCENT:.2f}" if done else '—',
        f"{r['hpo_accuracy'] * PERCENT:.2f}" if done else '—',
        fmt(r, 'support_changes', '{}'),
        fmt(r, 'pairs_changed_from_start', '{}'),
        fmt(r, 'tau_entropy', '{:.3f}'), fmt(r, 'final_learning_rate',
                                             '{:.4f}'),
        f"{r['wall_seconds'] / 60:.1f}" if done else '—']) + ' |')
  return '\n'.join(rows)


def report_body(records: Sequence[dict[str, Any]], args: argparse.Namespace,
                budget: Budget) -> str:
  finished = [r for r in records if r['status'] == 'finished']
  lines = [
      '### Searches against their baselines (`experiments/ablate_search.py`)',
      '',
      f'Written by `python -m experiments.ablate_search {" ".join(args.argv)}`'
      .rstrip() + f' on {datetime.date.today().isoformat()} '
      f'({reproduce.machine()}, {args.jobs} run(s) at a time).',
      f'{len(finished)} of {len(records)} runs finished. Budget: '
      f'{json.dumps(dataclasses.asdict(budget))}; configs/default.py '
      'otherwise (digits: 16 px; CIFAR-10: a class-balanced subset, '
      f'{budget.cifar10_image_size} px, flips; {DIGITS_SMALL}: '
      f'{budget.digits_small_examples} digits, '
      f'{DIGITS_SMALL_VAL_RATIO:.0%} of them the HPO split). Accuracy in %, '
      'mean ± sample sd over seeds (random genotypes: over every genotype and seed); in '
      'brackets the accuracy on the HPO split, on which any choice is made.',
  ]
  for dataset in args.datasets:
    lines += ['', f'**{dataset}**', '', comparison_table(records, dataset)]
    for prefix in (p for p in LEARNED_ETA_PREFIXES
                   if _has_arm(records, dataset, p)):
      lines += ['', f'`{prefix}` against the fixed η₀, pair by pair:', '',
                eta_table(records, dataset, prefix)]
    lines += ['', 'Every run:', '', runs_table(records, dataset)]
  return '\n'.join(lines)


def write_reports(records: Sequence[dict[str, Any]],
                  args: argparse.Namespace, budget: Budget) -> None:
  os.makedirs(args.report_dir, exist_ok=True)
  md_path = os.path.join(args.report_dir, reproduce.RESULTS_MD)
  text = ''
  if os.path.exists(md_path):
    with open(md_path) as f:
      text = f.read()
  text = reproduce.replace_section(text, report_body(records, args, budget),
                                   BEGIN_MARKER, END_MARKER)
  train.write_text_atomic(md_path, text)
  train.write_json_atomic(os.path.join(args.report_dir, RESULTS_JSON), {
      'command': ['python', '-m', 'experiments.ablate_search', *args.argv],
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': reproduce.machine(), 'budget': dataclasses.asdict(budget),
      'runs': list(records)})


# ------------------------------------------------------------------ main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  defaults = Budget()
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--cifar10', default=CIFAR10_ZIP,
                      help='CIFAR-10 image-folder zip or directory')
  parser.add_argument('--out', default=DEFAULT_OUT,
                      help="parent of the runs' workdirs (resumable)")
  parser.add_argument('--report-dir', default=EXPERIMENTS_DIR)
  parser.add_argument('--datasets', default=','.join(DATASETS),
                      type=lambda s: [d for d in s.split(',') if d])
  parser.add_argument('--seeds', default='0,1,2',
                      type=lambda s: [int(x) for x in s.split(',') if x])
  parser.add_argument('--random-genotypes', type=int, default=5)
  parser.add_argument('--eta-draws', type=int, default=3,
                      help='drawn starts η₀ of the HPO-from-η₀ pairs')
  parser.add_argument('--arms', default=[],
                      type=lambda s: [a for a in s.split(',') if a],
                      help='run and report only these arms (names, or '
                      'prefixes such as fixed_eta); default: all')
  parser.add_argument('--jobs', type=int, default=2,
                      help='runs at a time (each on one XLA thread if > 1)')
  for field in dataclasses.fields(Budget):
    parser.add_argument(f"--{field.name.replace('_', '-')}", type=int,
                        default=getattr(defaults, field.name))
  parser.add_argument('--set', action='append', default=[],
                      metavar='FIELD=VALUE',
                      help='another config override for every run')
  parser.add_argument('--report-only', action='store_true')
  args = parser.parse_args(argv)
  unknown = sorted(set(args.datasets) - set(DATASETS))
  if unknown:
    parser.error(f'unknown datasets {unknown}; choose from {DATASETS}')
  names = {a.name for a in arms(args.random_genotypes, args.eta_draws)}
  unknown = sorted(set(args.arms) - names - set(PREFIXES))
  if unknown:
    parser.error(f'unknown arms {unknown}; choose from {sorted(names)} or '
                 f'the prefixes {list(PREFIXES)}')
  args.argv = list(argv)
  args.out = os.path.abspath(args.out)
  args.cifar10 = os.path.abspath(args.cifar10)
  return args


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  budget = Budget(**{f.name: getattr(args, f.name)
                     for f in dataclasses.fields(Budget)})
  if ('cifar10' in args.datasets and not args.report_only
      and not os.path.exists(args.cifar10)):
    print(f'error: no CIFAR-10 data at {args.cifar10}; pass --cifar10 PATH '
          'of the image-folder zip, or --datasets digits.', file=sys.stderr)
    return 1
  conflicts = [c for c in (
      reproduce.reuse_conflict(workdir_of(args.out, d, s, a.name),
                               command(args, budget, d, s, a))
      for d in args.datasets for s in args.seeds
      for a in dataset_arms(args, d)) if c is not None]
  if conflicts:
    return reproduce.refuse_reuse(conflicts)
  if not args.report_only:
    try:
      run_campaign(args, budget)
    except KeyboardInterrupt:
      print('Interrupted: rerun the same command to resume.', file=sys.stderr)
      return 130
  records = [run_record(args, d, s, a) for d in args.datasets
             for s in args.seeds
             for a in dataset_arms(args, d)]
  write_reports(records, args, budget)
  print(report_body(records, args, budget))
  return 0 if all(r['status'] == 'finished' for r in records) else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
