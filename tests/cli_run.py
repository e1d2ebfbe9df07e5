"""What every mode's run from the command line must leave behind.

`tests/modes_test.py` runs each mode of the paper's tables from the CLI;
`tests/multihost_test.py`'s one-process run is the DHA mode's CLI run (the
same command), checked here too, so that the suite runs it once.
"""

import json
import os

import numpy as np

from dha_jax import modes
from tests import tiny

# Per mode, besides tiny.TINY: DHA forwards a held-out batch half the size of
# the training batch. The exact hypergradient compiles faster than the online
# one (whose tangents span the dense super-network); the online one runs in
# the notebook test.
OVERRIDES = {'dha': {'heldout_batch_size': 4, 'hpo.mode': 'exact'},
             'sequential_dha': {'hpo.mode': 'exact'}}
# One evaluation per epoch, so that the learning curves have points.
EVAL_EVERY_EPOCHS = 1


def cli_overrides(mode: str) -> dict:
  """The config overrides (dotted keys, besides tiny.TINY) of a mode's CLI
  run."""
  return {**OVERRIDES.get(mode, {}), 'eval_every_epochs': EVAL_EVERY_EPOCHS}


def assert_complete_run(workdir: str, mode: str, log: str) -> None:
  """The summary, files, metrics, learning curves and search records of a
  finished tiny run of `mode` in `workdir`, whose log (stderr) is `log`."""
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  spec = modes.MODES[mode]
  assert summary['mode'] == mode
  assert 0.0 <= summary['test_accuracy'] <= 1.0
  assert summary['param_count'] > 0
  if spec.search == 'two_stage':
    assert summary['search_steps'] == 3  # one epoch of 30 examples / 8
    assert summary['train_steps'] == 3 + 4
  elif spec.search == 'one_stage':
    assert 0 < summary['search_steps'] <= 3
    assert summary['train_steps'] == 4
  else:
    assert summary['search_steps'] == 0
  files = set(os.listdir(workdir))
  assert {'genotype.json', 'metrics.jsonl', 'config.json', 'hparams.png',
          'model.msgpack'} <= files
  assert ('policy.json' in files) == ('da' in spec.components)
  assert ('policy.png' in files) == ('da' in spec.components)
  assert ('policy_search.png' in files) == ('da' in spec.components)
  assert ('architecture.png' in files) == (spec.search is not None)
  genotype = json.load(open(os.path.join(workdir, 'genotype.json')))
  assert len(genotype['normal']) == len(genotype['reduce']) == 8
  records = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'metrics.jsonl'))]
  phases = {r['phase'] for r in records}
  assert ('search' in phases) == (spec.search is not None)
  # The learning curves: each epoch's end (3 steps of 8 of the 30 training
  # examples), also inside a search (on the network it would fix there).
  evals = [r for r in records if r['phase'] == 'eval']
  epoch_ends = [3, 6] if spec.search == 'two_stage' else [3]
  assert [r['step'] for r in evals] == epoch_ends
  for r in evals:
    assert 0.0 <= r['train_accuracy'] <= 1.0 and r['train_loss'] > 0
    assert 0.0 <= r['hpo_accuracy'] <= 1.0 and r['hpo_loss'] > 0
  assert 0.0 <= summary['train_accuracy'] <= 1.0
  if 'hpo' in spec.components:
    assert any('hpo/learning_rate' in r for r in records)
  # What each search did, per epoch and in one log line at its end.
  if spec.search == 'one_stage':
    assert 'Search done at step' in log
    nas = [r for r in records if r['phase'] == 'nas_epoch']
    assert 0 <= nas[-1]['pairs_changed_from_start'] <= 16
    assert nas[-1]['code_relative_move'] > 0
  if 'da' in spec.components:
    da = [r for r in records if r['phase'] == 'da_epoch']
    assert da[-1]['kl_from_uniform'] >= 0 and ' -> ' in da[-1]['top_pair']
  if mode == 'dha':
    assert all(np.isfinite(r['hpo/hpo_loss']) for r in records
               if 'hpo/hpo_loss' in r)
    assert any('hpo/hpo_loss' in r for r in records)
    # What a user watches in TensorBoard: η, τ's entropy, α's norms.
    scalars, images = tiny.read_tensorboard(workdir)
    for tag in ('search/hpo/learning_rate', 'search/da/entropy',
                'nas_epoch/alpha_norm_normal', 'fixed/loss'):
      assert scalars[tag], tag
    assert {'hparams', 'policy', 'architecture'} <= set(images)
