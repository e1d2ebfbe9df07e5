"""End-to-end tests of the train step and the training loop."""

import json
import os
import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dha_jax
from dha_jax import data
from dha_jax import hpo
from dha_jax import parallel
from dha_jax import step as step_lib
from dha_jax import train
from dha_jax.nas import search_space as ss
from tests import tiny

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('train_test')


def tiny_config():
  return tiny.tiny_config('train', {
      'dataset.max_train_examples': 256, 'dataset.max_test_examples': 64,
      'dataset.val_ratio': 0.1, 'model.auxiliary': True, 'batch_size': 16,
      'eval_batch_size': 32})


def _step_fn(mesh, config, model, tx, arch):
  pre = step_lib.Preprocess.from_config(config, (0.5,) * 3, (0.25,) * 3)
  return step_lib.make_train_step(
      mesh, model=model, tx=tx, components=(), fixed_arch=arch, pre=pre,
      aux_weight=config.model.aux_weight,
      default_hparams=lambda s: {'learning_rate': jnp.float32(0.1),
                                 'weight_decay': jnp.float32(1e-3)},
      drop_path_rate=lambda s: jnp.float32(0.1))


def _tiny_network(config):
  """(model, DARTS_V2 architecture, θ's optimizer, initial variables, a
  random uint8 batch of 16 8-pixel images and labels)."""
  model = train.create_model(config, 10)
  arch = ss.genotype_architecture(ss.DARTS_V2)
  tx = hpo.optimizer_from_config(config)
  variables = jax.device_get(train.init_variables(
      model, arch, (1, 8, 8, 3), jax.random.key(0)))
  rng = np.random.default_rng(0)
  batch = (rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
           rng.integers(0, 10, (16,)).astype(np.int32))
  return model, arch, tx, variables, batch, rng


def _initial_state(mesh, tx, variables, components):
  return parallel.replicate(mesh, step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']), components=components,
      rng=jax.random.key_data(jax.random.key(1))))


def test_two_devices_give_the_one_device_result():
  assert jax.device_count() >= 2, 'conftest fakes 2 CPU devices'
  config = tiny_config()
  model, arch, tx, variables, batch, rng = _tiny_network(config)
  hpo_batch = (rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
               rng.integers(0, 10, (16,)).astype(np.int32))
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:2]):
    mesh = parallel.make_mesh(devices)
    state = _initial_state(mesh, tx, variables, {})
    fn = _step_fn(mesh, config, model, tx, arch)
    for _ in range(2):
      state, metrics = fn(state, parallel.shard_batch(mesh, batch),
                          parallel.shard_batch(mesh, hpo_batch))
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s1, m1), (s2, m2) = results
  assert int(s1.step) == int(s2.step) == 2
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for a, b in zip(jax.tree.leaves(s1.batch_stats),
                  jax.tree.leaves(s2.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _eta_component(learning_rate: float, weight_decay: float):
  """Supplies a constant η; reports d(sum θ⁺)/d lr of the update that a
  hypergradient would differentiate (`ctx.inner_update`)."""

  def update(state, ctx):
    def total(lr):
      new = ctx.inner_update({'learning_rate': lr,
                              'weight_decay': jnp.float32(weight_decay)})
      return sum(jnp.sum(p) for p in jax.tree.leaves(new))
    return state, {'dtotal_dlr': jax.grad(total)(jnp.float32(learning_rate))}

  return dha_jax.Component(
      name='eta', init=lambda key: {}, update=update,
      hyperparams=lambda state: {
          'learning_rate': jnp.float32(learning_rate),
          'weight_decay': jnp.float32(weight_decay)})


def test_a_learned_lr_is_annealed_in_the_update_and_in_its_gradient():
  # optimizer.anneal_learned_lr: θ's learning rate is η times the schedule's
  # fraction, also inside the update that the hypergradient differentiates.
  config = tiny_config()
  model, arch, tx, variables, batch, _ = _tiny_network(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  pre = step_lib.Preprocess.from_config(config, (0.5,) * 3, (0.25,) * 3)
  lr, wd, fraction = 0.2, 1e-3, 0.25
  results = []
  for component, scale in ((_eta_component(lr, wd), lambda s: fraction),
                           (_eta_component(lr * fraction, wd), None)):
    state = _initial_state(mesh, tx, variables, {'eta': {}})
    fn = step_lib.make_train_step(
        mesh, model=model, tx=tx, components=(component,), fixed_arch=arch,
        pre=pre, aux_weight=config.model.aux_weight,
        default_hparams=None, drop_path_rate=lambda s: jnp.float32(0.0),
        learned_lr_scale=scale)
    sharded = parallel.shard_batch(mesh, batch)
    results.append(jax.device_get(fn(state, sharded, sharded)))
  (annealed, m1), (scaled_by_hand, m2) = results
  np.testing.assert_allclose(m1['learning_rate'], lr * fraction, rtol=1e-6)
  np.testing.assert_allclose(m2['learning_rate'], lr * fraction, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(annealed.params),
                  jax.tree.leaves(scaled_by_hand.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # d/dη of θ⁺(η · fraction) is fraction times θ⁺'s derivative there.
  np.testing.assert_allclose(m1['eta/dtotal_dlr'],
                             fraction * m2['eta/dtotal_dlr'], rtol=1e-4)


def _heldout_probe():
  """Reports the held-out loss of θ and the training loss of the step."""
  def update(state, ctx):
    return state, {'heldout': ctx.heldout_loss(ctx.params),
                   'train': jnp.mean(ctx.per_example_loss)}
  return dha_jax.Component(name='probe', init=lambda key: {}, update=update,
                           uses_heldout=True)


def test_the_heldout_forward_draws_its_own_drop_path_masks():
  # No augmentation and no auxiliary head: on the training batch, the two
  # forwards differ only in their drop-path masks.
  config = tiny_config()
  config.model.auxiliary = False
  config.preprocess.pad = 0
  model, arch, tx, variables, batch, _ = _tiny_network(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  pre = step_lib.Preprocess.from_config(config, (0.5,) * 3, (0.25,) * 3)
  losses = {}
  for rate in (0.0, 0.5):
    fn = step_lib.make_train_step(
        mesh, model=model, tx=tx, components=(_heldout_probe(),),
        fixed_arch=arch, pre=pre, aux_weight=0.0,
        default_hparams=lambda s: {'learning_rate': jnp.float32(0.1),
                                   'weight_decay': jnp.float32(0.0)},
        drop_path_rate=lambda s, rate=rate: jnp.float32(rate))
    sharded = parallel.shard_batch(mesh, batch)
    _, metrics = fn(_initial_state(mesh, tx, variables, {'probe': {}}),
                    sharded, sharded)
    losses[rate] = (float(metrics['probe/heldout']),
                    float(metrics['probe/train']))
  assert losses[0.0][0] == pytest.approx(losses[0.0][1], rel=1e-5)
  assert abs(losses[0.5][0] - losses[0.5][1]) > 1e-3


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run') / 'wd')
  summary = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def test_train_and_evaluate_writes_the_workdir_contract(finished_run):
  workdir, summary = finished_run
  for name in ('config.json', 'metrics.jsonl', 'summary.json',
               'genotype.json', 'checkpoints'):
    assert os.path.exists(os.path.join(workdir, name)), name
  for key in ('mode', 'dataset', 'test_accuracy', 'hpo_accuracy',
              'train_steps',
              'search_steps', 'wall_seconds', 'param_count', 'genotype'):
    assert key in summary, key
  assert summary['train_steps'] == 4
  assert 0.0 <= summary['test_accuracy'] <= 1.0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if r['phase'] == 'train'] == [2, 4]
  assert all(np.isfinite(r['loss']) for r in records if r['phase'] == 'train')
  genotype = ss.Genotype.from_json(
      open(os.path.join(workdir, 'genotype.json')).read())
  assert genotype == ss.DARTS_V2


def test_tensorboard_events_hold_the_logged_scalars_and_plots(finished_run):
  workdir, _ = finished_run
  scalars, images = tiny.read_tensorboard(workdir)
  records = train.read_metrics(workdir)
  train_records = [r for r in records if r['phase'] == 'train']
  for key in ('loss', 'accuracy', 'learning_rate', 'weight_decay',
              'step_seconds'):
    assert scalars[f'train/{key}'] == [
        (r['step'], pytest.approx(r[key], rel=1e-6)) for r in train_records]
  test_record, = [r for r in records if r['phase'] == 'test']
  assert scalars['test/test_accuracy'] == [
      (test_record['step'], pytest.approx(test_record['test_accuracy']))]
  # Every number of metrics.jsonl, and nothing else.
  assert set(scalars) == {tag for r in records
                          for tag in train.tensorboard_scalars(r)}
  assert images == ['hparams']


def test_train_eval_subset_is_fixed_and_capped():
  split = data.Split(data.ArraySource(np.zeros((20, 2, 2, 3), np.uint8)),
                     np.arange(20, dtype=np.int32))
  assert train.train_eval_subset(split, -1, seed=0) is split
  assert train.train_eval_subset(split, 20, seed=0) is split
  subset = train.train_eval_subset(split, 5, seed=0)
  assert len(subset) == 5 and len(set(subset.labels)) == 5
  np.testing.assert_array_equal(
      subset.labels, train.train_eval_subset(split, 5, seed=0).labels)
  assert not np.array_equal(subset.labels,
                            train.train_eval_subset(split, 5, seed=1).labels)


@pytest.mark.slow
def test_eval_records_give_the_learning_curves(tmp_path):
  """One epoch of 14 steps, evaluated at its end: the record there and the
  summary measure the same θ on the same examples."""
  config = tiny_config()
  config.num_train_steps = 14  # 230 training examples / 16
  config.eval_every_epochs = 1
  config.eval_train_examples = 50
  summary = train.train_and_evaluate(config, str(tmp_path / 'wd'))
  records = train.read_metrics(str(tmp_path / 'wd'))
  evals = [r for r in records if r['phase'] == 'eval']
  assert [(r['step'], r['epoch']) for r in evals] == [(14, 1.0)]
  assert evals[0]['train_accuracy'] == summary['train_accuracy']
  assert evals[0]['hpo_accuracy'] == summary['hpo_accuracy']
  assert np.isfinite(evals[0]['train_loss']) and evals[0]['hpo_loss'] > 0
  # 50 examples: accuracy in steps of 1/50.
  assert summary['train_accuracy'] * 50 == pytest.approx(
      round(summary['train_accuracy'] * 50))


def test_finished_run_is_not_retrained(finished_run):
  workdir, summary = finished_run
  before = os.path.getmtime(os.path.join(workdir, 'metrics.jsonl'))
  again = train.train_and_evaluate(tiny_config(), workdir)
  assert again == json.loads(json.dumps(summary))
  assert os.path.getmtime(os.path.join(workdir, 'metrics.jsonl')) == before


def test_resume_after_a_kill_matches_the_uninterrupted_run(finished_run,
                                                           tmp_path):
  """A copy of the run as a kill after the step-2 checkpoint leaves it."""
  workdir, summary = finished_run
  killed = str(tmp_path / 'killed')
  shutil.copytree(workdir, killed)
  os.remove(os.path.join(killed, 'summary.json'))
  shutil.rmtree(os.path.join(killed, 'checkpoints', '4'))
  resumed = train.train_and_evaluate(tiny_config(), killed)
  assert resumed['test_accuracy'] == summary['test_accuracy']
  assert resumed['test_loss'] == pytest.approx(summary['test_loss'], rel=1e-6)
  with open(os.path.join(killed, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [2, 4, 4]  # two train logs, then the test record
  # TensorBoard hides the killed run's events after the checkpoint.
  scalars, _ = tiny.read_tensorboard(killed)
  assert [s for s, _ in scalars['train/loss']] == [2, 4]


def test_resume_after_the_final_checkpoint_writes_one_test_record(
    finished_run, tmp_path):
  """A copy of the run as a kill after the final checkpoint and the test
  record, before summary.json, leaves it."""
  workdir, summary = finished_run
  killed = str(tmp_path / 'killed')
  shutil.copytree(workdir, killed)
  os.remove(os.path.join(killed, 'summary.json'))
  resumed = train.train_and_evaluate(tiny_config(), killed)
  assert resumed['test_accuracy'] == summary['test_accuracy']
  assert [(r['step'], r['phase']) for r in train.read_metrics(killed)] == [
      (2, 'train'), (4, 'train'), (4, 'test')]
  # TensorBoard likewise: one test record, the kept step-4 train record.
  scalars, images = tiny.read_tensorboard(killed)
  assert [s for s, _ in scalars['test/test_accuracy']] == [4]
  assert [s for s, _ in scalars['train/loss']] == [2, 4]
  assert images == ['hparams']


def test_every_process_refuses_a_damaged_metrics_file(tmp_path,
                                                      monkeypatch):
  # Not only process 0, which rewrites it: the others would otherwise wait
  # for it in the first step.
  monkeypatch.setattr(parallel, 'is_primary_process', lambda: False)
  (tmp_path / 'metrics.jsonl').write_text('not json\n{"step": 1}\n')
  with pytest.raises(train.RunError, match='line 1 is not JSON'):
    train.MetricsWriter(str(tmp_path), 1, tensorboard=False)


def test_the_deployed_network_has_no_auxiliary_head(finished_run):
  workdir, summary = finished_run
  with open(os.path.join(workdir, 'model.msgpack'), 'rb') as f:
    deployed = flax.serialization.msgpack_restore(f.read())
  assert 'aux_head' not in deployed['params']
  run = train.Run.create(tiny_config(), workdir='')
  support = run.space.genotype_architecture(ss.DARTS_V2).support_dict
  # The parameters of Eq. 1: the network at inference.
  assert summary['param_count'] == run.param_count_of(support)
  assert summary['param_count'] == train.param_count(deployed['params'])
  with_aux = train.param_count(run.variable_shapes(
      ss.genotype_architecture(ss.DARTS_V2))['params'])
  assert with_aux > summary['param_count']


def test_logs_are_timed_resume_drops_a_torn_line_and_no_heldout_is_read(
    tmp_path, monkeypatch):
  """log_every_steps=1: the first (compiling) step has no time per step.
  A kill that tears the last line of metrics.jsonl leaves a run that
  resumes. A run whose components read no held-out batch draws none."""
  splits = []
  batches = data.train_batches

  def recording(split, *args, **kwargs):
    splits.append(len(split))
    return batches(split, *args, **kwargs)

  monkeypatch.setattr(data, 'train_batches', recording)
  workdir = str(tmp_path / 'wd')
  config = tiny.tiny_config('train', {'log_every_steps': 1})
  summary = train.train_and_evaluate(config, workdir)
  run = train.Run.create(config, workdir='')
  assert splits == [len(run.dataset.train)]  # the training batches only
  records = [r for r in train.read_metrics(workdir) if r['phase'] == 'train']
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert 'step_seconds' not in records[0]
  assert all(0 < r['step_seconds'] < 60 for r in records[1:])
  os.remove(os.path.join(workdir, 'summary.json'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 5, "loss": 0.')
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed['test_loss'] == pytest.approx(summary['test_loss'], rel=1e-6)
  assert [(r['step'], r['phase']) for r in train.read_metrics(workdir)] == [
      (1, 'train'), (2, 'train'), (3, 'train'), (4, 'train'), (4, 'test')]
  # A damaged line before the last one is not guessed at.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('not json\n{"step": 1, "phase": "train"}\n')
  with pytest.raises(train.RunError, match='metrics.jsonl line 6 is not '
                     'JSON'):
    train.MetricsWriter(workdir, 4, tensorboard=False)


def done_after_one_epoch(config):
  """A user component that ends the search at the first epoch's end."""
  del config
  return dha_jax.Component(name='enough', init=lambda key: {},
                           search_done=lambda state: True)


def test_a_search_that_ends_early_logs_its_last_steps(tmp_path):
  workdir = str(tmp_path / 'wd')
  config = tiny.tiny_config('ista_one_stage', {
      'log_every_steps': 100, 'nas.search_epochs': 2,
      'extra_components': 'tests.train_test:done_after_one_epoch'})
  summary = train.train_and_evaluate(config, workdir)
  assert summary['search_steps'] == 3  # 30 training examples / 8
  search = [r for r in train.read_metrics(workdir) if r['phase'] == 'search']
  assert [r['step'] for r in search] == [3]
  assert np.isfinite(search[0]['loss'])


def test_workdir_of_another_config_is_refused(finished_run):
  workdir, _ = finished_run
  config = tiny_config()
  config.model.channels = 6
  with pytest.raises(train.RunError, match='different config'):
    train.train_and_evaluate(config, workdir)


def test_workdir_from_before_a_new_config_field_resumes(tmp_path):
  config = tiny_config()
  saved = json.loads(config.to_json_best_effort())
  del saved['heldout_batch_size']  # a field added after the run was made
  del saved['hpo']['meta_lr']
  with open(tmp_path / train.CONFIG_FILE, 'w') as f:
    json.dump(saved, f)
  train.check_workdir_config(str(tmp_path), config)  # no error
  filled = train.read_config_json(str(tmp_path / train.CONFIG_FILE),
                                  {'heldout_batch_size': 7, 'hpo': {'meta_lr': 1}})
  assert filled['heldout_batch_size'] == 7 and filled['hpo']['meta_lr'] == 1
  assert filled['hpo']['mode'] == config.hpo.mode
  config.model.channels = 6
  with pytest.raises(train.RunError, match=r"\['model'\]"):
    train.check_workdir_config(str(tmp_path), config)


def test_heldout_batch_size_sets_the_hpo_batch():
  exact = {'hpo.mode': 'exact'}
  run = train.Run.create(tiny.tiny_config('dha', exact), workdir='')
  assert run.heldout_batch_size == run.config.batch_size == 8
  assert run.hpo_split is run.dataset.hpo
  run = train.Run.create(tiny.tiny_config('dha', {**exact,
                                             'heldout_batch_size': 4}), '')
  assert run.heldout_batch_size == 4
  images, labels = next(data.train_batches(run.hpo_split,
                                           run.heldout_batch_size, seed=0))
  assert images.shape[0] == labels.shape[0] == 4
