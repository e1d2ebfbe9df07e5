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

import dataclasses
import importlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import flax.serialization
import numpy as np
import optax
import orbax.checkpoint as ocp

from dha_jax import data as data_lib
from dha_jax import hpo
from dha_jax import parallel
from dha_jax import plots
from dha_jax import step as step_lib
from dha_jax.augment import component as da_component
from dha_jax.augment import policy
from dha_jax.components import Component, component_key
from dha_jax.nas import component as nas_component
from dha_jax.nas import ista
from dha_jax.nas import network
from dha_jax.nas import search_space

SUMMARY_FILE = 'summary.json'
METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
GENOTYPE_FILE = 'genotype.json'
POLICY_FILE = 'policy.json'
DEPLOY_FILE = 'model.msgpack'
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


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]
                   ) -> dict[str, Any]:
  """`saved` with the fields it lacks taken from `defaults`, recursively."""
  out = dict(defaults)
  for key, value in saved.items():
    default = defaults.get(key)
    out[key] = (_with_defaults(value, default)
                if isinstance(value, dict) and isinstance(default, dict)
                else value)
  return out


def read_config_json(path: str, defaults: dict[str, Any]) -> dict[str, Any]:
  """A workdir's config.json, with the fields it lacks (config fields added
  to the code after the run was made) taken from `defaults`."""
  with open(path) as f:
    return _with_defaults(json.load(f), defaults)


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict
                         ) -> None:
  """Refuses to resume a workdir that was made with a different config.

  A field its config.json lacks was added to the code since the run was
  made; it is not a difference, so older workdirs still resume.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    previous = read_config_json(path, current)
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


# ------------------------------------------------------------------ modes
@dataclasses.dataclass(frozen=True)
class ModeSpec:
  """What a mode runs (the paper's methods, dha_reference.md §0).

  Attributes:
    search: None (train `model.genotype`), 'one_stage' (search with the same
      weights that then train on, α fixed: no retraining) or 'two_stage'
      (search with b on the HPO batch, then train the genotype from scratch).
    components: the DA / HPO components active while θ trains (and, in
      one-stage modes, during the search too).
  """
  search: str | None
  components: tuple[str, ...]


MODES = {
    'train': ModeSpec(None, ()),
    'ista_one_stage': ModeSpec('one_stage', ()),
    'nas_da': ModeSpec('one_stage', ('da',)),
    'nas_hpo': ModeSpec('one_stage', ('hpo',)),
    'dha': ModeSpec('one_stage', ('da', 'hpo')),
    'ista_two_stage': ModeSpec('two_stage', ()),
    'sequential_nas_da': ModeSpec('two_stage', ('da',)),
    'sequential_nas_hpo': ModeSpec('two_stage', ('hpo',)),
    'sequential_dha': ModeSpec('two_stage', ('da', 'hpo')),
}
SEARCH, FIXED, TRAIN = 'search', 'fixed', 'train'


def mode_spec(mode: str) -> ModeSpec:
  if mode not in MODES:
    raise RunError(f'config.mode={mode!r} is not a mode; choose one of '
                   f'{sorted(MODES)}.')
  return MODES[mode]


def load_extra_components(config: ml_collections.ConfigDict
                          ) -> list[Component]:
  """User components: `config.extra_components` = 'pkg.module:factory,...'.

  Each factory is called with the whole config and returns a `Component`.
  """
  out = []
  for spec in filter(None, config.extra_components.split(',')):
    module_name, _, factory = spec.strip().partition(':')
    try:
      module = importlib.import_module(module_name)
      out.append(getattr(module, factory)(config))
    except (ImportError, AttributeError) as e:
      raise RunError(f'config.extra_components entry {spec!r} must be '
                     f'"module:factory" of an importable module: {e}') from e
  return out


# ------------------------------------------------------------------ runs
@dataclasses.dataclass
class Phase:
  """One phase of a run: its components, architecture and step range."""
  name: str
  start: int
  end: int
  components: tuple[Component, ...]
  fixed_arch: search_space.Architecture | None
  genotype: search_space.Genotype | None = None


class Runner:
  """Holds what every phase shares: data, model, mesh, files."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.spec = mode_spec(config.mode)
    self.mesh = parallel.make_mesh()
    num_devices = self.mesh.devices.size
    data_lib.check_batch_size(config.batch_size, num_devices)
    data_lib.check_batch_size(config.eval_batch_size, num_devices,
                              'eval_batch_size')
    self.dataset = data_lib.load_dataset(config.dataset)
    ds = self.dataset
    logging.info('Data %s: %d train, %d HPO, %d test examples, %d classes, '
                 '%d devices.', ds.name, len(ds.train), len(ds.hpo),
                 len(ds.test), ds.num_classes, num_devices)
    self.steps_per_epoch = data_lib.steps_per_epoch(ds.train,
                                                    config.batch_size)
    self.train_steps = _total_steps(config, self.steps_per_epoch)
    self.search_budget = (config.nas.search_epochs * self.steps_per_epoch
                          if self.spec.search else 0)
    self.model = create_model(config, ds.num_classes)
    self.shape = input_shape(config, ds)
    self.pre = step_lib.Preprocess.from_config(config, ds.mean, ds.std)
    self.tx = make_inner_optimizer(config)
    self.key = jax.random.key(config.seed)
    self.extra = load_extra_components(config)
    # The held-out HPO batch feeds Eq. 4 (exact HPO) and the two-stage
    # search; other runs never read it, so the training split stands in.
    needs_heldout = self.spec.search == 'two_stage' or (
        'hpo' in self.spec.components and config.hpo.mode == 'exact')
    self.hpo_split = ds.hpo if needs_heldout else ds.train
    self.heldout_batch_size = config.heldout_batch_size or config.batch_size
    data_lib.check_batch_size(self.heldout_batch_size, num_devices,
                              'heldout_batch_size')
    if needs_heldout:
      data_lib.steps_per_epoch(ds.hpo, self.heldout_batch_size)  # fails clearly
    self.compiled_supports: set = set()

  # -- construction ---------------------------------------------------
  def param_count_of(self, support: dict) -> int:
    """Parameters (auxiliary head excluded) of the network on `support`."""
    shapes = jax.eval_shape(lambda: self.model.init(
        {'params': jax.random.key(0), 'dropout': jax.random.key(0)},
        jnp.zeros(self.shape), search_space.make_architecture(support),
        train=False))
    return param_count(shapes['params'])

  def nas_component(self) -> Component:
    nas_config = self.config.nas
    if self.spec.search == 'two_stage':
      # Two-stage ISTA: b learns on the held-out batch, nodes never freeze.
      nas_config = ml_collections.ConfigDict(nas_config.to_dict())
      nas_config.code_loss = 'heldout'
      nas_config.dist_limit = -1.0
    return nas_component.make_component(nas_config, self.param_count_of)

  def train_components(self, params: Any) -> list[Component]:
    out = []
    if 'da' in self.spec.components:
      out.append(da_component.make_component(self.config.da))
    if 'hpo' in self.spec.components:
      out.append(hpo.make_component(self.config.hpo, params))
    return out + self.extra

  def new_state(self, arch: search_space.Architecture,
                components: list[Component], step: int, key: jax.Array
                ) -> step_lib.TrainState:
    variables = init_variables(self.model, arch, self.shape, key)
    init_key = jax.random.fold_in(key, 1)
    return step_lib.TrainState(
        step=jnp.asarray(step, jnp.int32), params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=self.tx.init(variables['params']),
        components={c.name: c.init(component_key(init_key, c.name))
                    for c in components},
        rng=jax.random.key_data(jax.random.fold_in(key, 2)))

  def initial(self, meta: dict[str, Any]
              ) -> tuple[Phase, step_lib.TrainState]:
    """The phase of `meta` and a state template for it (fresh values)."""
    spec = self.spec
    if spec.search is None:
      genotype = load_genotype(self.config.model.genotype)
      arch = search_space.genotype_architecture(genotype)
      comps = self.train_components(self._param_shapes(arch))
      return (Phase(TRAIN, 0, self.train_steps, tuple(comps), arch, genotype),
              self.new_state(arch, comps, 0, self.key))
    if meta['phase'] == TRAIN:  # two-stage: the genotype from scratch
      genotype = search_space.Genotype.from_json(json.dumps(meta['genotype']))
      arch = search_space.genotype_architecture(genotype)
      comps = self.train_components(self._param_shapes(arch))
      start = meta['phase_start']
      return (Phase(TRAIN, start, start + self.train_steps, tuple(comps), arch,
                    genotype),
              self.new_state(arch, comps, start,
                             jax.random.fold_in(self.key, start)))
    # Search (either kind) and the one-stage fixed phase share one state:
    # θ on the dense support (every op's parameters exist), the NAS state.
    dense = search_space.make_architecture(
        search_space.dense_support(nas_component.ista_config(
            self.config.nas).ops))
    nas = self.nas_component()
    others = (self.train_components(self._param_shapes(dense))
              if spec.search == 'one_stage' else [])
    comps = [c for c in others if c.name != 'hpo'] + [nas] + [
        c for c in others if c.name == 'hpo']
    state = self.new_state(dense, comps, 0, self.key)
    end = (self.train_steps if spec.search == 'one_stage'
           else self.search_budget)
    phase = Phase(SEARCH, 0, min(self.search_budget, end), tuple(comps), None)
    return phase, state

  def _param_shapes(self, arch: search_space.Architecture) -> Any:
    return jax.eval_shape(lambda: init_variables(
        self.model, arch, self.shape, jax.random.key(0)))['params']

  def fixed_phase(self, state: step_lib.TrainState, search: Phase,
                  end_step: int) -> Phase:
    """One-stage: the same weights train on with α fixed (no retraining)."""
    nas_state = jax.device_get(state.components['nas'])
    arch = nas_component.final_architecture(nas_state)
    comps = tuple(c for c in search.components if c.name != 'nas')
    return Phase(FIXED, end_step, self.train_steps, comps, arch,
                 search_space.support_to_genotype(arch.support_dict))

  # -- running --------------------------------------------------------
  def make_step(self, phase: Phase):
    config = self.config
    total = max(phase.end - phase.start, 1)
    # Constant during the search (as the reference), scheduled afterwards.
    schedule = (optax.constant_schedule(config.optimizer.learning_rate)
                if phase.name == SEARCH
                else step_lib.learning_rate_schedule(config, total))
    weight_decay = jnp.asarray(config.optimizer.weight_decay, jnp.float32)
    drop_prob = 0.0 if phase.name == SEARCH else config.model.drop_path_prob
    start = phase.start

    def default_hparams(step):
      return {'learning_rate': schedule(step - start),
              'weight_decay': weight_decay}

    def drop_path_rate(step):
      return drop_prob * (step - start) / total

    return step_lib.make_train_step(
        self.mesh, model=self.model, tx=self.tx, components=phase.components,
        fixed_arch=phase.fixed_arch, pre=self.pre,
        aux_weight=config.model.aux_weight, default_hparams=default_hparams,
        drop_path_rate=drop_path_rate)

  def epoch_end(self, state: step_lib.TrainState, phase: Phase, epoch: int,
                writer: MetricsWriter) -> step_lib.TrainState:
    """Host-side per-epoch hooks (NAS: recovery, freezing, Eq. 1)."""
    hooks = [c for c in phase.components if c.epoch_end is not None]
    if not hooks:
      return state
    components = dict(jax.device_get(state.components))
    for c in hooks:
      components[c.name], report = c.epoch_end(components[c.name], epoch)
      writer.write(int(state.step), {'phase': f'{c.name}_epoch',
                                     **_flatten_report(report)})
    return parallel.replicate(self.mesh, state.replace(components=components))


def _flatten_report(report: dict[str, Any]) -> dict[str, Any]:
  """JSON-friendly per-epoch report (supports as genotype-style lists)."""
  out = {}
  for k, v in report.items():
    if k == 'candidate_support':
      v = json.loads(search_space.support_to_genotype(v).to_json())
    out[k] = v
  return out


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


def _save(manager: ocp.CheckpointManager, state: step_lib.TrainState,
          meta: dict[str, Any]) -> None:
  """Checkpoints the state with the phase metadata (once per step)."""
  step = int(state.step)
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def _log_window(writer: MetricsWriter, history: list[dict], done: int,
                total_end: int, phase: Phase, steps_per_epoch: int,
                window_start: float, window_steps: int) -> None:
  values = {k: float(np.mean([float(m[k]) for m in history]))
            for k in history[0]}
  if not np.isfinite(values['loss']):
    raise RunError(
        f'The training loss is {values["loss"]} at step {done}. The last '
        'good checkpoint is kept in the workdir; lower the learning rate '
        'or check the data, then rerun with a new --workdir.')
  rate = window_steps / max(time.time() - window_start, 1e-9)
  eta = (total_end - done) / max(rate, 1e-9)
  writer.write(done, {'phase': phase.name, 'epoch': done / steps_per_epoch,
                      **values})
  logging.info('[%s] step %d/%d  loss %.4f  acc %.3f  lr %.4g  %.2f steps/s  '
               'ETA %.0f s', phase.name, done, total_end, values['loss'],
               values['accuracy'], values['learning_rate'], rate, eta)


def _run_steps(run: Runner, manager: ocp.CheckpointManager,
               writer: MetricsWriter, state: step_lib.TrainState, phase: Phase,
               meta: dict[str, Any]) -> step_lib.TrainState:
  """Trains from state.step to the end of `phase` (or until the search ends).

  Checkpoints at the configured interval, never at the last step of the
  phase: the caller saves that one with the next phase's metadata.
  """
  config, spe = run.config, run.steps_per_epoch
  train_fn = run.make_step(phase)
  start = int(state.step)
  train_iter = data_lib.train_batches(run.dataset.train, config.batch_size,
                                      seed=config.seed, start_step=start)
  hpo_iter = data_lib.train_batches(run.hpo_split, run.heldout_batch_size,
                                    seed=config.seed + 1, start_step=start)
  if start < phase.end:
    logging.info('%s phase: steps %d to %d (%d per epoch). Compiling the '
                 'step, this might take some minutes...', phase.name, start,
                 phase.end, spe)
  window_start, window_steps, history = time.time(), 0, []
  for step in range(start, phase.end):
    if 'nas' in state.components:
      run.compiled_supports.add((phase.name,
                                 state.components['nas'].ista.support))
    batch = parallel.shard_batch(run.mesh, next(train_iter))
    hpo_batch = parallel.shard_batch(run.mesh, next(hpo_iter))
    state, metrics = train_fn(state, batch, hpo_batch)
    history.append(metrics)
    window_steps += 1
    done = step + 1
    if step == start:
      jax.block_until_ready(state)
      logging.info('First step (with compilation) took %.1f s.',
                   time.time() - window_start)
      window_start, window_steps = time.time(), 0
    if done % config.log_every_steps == 0 or done == phase.end:
      _log_window(writer, history, done, phase.end, phase, spe, window_start,
                  window_steps)
      history, window_start, window_steps = [], time.time(), 0
    search_over = False
    if phase.name == SEARCH and (done - phase.start) % spe == 0:
      state = run.epoch_end(state, phase, (done - phase.start) // spe - 1,
                            writer)
      search_over = (run.spec.search == 'one_stage' and ista.all_frozen(
          jax.device_get(state.components['nas'].ista)))
    if search_over:
      logging.info('Every node is frozen at step %d: the search ends.', done)
      return state
    if done % config.checkpoint_every_steps == 0 and done < phase.end:
      _save(manager, state, meta)
  return state


def _next_phase(run: Runner, state: step_lib.TrainState, phase: Phase,
                meta: dict[str, Any]
                ) -> tuple[Phase | None, step_lib.TrainState, dict[str, Any]]:
  """After a phase: the next one, its state and checkpoint metadata."""
  if phase.name != SEARCH:
    return None, state, meta
  done = int(state.step)
  if run.spec.search == 'one_stage':
    fixed = run.fixed_phase(state, phase, done)
    return fixed, state, {'phase': FIXED, 'phase_start': done,
                          'search_steps': done}
  nas_state = jax.device_get(state.components['nas'])
  genotype = search_space.support_to_genotype(nas_state.ista.support_dict)
  meta = {'phase': TRAIN, 'phase_start': done, 'search_steps': done,
          'genotype': json.loads(genotype.to_json())}
  train_phase, new_state = run.initial(meta)
  return train_phase, parallel.replicate(run.mesh, new_state), meta


def restore_checkpoint(run: Runner, manager: ocp.CheckpointManager
                       ) -> tuple[dict[str, Any], Phase, step_lib.TrainState,
                                  int | None]:
  """The run's latest checkpoint, or its fresh start when there is none.

  Returns:
    (checkpoint metadata, its phase, the state on the host, the checkpoint's
    step or None).
  """
  meta = {'phase': SEARCH if run.spec.search else TRAIN, 'phase_start': 0,
          'search_steps': 0}
  latest = manager.latest_step()
  if latest is not None:
    meta = manager.restore(latest, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
  phase, state = run.initial(meta)
  if latest is not None:
    state = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state)))['state']
    if 'nas' in state.components:
      nas_state = state.components['nas']
      state = state.replace(components={
          **state.components,
          'nas': nas_state.replace(ista=ista.sync_support(nas_state.ista))})
  if meta['phase'] == FIXED:
    phase = run.fixed_phase(state, phase, meta['phase_start'])
  return meta, phase, state, latest


def deployable_variables(run: Runner, state: step_lib.TrainState,
                         arch: search_space.Architecture) -> dict[str, Any]:
  """{'params', 'batch_stats'} of `state` pruned to `arch`'s support."""
  shapes = jax.eval_shape(lambda: init_variables(run.model, arch, run.shape,
                                                 jax.random.key(0)))
  return {k: network.prune_params(getattr(state, k), shapes[k])
          for k in ('params', 'batch_stats')}


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
  run = Runner(config, workdir)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           create=True))
  meta, phase, state, latest = restore_checkpoint(run, manager)
  if latest is not None:
    logging.info('Resumed from the checkpoint of step %d (%s phase).', latest,
                 meta['phase'])
  state = parallel.replicate(run.mesh, state)
  writer = MetricsWriter(workdir, int(state.step))
  logging.info('Mode %s; %d parameters.', config.mode,
               param_count(state.params))
  while True:
    state = _run_steps(run, manager, writer, state, phase, meta)
    next_phase, state, meta = _next_phase(run, state, phase, meta)
    _save(manager, state, meta)
    if next_phase is None:
      break
    phase = next_phase
  manager.wait_until_finished()
  manager.close()
  return _finish(run, writer, state, phase, meta, start_time)


def _finish(run: Runner, writer: MetricsWriter, state: step_lib.TrainState,
            phase: Phase, meta: dict[str, Any], start_time: float
            ) -> dict[str, Any]:
  """Evaluates the final network and writes every result file."""
  config, workdir = run.config, run.workdir
  state = jax.device_get(state)
  arch = phase.fixed_arch
  eval_fn = step_lib.make_eval_step(run.mesh, model=run.model, pre=run.pre)
  repl = parallel.replicate(run.mesh, (state.params, state.batch_stats, arch))
  test = evaluate(eval_fn, *repl, run.dataset.test, config.eval_batch_size,
                  run.mesh)
  writer.write(int(state.step), {'phase': 'test',
                                 'test_accuracy': test['accuracy'],
                                 'test_loss': test['loss']})
  logging.info('Test accuracy %.4f, loss %.4f.', test['accuracy'],
               test['loss'])
  # The deployable network: θ pruned to the final support.
  deployed = deployable_variables(run, state, arch)
  with open(os.path.join(workdir, DEPLOY_FILE + '.tmp'), 'wb') as f:
    f.write(flax.serialization.to_bytes(deployed))
  os.replace(os.path.join(workdir, DEPLOY_FILE + '.tmp'),
             os.path.join(workdir, DEPLOY_FILE))
  genotype = phase.genotype or search_space.support_to_genotype(
      arch.support_dict)
  genotype_json = json.loads(genotype.to_json())
  genotype_json['alphas'] = {c: [np.asarray(a).tolist() for a in w]
                             for c, w in arch.weights.items()}
  write_json_atomic(os.path.join(workdir, GENOTYPE_FILE), genotype_json)
  records = read_metrics(workdir)
  if 'da' in state.components:
    policy_json = policy.export_policy(state.components['da'].logits)
    write_json_atomic(os.path.join(workdir, POLICY_FILE), policy_json)
    _save_figure(plots.policy_figure(policy_json), workdir, 'policy.png')
  _save_figure(plots.series_figure(
      [r for r in records if r['phase'] in (SEARCH, FIXED, TRAIN)],
      ('learning_rate', 'weight_decay', 'loss'), 'η and the training loss'),
               workdir, 'hparams.png')
  nas_records = [r for r in records if r['phase'] == 'nas_epoch']
  if nas_records:
    for r in nas_records:
      r['frozen_nodes'] = sum(sum(v) for v in r['frozen'].values())
      r['support_changed'] = float(r['support_changed'])
    _save_figure(plots.series_figure(
        nas_records, ('frozen_nodes', 'support_changed', 'alpha_norm_normal',
                      'alpha_norm_reduce'),
        'architecture search (per epoch)'), workdir, 'architecture.png')
  summary = {'mode': config.mode, 'dataset': run.dataset.name,
             'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
             'train_steps': int(state.step), 'search_steps':
                 int(meta['search_steps']),
             'wall_seconds': time.time() - start_time,
             'param_count': param_count(deployed['params']),
             'compiled_supports': len(run.compiled_supports),
             'genotype': genotype_json}
  write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)
  return summary


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _save_figure(fig, workdir: str, name: str) -> None:
  path = os.path.join(workdir, name)
  fig.savefig(path + '.tmp.png', dpi=100)
  os.replace(path + '.tmp.png', path)
  plots.plt.close(fig)
