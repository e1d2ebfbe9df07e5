"""The training loop: data, state, phases, evaluation, checkpoints, metrics.

This is the imperative shell around the pure step (`dha_jax.step`): the only
module that reads and writes files. A run's workdir receives (DESIGN.md §5):

  config.json     the resolved configuration
  metrics.jsonl   one JSON object per logged step (and per evaluation)
  checkpoints/    Orbax checkpoints; a rerun on the same workdir resumes
  summary.json    written once at the end (its presence marks a finished run)

Files are written atomically (temporary file, then rename), so a kill never
leaves a half-written result.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from dha_jax import data as data_lib
from dha_jax import hpo
from dha_jax import parallel
from dha_jax import step as step_lib
from dha_jax.nas import network
from dha_jax.nas import search_space

SUMMARY_FILE = 'summary.json'
METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
GENOTYPE_FILE = 'genotype.json'
# Config fields that may differ when resuming a workdir (they do not change
# what is computed).
RESUMABLE_FIELDS = ('log_every_steps', 'checkpoint_every_steps',
                    'keep_checkpoints', 'compilation_cache_dir')


class RunError(RuntimeError):
  """A run cannot proceed; the message names the problem and the fix."""


# ------------------------------------------------------------------ files
def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to `path` through a temporary file and a rename."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl.

  On resume, lines of steps after the restored checkpoint are dropped, so the
  file's steps continue where the checkpoint left off instead of repeating.
  """

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f
                if line.strip() and json.loads(line)['step'] <= resume_step]
      tmp = f'{self.path}.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, step: int, values: dict[str, Any]) -> None:
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')


def _to_python(value: Any) -> Any:
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict
                         ) -> None:
  """Refuses to resume a workdir that was made with a different config."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    diff = sorted(k for k in set(previous) | set(current)
                  if k not in RESUMABLE_FIELDS
                  and previous.get(k) != current.get(k))
    if diff:
      raise RunError(
          f'{workdir} holds a run with a different config (fields {diff}); '
          'nothing was changed there. Use a new --workdir, or rerun with the '
          f'config in {path}.')
  else:
    write_json_atomic(path, current)


# ------------------------------------------------------------ construction
def load_genotype(spec: str) -> search_space.Genotype:
  """'darts_v2' or the path of a genotype.json."""
  if spec in search_space.GENOTYPES:
    return search_space.GENOTYPES[spec]
  if not os.path.exists(spec):
    raise RunError(f'model.genotype={spec!r} is neither a built-in genotype '
                   f'({sorted(search_space.GENOTYPES)}) nor an existing '
                   'genotype.json file.')
  with open(spec) as f:
    return search_space.Genotype.from_json(f.read())


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> network.DARTSNetwork:
  m = config.model
  return network.DARTSNetwork(num_classes=num_classes, channels=m.channels,
                              layers=m.layers, auxiliary=m.auxiliary,
                              stem=m.stem)


def input_shape(config: ml_collections.ConfigDict,
                dataset: data_lib.Dataset) -> tuple[int, int, int, int]:
  """Shape of one network input example batch of size 1."""
  size = (config.preprocess.crop_size if config.preprocess.mode == 'imagenet'
          else dataset.image_size)
  return (1, size, size, 3)


def init_variables(model: network.DARTSNetwork, arch: search_space.Architecture,
                   shape: tuple[int, ...], key: jax.Array) -> dict:
  """Initialises params and batch stats eagerly.

  `jax.jit(model.init)` of a DARTS network compiles for minutes on CPU
  (DESIGN.md §7) while eager init takes seconds.
  """
  params_key, dropout_key = jax.random.split(key)
  variables = model.init({'params': params_key, 'dropout': dropout_key},
                         jnp.zeros(shape, jnp.float32), arch, train=True)
  return {'params': variables['params'],
          'batch_stats': variables['batch_stats']}


def param_count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def make_inner_optimizer(config: ml_collections.ConfigDict
                         ) -> optax.GradientTransformation:
  opt = config.optimizer
  return hpo.make_inner_optimizer(momentum=opt.momentum, nesterov=opt.nesterov,
                                  grad_clip=opt.grad_clip)


# ------------------------------------------------------------------ loop
def _total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int
                 ) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


def evaluate(eval_fn, params, batch_stats, arch, split: data_lib.Split,
             batch_size: int, mesh) -> dict[str, float]:
  """Accuracy and mean loss over a whole split."""
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  for images, labels, mask in data_lib.eval_batches(split, batch_size):
    out = eval_fn(params, batch_stats, arch,
                  *parallel.shard_batch(mesh, (images, labels, mask)))
    for k in totals:
      totals[k] += float(out[k])
  count = max(totals['count'], 1.0)
  return {'accuracy': totals['correct'] / count,
          'loss': totals['loss_sum'] / count}


def _batches(split: data_lib.Split, batch_size: int, seed: int,
             start_step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  return data_lib.train_batches(split, batch_size, seed=seed,
                                start_step=start_step)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; resumes from `workdir`.

  Returns the summary (also written to workdir/summary.json). A workdir that
  already holds a summary is not retrained: its summary is returned.
  """
  start_time = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(workdir, config)
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  if os.path.exists(summary_path):
    logging.info('%s exists: this run is finished, not retraining.',
                 summary_path)
    with open(summary_path) as f:
      return json.load(f)

  mesh = parallel.make_mesh()
  num_devices = mesh.devices.size
  data_lib.check_batch_size(config.batch_size, num_devices)
  data_lib.check_batch_size(config.eval_batch_size, num_devices)
  dataset = data_lib.load_dataset(config.dataset)
  logging.info('Data %s: %d train, %d HPO, %d test examples, %d classes, '
               '%d devices.', dataset.name, len(dataset.train.labels),
               len(dataset.hpo.labels), len(dataset.test.labels),
               dataset.num_classes, num_devices)
  steps_per_epoch = data_lib.steps_per_epoch(dataset.train, config.batch_size)
  total_steps = _total_steps(config, steps_per_epoch)

  model = create_model(config, dataset.num_classes)
  genotype = load_genotype(config.model.genotype)
  arch = search_space.genotype_architecture(genotype)
  pre = step_lib.Preprocess.from_config(config, dataset.mean, dataset.std)
  tx = make_inner_optimizer(config)
  schedule = step_lib.learning_rate_schedule(config, total_steps)
  weight_decay = config.optimizer.weight_decay

  def default_hparams(step):
    return {'learning_rate': schedule(step),
            'weight_decay': jnp.asarray(weight_decay, jnp.float32)}

  def drop_path_rate(step):
    return config.model.drop_path_prob * step / max(total_steps, 1)

  key = jax.random.key(config.seed)
  variables = init_variables(model, arch, input_shape(config, dataset), key)
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']), components={},
      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  manager = ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           create=True))
  if manager.latest_step() is not None:
    restored_step = manager.latest_step()
    state = manager.restore(restored_step,
                            args=ocp.args.StandardRestore(state))
    logging.info('Resumed from the checkpoint of step %d.', restored_step)
  start_step = int(state.step)
  state = parallel.replicate(mesh, state)
  writer = MetricsWriter(workdir, start_step)

  train_fn = step_lib.make_train_step(
      mesh, model=model, tx=tx, components=(), fixed_arch=arch, pre=pre,
      aux_weight=config.model.aux_weight, default_hparams=default_hparams,
      drop_path_rate=drop_path_rate)
  eval_fn = step_lib.make_eval_step(mesh, model=model, pre=pre)
  hpo_split = dataset.hpo if len(dataset.hpo.labels) else dataset.train
  train_iter = _batches(dataset.train, config.batch_size, config.seed,
                        start_step)
  hpo_iter = _batches(hpo_split, config.batch_size, config.seed + 1,
                      start_step)

  logging.info('Training %d steps (%d per epoch) from step %d; %d parameters.',
               total_steps, steps_per_epoch, start_step,
               param_count(variables['params']))
  if start_step < total_steps:
    logging.info('Initial compilation, this might take some minutes...')
  window_start, window_steps, history = time.time(), 0, []
  for step in range(start_step, total_steps):
    batch = parallel.shard_batch(mesh, next(train_iter))
    hpo_batch = parallel.shard_batch(mesh, next(hpo_iter))
    state, metrics = train_fn(state, batch, hpo_batch)
    history.append(metrics)
    window_steps += 1
    done = step + 1
    if step == start_step:
      jax.block_until_ready(state)
      logging.info('First step compiled and ran in %.1f s.',
                   time.time() - window_start)
      window_start, window_steps = time.time(), 0
    if done % config.log_every_steps == 0 or done == total_steps:
      values = {k: float(np.mean([float(m[k]) for m in history]))
                for k in history[0]}
      if not np.isfinite(values['loss']):
        raise RunError(
            f'The training loss is {values["loss"]} at step {done}. The last '
            'good checkpoint is kept in the workdir; lower the learning rate '
            'or check the data, then rerun with a new --workdir.')
      rate = window_steps / max(time.time() - window_start, 1e-9)
      eta = (total_steps - done) / max(rate, 1e-9)
      writer.write(done, {'phase': 'train', 'epoch': done / steps_per_epoch,
                          **values})
      logging.info('step %d/%d  loss %.4f  acc %.3f  lr %.4g  %.2f steps/s  '
                   'ETA %.0f s', done, total_steps, values['loss'],
                   values['accuracy'], values['learning_rate'], rate, eta)
      history, window_start, window_steps = [], time.time(), 0
    if done % config.checkpoint_every_steps == 0 or done == total_steps:
      manager.save(done, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()

  test = evaluate(eval_fn, state.params, state.batch_stats, arch,
                  dataset.test, config.eval_batch_size, mesh)
  writer.write(total_steps, {'phase': 'test', 'test_accuracy': test['accuracy'],
                             'test_loss': test['loss']})
  logging.info('Test accuracy %.4f, loss %.4f.', test['accuracy'],
               test['loss'])
  write_json_atomic(os.path.join(workdir, GENOTYPE_FILE),
                    json.loads(genotype.to_json()))
  summary = {'mode': config.mode, 'dataset': dataset.name,
             'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
             'train_steps': total_steps, 'search_steps': 0,
             'wall_seconds': time.time() - start_time,
             'param_count': param_count(variables['params']),
             'genotype': json.loads(genotype.to_json())}
  write_json_atomic(summary_path, summary)
  manager.close()
  return summary
