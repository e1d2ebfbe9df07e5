"""Bad input and faults: clear one-line errors, nothing half-written, never
a non-finite checkpoint (the training loop in dha_jax/train.py, the command
line in dha_jax/main.py)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax.numpy as jnp
import pytest

import dha_jax
from dha_jax import data
from dha_jax import train
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'dha_jax.main', '--config=configs/default.py',
       f'--workdir={workdir}', *tiny.cli_flags(), *flags],
      cwd=REPO, capture_output=True, text=True, timeout=600)


def da_named_component(config):
  """A user component that takes the name of the DA component."""
  del config
  return dha_jax.Component(name='da', init=lambda key: {})


def test_a_rejected_config_leaves_the_workdir_untouched(tmp_path):
  workdir = tmp_path / 'w'
  twice = ','.join(['tests.faults_test:sigterm_component'] * 2)
  for bad, message in (
      ({'mode': 'foo'}, 'foo'), ({'batch_size': 0}, 'batch_size'),
      ({'hpo.init_lr': 5.0}, 'init_lr'),  # outside hpo.lr_bounds
      ({'seed': -1}, 'config.seed=-1'),
      ({'log_every_steps': 0}, 'config.log_every_steps=0'),
      ({'checkpoint_every_steps': 0}, 'config.checkpoint_every_steps=0'),
      ({'eval_train_examples': 0}, 'config.eval_train_examples=0'),
      ({'dataset.max_test_examples': 0}, 'dataset.max_test_examples=0'),
      ({'extra_components': twice}, 'names must be unique.*extra_components'),
      ({'extra_components': 'tests.faults_test:da_named_component'},
       'names must be unique.*extra_components'),
      # 10 HPO examples, no held-out batch of 16.
      ({'hpo.mode': 'exact', 'heldout_batch_size': 16},
       r'HPO split \(10 examples\) holds no held-out batch of 16: lower '
       'heldout_batch_size, or raise dataset.val_ratio')):
    config = tiny.tiny_config('dha', bad)
    with pytest.raises((train.RunError, data.DataError), match=message):
      train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists(), bad


def test_a_workdir_that_is_a_file_is_a_clear_error(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('keep me')
  with pytest.raises(train.RunError, match='is not a folder'):
    train.train_and_evaluate(tiny.tiny_config('train'), str(path))
  assert path.read_text() == 'keep me'


def test_a_non_finite_state_is_never_saved(tmp_path):
  workdir = tmp_path / 'nan'
  config = tiny.tiny_config('train', {
      'optimizer.learning_rate': 1e6, 'checkpoint_every_steps': 2,
      'log_every_steps': 8, 'num_train_steps': 10})
  with pytest.raises(train.RunError, match='at step 4; the newest checkpoint, '
                     'of step 2, holds finite values'):
    train.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert records[-1]['phase'] == 'nonfinite' and records[-1]['step'] == 4
  assert not (workdir / 'summary.json').exists()


def test_cli_errors_are_one_line_and_a_nonzero_exit(tmp_path):
  proc = _cli(tmp_path / 'w', '--config.batchsize=8')
  assert proc.returncode == 2
  assert 'Did you mean "batch_size"' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()
  # Alone, they would make every process believe it is process 0.
  proc = _cli(tmp_path / 'w', '--num_processes=2', '--process_id=1')
  assert proc.returncode == 2
  assert ('error: --num_processes and --process_id describe a '
          'multi-process job: add --distributed') in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()
  # A setting the mode ignores is named with what applies instead; the bad
  # batch size then stops the run before the workdir is made.
  proc = _cli(tmp_path / 'w', '--config.mode=dha',
              '--config.optimizer.learning_rate=1e6', '--config.batch_size=0')
  assert proc.returncode == 1
  assert ('warning: --config.optimizer.learning_rate has no effect in mode '
          "'dha'; it is set by hpo.init_lr and hpo.lr_bounds") in proc.stderr
  assert 'error: ' in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_ignored_fields_follow_the_components():
  assert 'optimizer.learning_rate' in train.ignored_fields(
      tiny.tiny_config('nas_hpo'))
  assert train.ignored_fields(tiny.tiny_config('nas_da')) == {}
  assert train.ignored_fields(tiny.tiny_config('train')) == {}


# A user component whose epoch_end sends SIGTERM to this process once, as a
# preempted VM would, at the epoch named by this variable (pytest may import
# this module twice, so no module global can carry it).
SIGTERM_EPOCH = 'DHA_TEST_SIGTERM_AT_EPOCH'


def sigterm_component(config):
  del config

  def epoch_end(state, epoch):
    if os.environ.get(SIGTERM_EPOCH) == str(epoch):
      del os.environ[SIGTERM_EPOCH]
      os.kill(os.getpid(), signal.SIGTERM)
    return state, {}

  return dha_jax.Component(name='preempt', init=lambda key: {},
                           epoch_end=epoch_end)


def test_sigterm_saves_stops_and_the_rerun_matches(tmp_path, monkeypatch):
  config = tiny.tiny_config('train', {
      'num_train_steps': 12, 'checkpoint_every_steps': 100,
      'log_every_steps': 4,
      'extra_components': 'tests.faults_test:sigterm_component'})
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / 'once'))
  monkeypatch.setenv(SIGTERM_EPOCH, '1')
  workdir = str(tmp_path / 'stopped')
  with pytest.raises(train.Interrupted, match='SIGTERM at step 6') as e:
    train.train_and_evaluate(config, workdir)  # 3 steps an epoch
  assert e.value.exit_code == 128 + signal.SIGTERM
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['6']
  # Steps 5 and 6, after the last log, are logged before the run stops.
  assert [r['step'] for r in train.read_metrics(workdir)
          if r['phase'] == 'train'] == [4, 6]
  # In the last step: the final state is saved, nothing is evaluated.
  monkeypatch.setenv(SIGTERM_EPOCH, '3')
  with pytest.raises(train.Interrupted, match='SIGTERM at step 12'):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '12', '6']
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed['test_accuracy'] == uninterrupted['test_accuracy']
  assert resumed['test_loss'] == uninterrupted['test_loss']
  assert [r['step'] for r in train.read_metrics(workdir)
          if r['phase'] == 'test'] == [12]
  assert [r['step'] for r in train.read_metrics(workdir)
          if r['phase'] == 'train'] == [4, 6, 8, 12]


# A user component whose state gains a field when this variable is set: the
# same config, run by code whose components changed.
GROWN_STATE = 'DHA_TEST_GROWN_STATE'


def growing_component(config):
  del config
  def init(key):
    del key
    return {'count': jnp.zeros((), jnp.int32)} if os.environ.get(
        GROWN_STATE) else {}
  return dha_jax.Component(name='grows', init=init)


def test_a_checkpoint_of_another_state_tree_is_refused_and_kept(
    tmp_path, monkeypatch):
  workdir = tmp_path / 'w'
  config = tiny.tiny_config('train', {
      'extra_components': 'tests.faults_test:growing_component'})
  train.train_and_evaluate(config, str(workdir))
  (workdir / 'summary.json').unlink()
  shutil.rmtree(workdir / 'checkpoints' / '4')
  metrics = (workdir / 'metrics.jsonl').read_text()
  monkeypatch.setenv(GROWN_STATE, '1')
  with pytest.raises(train.RunError, match=r"step 2 reads back, but its "
                     r"state differs .*grows/count.*different code version "
                     'or component set; nothing was moved. Use a new '
                     '--workdir'):
    train.train_and_evaluate(config, str(workdir))
  assert os.listdir(workdir / 'checkpoints') == ['2']
  assert not (workdir / 'damaged_checkpoints').exists()
  assert (workdir / 'metrics.jsonl').read_text() == metrics
  # A progress record this code cannot read (another version's fields) is
  # refused alike, not taken for damaged files.
  monkeypatch.delenv(GROWN_STATE)

  def older_record(meta, fresh):
    raise KeyError('search_steps')

  monkeypatch.setattr(train.Progress, 'from_json', older_record)
  with pytest.raises(train.RunError, match=r"step 2 reads back, but this "
                     r"code cannot rebuild its run \(KeyError.*nothing was "
                     'moved'):
    train.train_and_evaluate(config, str(workdir))
  assert os.listdir(workdir / 'checkpoints') == ['2']
  assert not (workdir / 'damaged_checkpoints').exists()
  assert (workdir / 'metrics.jsonl').read_text() == metrics


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder)
           for f in names]
  return max(files, key=os.path.getsize)


def test_a_damaged_newest_checkpoint_is_set_aside_and_an_older_one_used(
    tmp_path):
  workdir = tmp_path / 'w'
  config = tiny.tiny_config('train', {'checkpoint_every_steps': 2})
  finished = train.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  (workdir / 'summary.json').unlink()
  damaged = _largest_file(workdir / 'checkpoints' / '4')
  with open(damaged, 'r+b') as f:
    f.truncate(os.path.getsize(damaged) // 2)
  again = train.train_and_evaluate(config, str(workdir))
  assert (workdir / 'damaged_checkpoints' / '4').is_dir()  # kept, not deleted
  assert again['test_accuracy'] == finished['test_accuracy']
  assert again['test_loss'] == finished['test_loss']


def test_an_unwritable_workdir_is_a_clear_error(tmp_path, monkeypatch):
  # (As root every folder is writable, so the refusal is simulated.)
  def refuse(path, *args, **kwargs):
    raise PermissionError(13, 'Permission denied', path)
  monkeypatch.setattr(os, 'makedirs', refuse)
  with pytest.raises(train.RunError, match='cannot be written .*Permission '
                     'denied.*pass a folder you may write to'):
    train.make_workdir(str(tmp_path / 'locked'))
