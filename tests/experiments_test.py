"""Tests of the experiment scripts: reproduce.py, landscape.py,
ablate_search.py, profile_step.py, ab_step.py, bench_official.py."""

import json
import os
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from dha_jax import hpo
from dha_jax import train
from dha_jax.nas import mobilenet_space as ms
from dha_jax.nas import search_space as ss
from dha_jax.nas import spaces
from experiments import ab_step
from experiments import ablate_search
from experiments import benchlib
from experiments import bench_official
from experiments import landscape
from experiments import profile_step
from experiments import reproduce

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('experiments_test')


# ---------------------------------------------------------------- landscape
@pytest.fixture(scope='module')
def params():
  rng = np.random.default_rng(0)
  return {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)),
                                         jnp.float32)},
          'depthwise': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 1, 5)),
                                              jnp.float32)},
          'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 3)),
                                          jnp.float32),
                    'bias': jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
          'bn': {'scale': jnp.ones((4,)), 'bias': jnp.zeros((4,))}}


def _filter_norms(x):
  return np.sqrt(np.sum(np.square(x), axis=tuple(range(x.ndim - 1))))


def test_filter_normalize_matches_filter_norms_and_zeroes_biases_bn(params):
  direction = landscape.random_direction(jax.random.key(0), params)
  for path, (d, w) in zip(
      jax.tree_util.tree_leaves_with_path(params),
      zip(jax.tree.leaves(direction), jax.tree.leaves(params))):
    d, w = np.asarray(d), np.asarray(w)
    assert d.shape == w.shape, path
    if w.ndim <= 1:
      np.testing.assert_array_equal(d, 0.0)
    else:
      np.testing.assert_allclose(_filter_norms(d), _filter_norms(w),
                                 rtol=1e-5)
      assert not np.allclose(d, w)  # a random direction, not θ itself


def test_filter_normalize_keeps_each_filters_direction(params):
  direction = jax.tree.map(lambda w: 3.0 * w + 1.0, params)
  out = landscape.filter_normalize(direction, params)
  d, o = (np.asarray(direction['conv']['kernel']),
          np.asarray(out['conv']['kernel']))
  # Each filter is rescaled by a positive number.
  ratio = o / d
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[0, 0, 0], d.shape),
                             rtol=1e-5)
  assert np.all(ratio > 0)


def test_loss_surface_of_a_quadratic(params):
  delta = landscape.random_direction(jax.random.key(1), params)
  eta = landscape.random_direction(jax.random.key(2), params)
  coords = jnp.linspace(-1.0, 1.0, 3)

  def loss_fn(p):
    return {'loss': sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)),
            'first': p['conv']['kernel'][0, 0, 0, 0]}

  surface = landscape.loss_surface(loss_fn, params, (delta, eta), coords)
  assert surface['loss'].shape == (3, 3)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  w, d, e = flat(params), flat(delta), flat(eta)
  for i, a in enumerate(np.asarray(coords)):
    for j, b in enumerate(np.asarray(coords)):
      np.testing.assert_allclose(surface['loss'][i, j],
                                 np.sum(np.square(w + a * d + b * e)),
                                 rtol=1e-5)
  # Rows move along δ, columns along η.
  np.testing.assert_allclose(
      surface['first'][2, 1],
      params['conv']['kernel'][0, 0, 0, 0] + delta['conv']['kernel'][0, 0, 0,
                                                                      0],
      rtol=1e-6)


def test_landscape_records_no_path_of_this_machine(tmp_path):
  inside = os.path.join(reproduce.DEFAULT_OUT, 'dha_seed0')
  assert landscape.recorded_workdir(inside) == os.path.join(
      'experiments', 'reproduce_runs', 'dha_seed0')
  assert landscape.recorded_workdir(str(tmp_path / 'dha_seed0') + '/') == (
      'dha_seed0')
  for name in ('ista_one_stage_seed0', 'dha_seed0'):
    with open(os.path.join(reproduce.EXPERIMENTS_DIR,
                           f'{name}_landscape.json')) as f:
      assert json.load(f)['workdir'] == name


def test_landscape_needs_workdirs_and_says_how_to_make_them(tmp_path,
                                                            capsys):
  with pytest.raises(SystemExit):
    landscape.main([])
  assert '--workdirs' in capsys.readouterr().err
  # A committed run: its results without config.json and checkpoints.
  committed = os.path.join(reproduce.DEFAULT_OUT, 'dha_seed0')
  assert landscape.main(['--workdirs', committed, '--out-dir',
                         str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert 'experiments.reproduce --modes ista_one_stage,dha --seeds 0' in err
  assert '--workdirs DIR/ista_one_stage_seed0,DIR/dha_seed0' in err


# ---------------------------------------------------------------- reproduce
def test_replace_section_keeps_the_rest_of_the_file():
  begin, end = reproduce.BEGIN_MARKER, reproduce.END_MARKER
  text = f'# Results\n\nintro\n\n{begin}\nold table\n{end}\n\n## Later\ntail\n'
  out = reproduce.replace_section(text, 'new table')
  assert out == (f'# Results\n\nintro\n\n{begin}\nnew table\n{end}\n\n'
                 '## Later\ntail\n')
  assert reproduce.replace_section(out, 'new table') == out


def test_replace_section_appends_when_absent_and_refuses_broken_markers():
  out = reproduce.replace_section('# Results\nsome text\n', 'table')
  assert out == (f'# Results\nsome text\n\n{reproduce.BEGIN_MARKER}\ntable\n'
                 f'{reproduce.END_MARKER}\n')
  assert reproduce.replace_section('', 'table').startswith(
      reproduce.BEGIN_MARKER)
  with pytest.raises(ValueError, match='markers'):
    reproduce.replace_section(f'{reproduce.BEGIN_MARKER}\nno end\n', 'x')
  with pytest.raises(ValueError, match='markers'):
    reproduce.replace_section(
        f'{reproduce.END_MARKER}\n{reproduce.BEGIN_MARKER}\n', 'x')


def test_format_mean_sd_uses_the_sample_sd_in_percent():
  assert reproduce.format_mean_sd([0.5, 0.6, 0.7]) == '60.00 ± 10.00'
  assert reproduce.format_mean_sd([0.8125]) == '81.25 (n=1)'
  assert reproduce.format_mean_sd([]) == '—'


def _records():
  def done(mode, seed, acc):
    return {'mode': mode, 'seed': seed, 'workdir': f'/w/{mode}_{seed}',
            'status': 'finished', 'test_accuracy': acc,
            'hpo_accuracy': acc - 0.1, 'train_accuracy': acc + 0.2,
            'tau_entropy': 5.0 + seed / 10, 'support_changed': seed > 0,
            'curve': [], 'wall_seconds': 120.0 * (1 + (mode == 'dha')),
            'train_steps': 10, 'search_steps': 4, 'param_count': 1000,
            'genotype': {}}
  return [done('dha', 0, 0.5), done('dha', 1, 0.6), done('dha', 2, 0.7),
          done('nas_da', 0, 0.4),
          {'mode': 'nas_da', 'seed': 1, 'workdir': '/w/nas_da_1',
           'status': 'failed', 'exit_status': 1, 'wall_seconds': 5.0},
          {'mode': 'nas_da', 'seed': 2, 'workdir': '/w/nas_da_2',
           'status': 'not run'}]


def test_format_table_lists_every_seed_and_the_mean_sd():
  table = reproduce.format_table(_records(), ['nas_da', 'dha'], [0, 1, 2])
  lines = table.splitlines()
  assert len(lines) == 4
  assert lines[0].count('|') == lines[2].count('|') == lines[3].count('|')
  nas_da, dha = lines[2], lines[3]
  # Test accuracy per seed, then the means of HPO split and clean train
  # accuracy, τ's entropy, the seeds whose support changed, the wall time.
  assert ('| DHA | `dha` | 60.00 ± 10.00 | 50.00 | 60.00 | 70.00 | 50.00 | '
          '80.00 | 5.100 | 2 of 3 | 4.0 |') in dha
  assert '98.11 ± 0.26' in dha
  assert ('40.00 (n=1) | 40.00 | failed (exit 1) | not run | 30.00 | 60.00 '
          '| 5.000 | 0 of 1 | 2.0 |') in nas_da


def test_cost_ratio_is_dha_wall_time_over_one_stage_ista():
  records = _records()
  assert reproduce.cost_ratio(records) is None  # no ista_one_stage run
  ista = dict(records[0], mode='ista_one_stage', wall_seconds=100.0)
  assert reproduce.cost_ratio(records + [ista]) == pytest.approx(2.4)


def test_summarize_leaves_failed_runs_out_of_the_mean():
  stats = reproduce.summarize(_records(), ['nas_da', 'dha'])
  assert stats['nas_da']['runs'] == 1
  assert stats['nas_da']['sd_accuracy'] is None
  assert stats['dha']['mean_accuracy'] == pytest.approx(0.6)
  assert stats['dha']['sd_accuracy'] == pytest.approx(0.1)


def test_collect_reads_summaries_and_wall_times(tmp_path):
  finished = reproduce.workdir_of(str(tmp_path), 'dha', 0)
  os.makedirs(finished)
  with open(os.path.join(finished, train.SUMMARY_FILE), 'w') as f:
    json.dump({'test_accuracy': 0.25, 'hpo_accuracy': 0.2,
               'train_accuracy': 0.5, 'wall_seconds': 9.0, 'train_steps': 3,
               'search_steps': 2, 'param_count': 77, 'genotype': {}}, f)
  with open(os.path.join(finished, reproduce.WALL_FILE), 'w') as f:
    json.dump({'seconds': 30.0, 'sessions': 2, 'last_rc': 0}, f)
  for seed, rc in ((1, 2), (2, None)):
    workdir = reproduce.workdir_of(str(tmp_path), 'dha', seed)
    os.makedirs(workdir)
    with open(os.path.join(workdir, reproduce.WALL_FILE), 'w') as f:
      json.dump({'seconds': 4.0, 'sessions': 1, 'last_rc': rc}, f)
  with open(os.path.join(finished, train.METRICS_FILE), 'w') as f:
    for record in ({'phase': 'nas_epoch', 'pairs_changed_from_start': 0},
                   {'phase': 'da_epoch', 'entropy': 5.2},
                   {'phase': 'eval', 'epoch': 1.0, 'train_accuracy': 0.5,
                    'hpo_accuracy': 0.25, 'train_loss': 1.0},
                   {'phase': 'nas_epoch', 'pairs_changed_from_start': 3},
                   {'phase': 'da_epoch', 'entropy': 4.9}):
      f.write(json.dumps(record) + '\n')
  records = reproduce.collect(str(tmp_path), ['dha'], [0, 1, 2, 3])
  assert [r['status'] for r in records] == ['finished', 'failed',
                                            'interrupted', 'not run']
  assert records[0]['test_accuracy'] == 0.25
  # The last epoch of each search; the learning curve's points.
  assert records[0]['tau_entropy'] == 4.9
  assert records[0]['support_changed'] is True
  assert records[0]['curve'] == [{'epoch': 1.0, 'train_accuracy': 0.5,
                                  'hpo_accuracy': 0.25}]
  assert records[0]['wall_seconds'] == 30.0  # all sessions, not the last
  assert records[1]['exit_status'] == 2


def test_config_overrides_share_the_budget_and_short_run_nas_scale():
  budget = reproduce.Budget(steps=7, channels=4, layers=2)
  flags = reproduce.config_overrides(budget, '/d/c10.zip', 'nas_hpo', 3,
                                     ['hpo.mode=online'])
  assert '--config.mode=nas_hpo' in flags
  assert '--config.seed=3' in flags
  assert '--config.dataset.path=/d/c10.zip' in flags
  assert '--config.num_train_steps=7' in flags
  # The paper's crop padding and Cutout, scaled to 16 px.
  assert '--config.dataset.image_size=16' in flags
  assert '--config.preprocess.pad=2' in flags
  assert '--config.preprocess.cutout_size=8' in flags
  assert '--config.eval_every_epochs=5' in flags
  assert '--config.nas.alpha_norm=mean_abs' in flags
  assert '--config.nas.freeze_rule=relative' in flags
  assert '--config.da.policy_optimizer=adam' in flags
  assert flags[-1] == '--config.hpo.mode=online'
  other = reproduce.config_overrides(budget, '/d/c10.zip', 'dha', 3)
  differ = set(flags) ^ set(other)
  assert differ == {'--config.mode=nas_hpo', '--config.mode=dha',
                    '--config.hpo.mode=online'}


def _parsed_config(config_file, overrides):
  """The config `python -m dha_jax.main` builds from these flags."""
  argv = ['main', f'--config={config_file}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file',
                                  flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_reproduce_runs_the_committed_runs_config():
  # The search settings of the runs in experiments/reproduce_runs: a change
  # would make their workdirs refuse to resume and their results stale.
  config = _parsed_config(reproduce.BASE_CONFIG, reproduce.config_overrides(
      reproduce.Budget(), '/d/c10.zip', 'dha', 0))
  assert config.nas.to_dict() == {
      **config.nas.to_dict(), 'alpha_norm': 'mean_abs',
      'freeze_rule': 'relative', 'dist_limit': 0.1, 'min_freeze_steps': 40,
      'code_init_scale': 1e-3, 'search_epochs': 10, 'param_limit_mb': 3.7}
  assert (config.da.policy_optimizer, config.da.policy_lr,
          config.da.max_kl_from_uniform) == ('adam', 0.02, 1.0)
  assert (config.hpo.mode, config.heldout_batch_size) == ('exact', 0)
  assert config.optimizer.anneal_learned_lr


def test_a_run_records_its_flags_and_refuses_another_budget(tmp_path):
  args = reproduce.parse_args(['--out', str(tmp_path), '--data', '/d/c10.zip'])
  command = reproduce.run_command(args, reproduce.Budget(), 'dha', 0)
  workdir = reproduce.workdir_of(str(tmp_path), 'dha', 0)
  # A stand-in for dha_jax.main: the recording does not depend on it.
  assert reproduce.run_one(workdir, [sys.executable, '-c', 'pass']
                           + command[2:]) == 0
  recorded = reproduce.read_json(os.path.join(workdir, reproduce.FLAGS_FILE))
  assert '--config.num_train_steps=600' in recorded['flags']
  # Paths are no part of a run's identity.
  assert not any('dataset.path' in f for f in recorded['flags'])
  moved = reproduce.parse_args(['--out', str(tmp_path), '--data', '/e/c.zip'])
  assert reproduce.reuse_conflict(workdir, reproduce.run_command(
      moved, reproduce.Budget(), 'dha', 0)) is None
  shorter = reproduce.run_command(args, reproduce.Budget(steps=100), 'dha', 0)
  conflict = reproduce.reuse_conflict(workdir, shorter)
  assert 'num_train_steps=600' in conflict
  assert 'num_train_steps=100' in conflict
  with pytest.raises(ValueError, match='num_train_steps'):
    reproduce.run_one(workdir, shorter)


def test_reproduce_refuses_to_reuse_or_report_runs_of_another_budget(
    capsys):
  # The committed runs record their flags: the default command reports them,
  # a command of another budget neither reruns nor relabels them.
  out = os.path.join(reproduce.EXPERIMENTS_DIR, 'reproduce_runs')
  for m in reproduce.MODES:
    for seed in (0, 1, 2):
      args = reproduce.parse_args(['--out', out])
      assert reproduce.reuse_conflict(
          reproduce.workdir_of(out, m, seed),
          reproduce.run_command(args, reproduce.Budget(), m, seed)) is None
  assert reproduce.main(['--out', out, '--steps', '100', '--report-only',
                         '--report-dir', '/nonexistent']) == 2
  assert 'another budget' in capsys.readouterr().err


def test_ablate_search_refuses_runs_of_another_budget(tmp_path, capsys):
  argv = ['--out', str(tmp_path), '--datasets', 'digits', '--seeds', '0',
          '--report-dir', str(tmp_path)]
  args = ablate_search.parse_args(argv)
  arm = ablate_search.arms(args.random_genotypes, args.eta_draws)[0]
  budget = ablate_search.Budget(digits_steps=7)
  workdir = ablate_search.workdir_of(args.out, 'digits', 0, arm.name)
  os.makedirs(workdir)
  train.write_json_atomic(
      os.path.join(workdir, reproduce.FLAGS_FILE),
      {'flags': reproduce.defining_flags(
          ablate_search.command(args, budget, 'digits', 0, arm))})
  assert ablate_search.main(argv + ['--report-only']) == 2
  assert 'another budget' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / ablate_search.RESULTS_JSON)


# ---------------------------------------------------------------- smoke
@pytest.mark.slow
def test_reproduce_and_landscape_smoke(tmp_path, capsys):
  if not os.path.exists(reproduce.DEFAULT_DATA):
    pytest.skip(f'no CIFAR-10 zip at {reproduce.DEFAULT_DATA}')
  report = tmp_path / 'report'
  report.mkdir()
  (report / reproduce.RESULTS_MD).write_text('# Results\n\nkept text\n')
  argv = ['--modes', 'ista_one_stage', '--seeds', '0', '--steps', '2',
          '--search-epochs', '1', '--train-examples', '100',
          '--test-examples', '50', '--batch-size', '16', '--channels', '4',
          '--layers', '2', '--out', str(tmp_path / 'runs'),
          '--report-dir', str(report)]
  assert reproduce.main(argv) == 0
  results = json.loads((report / reproduce.RESULTS_JSON).read_text())
  (run,) = results['runs']
  assert run['status'] == 'finished' and run['train_steps'] == 2
  assert 0.0 <= run['test_accuracy'] <= 1.0
  text = (report / reproduce.RESULTS_MD).read_text()
  assert text.startswith('# Results\n\nkept text\n')
  assert f"{run['test_accuracy'] * 100:.2f}" in text
  assert (report / reproduce.PLOT_FILE).stat().st_size > 0
  assert (report / reproduce.CURVES_FILE).stat().st_size > 0
  assert 0.0 <= run['train_accuracy'] <= 1.0
  # Rerunning finds the run finished: nothing is retrained.
  assert reproduce.main(argv) == 0
  assert 'already finished' in capsys.readouterr().out

  assert not os.path.isabs(run['workdir'])
  workdir = os.path.join(reproduce.REPO_ROOT, run['workdir'])
  assert landscape.main(['--workdirs', workdir, '--out-dir',
                         str(report), '--grid', '2', '--examples', '8']) == 0
  name = os.path.basename(run['workdir'])
  grid = json.loads((report / f'{name}_landscape.json').read_text())
  assert np.asarray(grid['loss']).shape == (2, 2)
  assert np.all(np.isfinite(grid['loss']))
  assert (report / f'{name}_landscape.png').stat().st_size > 0



def test_ablate_search_arms_differ_only_in_what_they_test(tmp_path):
  args = ablate_search.parse_args(['--out', str(tmp_path), '--seeds', '1',
                                   '--cifar10', '/d/c10.zip'])
  budget = ablate_search.Budget()
  commands = {arm.name: ablate_search.command(args, budget, 'cifar10', 1, arm)
              for arm in ablate_search.arms(args.random_genotypes,
                                            args.eta_draws)}
  assert len(commands) == 5 + 5 + 6 + 3 * 5
  assert ablate_search.dataset_arms(args, 'cifar10') == tuple(
      ablate_search.arms(args.random_genotypes, args.eta_draws))
  flags = lambda name: {f for f in commands[name][3:]
                        if not f.startswith('--workdir')}
  assert flags('da_learned') ^ flags('da_uniform') == {
      '--config.da.policy_lr=0.0'}
  assert flags('search') ^ flags('hpo_learned') == {
      '--config.mode=ista_one_stage', '--config.mode=nas_hpo'}
  # The changed dynamics differ from their arm in that change alone.
  assert flags('da_learned') ^ flags('da_fast') == {
      '--config.da.policy_lr=0.05', '--config.da.max_kl_from_uniform=0.0'}
  assert flags('da_learned') ^ flags('da_slow') == {
      '--config.da.policy_lr=0.01'}
  assert flags('hpo_learned') ^ flags('hpo_annealed') == {
      '--config.optimizer.anneal_learned_lr=True'}
  assert flags('hpo_annealed') ^ flags('hpo_exact') == {
      '--config.hpo.meta_lr=0.03', '--config.hpo.mode=exact'}
  assert flags('search') ^ flags('search_heldout') == {
      '--config.nas.code_loss=heldout'}
  # HPO from a drawn η₀: the fixed schedule starts where η starts.
  lr, wd = ablate_search.drawn_eta(1, 2)
  assert flags('fixed_eta2') ^ flags('hpo_eta2') == {
      '--config.mode=ista_one_stage', '--config.mode=nas_hpo',
      f'--config.optimizer.learning_rate={lr}',
      f'--config.optimizer.weight_decay={wd}',
      f'--config.hpo.init_lr={lr}', f'--config.hpo.init_wd={wd}',
      '--config.optimizer.anneal_learned_lr=True'}
  assert flags('hpo_eta2') ^ flags('hpo_eta_fast2') == {
      '--config.hpo.meta_lr=0.03'}
  assert flags('hpo_eta_fast2') ^ flags('hpo_eta_exact2') == {
      '--config.hpo.mode=exact'}
  assert flags('hpo_eta_exact2') ^ flags('hpo_eta_exact_lr2') == {
      f'--config.hpo.wd_bounds=({wd}, {wd})'}
  for arm, search in (('searched', 'search'),
                      ('searched_heldout', 'search_heldout')):
    genotype = [f for f in commands[arm] if 'genotype=' in f][0]
    assert genotype.endswith(os.path.join('seed1', search, 'genotype.json'))
  random0 = [f for f in commands['random0'] if 'genotype=' in f][0]
  path = random0.split('=', 1)[1]
  first = open(path).read()
  assert ss.Genotype.from_json(first)
  os.remove(path)
  ablate_search.command(args, budget, 'cifar10', 1,
                        ablate_search.arms(5, 3)[5])  # drawn again, the same
  assert open(path).read() == first
  assert '--config.dataset.path=/d/c10.zip' in commands['search']


def test_ablate_search_digits_small_runs_the_config_arms_on_200_digits(
    tmp_path):
  args = ablate_search.parse_args(['--out', str(tmp_path)])
  budget = ablate_search.Budget()
  small = ablate_search.dataset_arms(args, 'digits_small')
  assert [a.name for a in small] == [
      'search', 'da_learned', 'da_uniform', 'hpo_learned', 'searched',
      'random0', 'random1', 'random2', 'random3', 'random4', 'hpo_exact']
  assert len(ablate_search.dataset_arms(args, 'digits')) == 31
  genotype = lambda dataset, arm: [
      f.split('=', 1)[1]
      for f in ablate_search.command(args, budget, dataset, 0, arm)
      if 'model.genotype=' in f]
  for arm in small:
    flags = lambda dataset: {
        f for f in ablate_search.command(args, budget, dataset, 0, arm)[5:]
        if 'model.genotype=' not in f}
    # The same run as on digits, on a subset half of which is held out.
    assert flags('digits_small') - flags('digits') == {
        '--config.dataset.max_train_examples=200',
        '--config.dataset.val_ratio=0.5'}
    assert flags('digits') <= flags('digits_small')
    # The same random cells as on digits; the searched one its own.
    if isinstance(arm.genotype, int):
      (mine,), (theirs,) = genotype('digits_small', arm), genotype('digits',
                                                                   arm)
      assert mine != theirs and open(mine).read() == open(theirs).read()
    elif arm.genotype is not None:
      (path,) = genotype('digits_small', arm)
      assert os.path.join('digits_small', 'seed0', 'search') in path
  # Its report compares only the arms it runs.
  records = [{'dataset': 'digits_small', 'seed': seed, 'arm': arm,
              'mode': 'train', 'status': 'finished', 'test_accuracy': test,
              'hpo_accuracy': test, 'wall_seconds': 60.0}
             for seed in (0, 1)
             for arm, test in (('search', 0.90), ('da_learned', 0.95),
                               ('da_uniform', 0.94), ('hpo_learned', 0.91))]
  table = ablate_search.comparison_table(records, 'digits_small')
  assert [line.split(' | ')[0] for line in table.splitlines()[2:]] == [
      '| DA', '| DA', '| HPO']
  body = ablate_search.report_body(
      records, ablate_search.parse_args(['--datasets', 'digits_small']),
      budget)
  assert '`hpo_eta` against' not in body and 'digits_small: 200 digits' in body


def test_ablate_search_arms_flag_selects_arms_by_name_or_prefix():
  args = ablate_search.parse_args(['--arms', 'fixed_eta,hpo_eta_exact'])
  assert [a.name for a in ablate_search.dataset_arms(args, 'cifar10')] == [
      'fixed_eta0', 'hpo_eta_exact0', 'fixed_eta1', 'hpo_eta_exact1',
      'fixed_eta2', 'hpo_eta_exact2']
  # Within a data set's own arms only.
  args = ablate_search.parse_args(['--arms', 'search,fixed_eta'])
  assert [a.name for a in ablate_search.dataset_arms(
      args, 'digits_small')] == ['search']
  with pytest.raises(SystemExit):
    ablate_search.parse_args(['--arms', 'hpo_eta_exac'])


def test_ablate_search_verdict():
  assert ablate_search.verdict([0.9, 0.91, 0.92], [0.8, 0.81, 0.82]).startswith(
      'beats')
  assert ablate_search.verdict([0.8, 0.81, 0.82], [0.9, 0.91, 0.92]).startswith(
      'loses')
  assert ablate_search.verdict([0.8, 0.9], [0.85, 0.86]).startswith('tie')
  assert ablate_search.verdict([0.8], [0.85, 0.86]) == 'too few runs'


def test_ablate_search_drawn_eta_lies_in_hpo_bounds_log_uniformly():
  draws = np.array([ablate_search.drawn_eta(seed, k)
                    for seed in range(50) for k in range(4)])
  bounds = hpo.default_config()
  for column, (lo, hi) in enumerate((bounds.lr_bounds, bounds.wd_bounds)):
    values = draws[:, column]
    assert np.all((lo <= values) & (values <= hi))
    # Log-uniform: the log's quartiles near those of U[log lo, log hi].
    quartiles = np.quantile(np.log(values), [0.25, 0.5, 0.75])
    expected = np.log(lo) + np.array([0.25, 0.5, 0.75]) * np.log(hi / lo)
    np.testing.assert_allclose(quartiles, expected, atol=0.1 * np.log(hi / lo))
  assert ablate_search.drawn_eta(0, 1) == ablate_search.drawn_eta(0, 1)
  assert ablate_search.drawn_eta(0, 1) != ablate_search.drawn_eta(1, 1)


def test_ablate_search_pairs_runs_by_seed_and_draw():
  def run(seed, arm, test, **more):
    return {'dataset': 'cifar10', 'seed': seed, 'arm': arm,
            'status': 'finished', 'test_accuracy': test, 'hpo_accuracy': test,
            **more}
  hpo_run = lambda seed, k, test: run(
      seed, f'hpo_eta{k}', test, final_learning_rate=0.01,
      final_weight_decay=1e-4,
      **dict(zip(('initial_learning_rate', 'initial_weight_decay'),
                 ablate_search.drawn_eta(seed, k))))
  records = [run(0, 'fixed_eta0', 0.30), hpo_run(0, 0, 0.35),
             run(0, 'fixed_eta1', 0.40), hpo_run(0, 1, 0.41),
             run(1, 'fixed_eta0', 0.20), hpo_run(1, 0, 0.32),
             hpo_run(1, 1, 0.5),  # its fixed run is missing: no pair
             # Another arm's prefix extends 'hpo_eta': not one of its pairs.
             run(0, 'hpo_eta_fast0', 0.1), run(0, 'hpo_eta_exact0', 0.1),
             run(0, 'hpo_eta_exact_lr0', 0.1),
             run(1, 'search', 0.9)]
  pairs = ablate_search.paired_runs(records, 'cifar10', 'hpo_eta',
                                    'fixed_eta')
  assert [(a['seed'], a['arm'], b['arm']) for a, b in pairs] == [
      (0, 'hpo_eta0', 'fixed_eta0'), (0, 'hpo_eta1', 'fixed_eta1'),
      (1, 'hpo_eta0', 'fixed_eta0')]
  # Differences 5, 1 and 12 points: mean 6 > their sd 5.57; the t interval
  # 6 ± 4.303 · 5.57 / √3 (t's 97.5 % quantile at 2 degrees of freedom).
  expected = ('beats by 6.00 (paired; > 1 sd = 5.57; higher in 3 of 3 pairs; '
              '95% CI of the mean -7.83 to +19.83)')
  assert ablate_search.paired_verdict([0.05, 0.01, 0.12]) == expected
  table = ablate_search.comparison_table(records, 'cifar10')
  (row,) = [line for line in table.splitlines() if '| `hpo_eta` |' in line]
  assert row.endswith(f'| {expected} |')
  # No NAS arm among the records: no NAS comparison.
  assert 'random genotypes' not in table
  rows = ablate_search.eta_table(records, 'cifar10',
                                 'hpo_eta').splitlines()[2:]
  assert len(rows) == 3 and rows[2].endswith('| +12.00 |')
  lr, wd = ablate_search.drawn_eta(1, 0)
  assert f'| 1 | 0 | {lr:.4g}, {wd:.4g} | 0.01, 0.0001 |' in rows[2]
  assert ablate_search.paired_verdict([0.01, -0.02]).startswith('tie')
  assert ablate_search.paired_verdict([-0.05, -0.04]).startswith('loses')
  assert ablate_search.paired_verdict([0.05]) == 'too few pairs'


def test_ablate_search_mean_interval_is_students_t():
  # Mean 2, sd 1, n = 3: 2 ± 4.3027 / √3; n = 30: t's quantile near 2.045.
  np.testing.assert_allclose(ablate_search.mean_interval([1.0, 2.0, 3.0]),
                             (2 - 2.48414, 2 + 2.48414), atol=1e-5)
  values = np.linspace(-1.0, 1.0, 30)
  half = 2.04523 * values.std(ddof=1) / np.sqrt(30)
  np.testing.assert_allclose(ablate_search.mean_interval(list(values)),
                             (-half, half), atol=1e-5)


# ------------------------------------------------------------ profile_step
HLO = '''HloModule jit_train_step

%fused_computation.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %m = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(train_step)/transpose(jvp(DARTSNetwork))/cell0/n0_e1_sep_conv_3x3/SepConv_0/DilConv_0/BatchNorm_0/mul"}
  ROOT %a = f32[4]{0} add(%m, %p), metadata={op_name="jit(train_step)/transpose(jvp(DARTSNetwork))/cell0/n0_e1_sep_conv_3x3/SepConv_0/DilConv_0/Conv_0/add"}
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %convolution.3 = f32[4]{0} convolution(%x, %x), feature_group_count=4, metadata={op_name="jit(train_step)/jvp(DARTSNetwork)/cell0/n0_e1_dil_conv_3x3/DilConv_0/Conv_0/conv_general_dilated"}
  %ynn_fusion = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %copy.2 = f32[4]{0} copy(%x)
  %while.5 = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body, metadata={op_name="jit(train_step)/transpose(jvp(DARTSNetwork))/cell0/pre0/Conv_0/while"}
  ROOT %max.1 = f32[4]{0} maximum(%x, %x), metadata={op_name="jit(train_step)/jvp(DARTSNetwork)/cell1/n2_e0_max_pool_3x3/reduce_window_max"}
}
'''


def test_profile_attributes_thunks_to_source_ops_by_kind():
  names = profile_step.hlo_op_names(HLO)
  # A fusion without metadata is charged to its computation's root.
  assert names['ynn_fusion'].endswith('DilConv_0/Conv_0/add')
  assert names['copy.2'] == ''
  # A loop's body ops are traced themselves: the loop is not counted.
  assert 'while.5' not in names
  totals = {'convolution.3': 3000.0, 'ynn_fusion': 1000.0, 'max.1': 500.0,
            'copy.2': 250.0, 'ThunkExecutor::Execute': 1e6, 'while.5': 1e5}
  kinds, sources = profile_step.breakdown(totals, names, steps=2)
  assert kinds['depthwise conv'] == {'forward_ms': 1.5, 'backward_ms': 0.5}
  assert kinds['pools'] == {'forward_ms': 0.25, 'backward_ms': 0.0}
  assert kinds[profile_step.UNATTRIBUTED]['forward_ms'] == 0.125
  assert sum(ms for _, ms in sources) == pytest.approx(2.375)
  assert sources[0] == (names['convolution.3'], 1.5)


# ------------------------------------------------------------------ ab_step
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ab_step_alternates_the_trees_abba():
  assert ab_step.abba_order(4) == [0, 1, 1, 0, 0, 1, 1, 0]
  assert ab_step.abba_order(0) == []


@pytest.mark.slow
def test_ab_step_times_each_tree_every_round(tmp_path):
  """The same tree as A and B: every round times one step of each, and the
  paired ratio of two identical steps is near 1."""
  log = tmp_path / 'workers.log'
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.ab_step', '--before', _ROOT,
       '--after', _ROOT, '--mode', 'train', '--rounds', '4',
       '--log', str(log), '--', '--layers', '1', '--channels', '4',
       '--batch', '4', '--size', '8'],
      cwd=_ROOT, capture_output=True, text=True, check=True, timeout=900)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['rounds'] == 4 and result['mode'] == 'train'
  for tree in ('before', 'after'):
    assert 0 < result[f'{tree}_best_s'] <= result[f'{tree}_median_s']
  assert 0.2 < result['after_over_before_paired_median'] < 5


def test_ab_step_refuses_a_tree_that_is_not_a_checkout(tmp_path, capsys,
                                                       monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['ab_step', '--before', str(tmp_path),
                                    '--after', _ROOT])
  with pytest.raises(SystemExit):
    ab_step.main()
  assert 'is not a checkout of this repository' in capsys.readouterr().err


# ---------------------------------------------------------------- benchlib
# Without retained host memory: this process's malloc stays as it was.
_NO_RETAIN = ['--retain-host-memory', '0']


def test_a_benchmark_offers_only_the_options_it_reads(capsys):
  options = ('channels', 'batch', 'size')
  args = benchlib.parse_args('doc', options=options, repeats=10,
                             argv=['--batch', '4', *_NO_RETAIN])
  assert (args.batch, args.repeats, args.threads) == (4, 10, 'all')
  assert not hasattr(args, 'depthwise')
  for flag in ('--depthwise', '--genotype', '--layers', '--steps'):
    with pytest.raises(SystemExit):
      benchlib.parse_args('doc', options=options,
                          argv=[flag, '1', *_NO_RETAIN])
    assert f'unrecognized arguments: {flag}' in capsys.readouterr().err
  with pytest.raises(ValueError, match="'repeats'"):
    benchlib.parse_args('doc', options=('repeats',), argv=_NO_RETAIN)


@pytest.mark.parametrize('flags, genotype', [
    ([], ss.DARTS_V2),
    (['--genotype', os.path.join(reproduce.EXPERIMENTS_DIR,
                                 'bench_genotype.json')], 'bench_genotype'),
    (['--space', 'mobilenet'], ms.PROXYLESS_MOBILE)])
def test_the_benchmarks_time_the_genotype_of_their_options(flags, genotype):
  """bench_nas' sparse child and bench_hpo's network are `--genotype`'s, in
  `--space`."""
  args = benchlib.parse_args('doc', argv=[*flags, *_NO_RETAIN])
  config = benchlib.bench_config(args)
  space = spaces.from_config(config)
  if genotype == 'bench_genotype':
    with open(args.genotype) as f:
      genotype = ss.Genotype.from_json(f.read())
    assert genotype != ss.DARTS_V2
  assert benchlib.genotype_support(config, space) == (
      space.genotype_to_support(genotype))


# ----------------------------------------------------------- bench_official
def _genotype():
  with open(bench_official.GENOTYPE) as f:
    return json.load(f)


def test_bench_official_codes_select_exactly_the_genotypes_edges():
  """The sparse codes give the official network the genotype's support:
  each node's two (input, op) entries are 1 in the official op order, and
  reading the nonzero op weights back gives the genotype's pairs."""
  genotype = _genotype()
  for cell in ('normal', 'reduce'):
    codes = bench_official.sparse_codes(genotype[cell])
    assert [c.shape for c in codes] == [(14,), (21,), (28,), (35,)]
    assert [c.sum() for c in codes] == [2.0] * 4
    x = codes[1]   # node 1: (op, input) pairs 2 and 3 of the genotype
    for op, source in genotype[cell][2:4]:
      assert x[source * 7 + bench_official.PRIMITIVES_ISTA.index(op)] == 1.0
    weights = np.concatenate([c.reshape(-1, 7) for c in codes])
    assert weights.shape == (14, 7)   # 2 + 3 + 4 + 5 edges
    assert (sorted(bench_official.support_of(weights))
            == sorted((op, s) for op, s in genotype[cell]))


@pytest.mark.parametrize('edge', [
    ('dil_conv_5x5', 0),   # the op the official selection never picks
    ('sep_conv_3x3', 2),   # an input node 0 does not have
    ('conv_7x7', 0)])      # not an op of the space
def test_bench_official_refuses_edges_the_official_code_cannot_run(edge):
  cell = [list(e) for e in _genotype()['normal']]
  cell[0] = list(edge)   # node 0 has inputs 0 and 1 only
  op, source = edge
  with pytest.raises(ValueError, match=(
      f"node 0: \\('{op}', {source}\\) is not an edge the official code "
      'can select')):
    bench_official.sparse_codes(cell)


def test_bench_official_refuses_a_cell_without_two_edges_per_node():
  with pytest.raises(ValueError, match='has 7 edges, not 8'):
    bench_official.sparse_codes(_genotype()['normal'][:7])


def test_bench_official_refuses_a_folder_that_is_not_the_official_code(
    tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['bench_official', '--official',
                                    str(tmp_path)])
  with pytest.raises(SystemExit):
    bench_official.main()
  assert 'is not a checkout of the official code' in capsys.readouterr().err
