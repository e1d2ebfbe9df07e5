"""The training loop: data, state, phases, evaluation, checkpoints, metrics.

This is the imperative shell around the pure step (`dha_jax.step`): the only
module that reads and writes files. `train_and_evaluate` reads top to bottom:
workdir → set-up → restore → the mode's phases (`dha_jax.modes`) → evaluate
and write the results. The loop knows components only through their hooks
(`dha_jax.components`); it names none of them. A run's workdir receives
(docs/design.md, 'Workdir'):

  config.json     the resolved configuration
  metrics.jsonl   one JSON object per logged step (and per evaluation)
  checkpoints/    Orbax checkpoints; a rerun on the same workdir resumes
  genotype.json, model.msgpack, the components' exports, PNG plots
  summary.json    written once at the end (its presence marks a finished run)

Result files are written atomically (temporary file, then rename), so a
kill never leaves a half-written result. metrics.jsonl is appended one line
per record; a line torn by a kill is dropped when the run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import PIL.Image
import tensorboardX

from dha_jax import data as data_lib
from dha_jax import modes
from dha_jax import parallel
from dha_jax import plots
from dha_jax import step as step_lib
from dha_jax.components import Component, check_components, component_key
from dha_jax.hpo import inner as hpo_inner
from dha_jax.nas import depthwise
from dha_jax.nas import pooling
from dha_jax.nas import network
from dha_jax.nas import resources
from dha_jax.nas import search_space
from dha_jax.nas import spaces

SUMMARY_FILE = 'summary.json'
METRICS_FILE = 'metrics.jsonl'
# The phase of the record of the final evaluation, written after the last
# checkpoint.
TEST_PHASE = 'test'
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
# The folder of a checkpoint that holds the TrainState: the `state` item
# that `_save` writes beside the progress.
STATE_ITEM = 'state'
# A refusal lists at most this many differing state entries.
MAX_LISTED = 5
# Checkpoints that failed to restore are moved here, never deleted.
DAMAGED_DIR = 'damaged_checkpoints'
GENOTYPE_FILE = 'genotype.json'
DEPLOY_FILE = 'model.msgpack'
TENSORBOARD_DIR = 'tensorboard'
# Event files are flushed at least this often (and when the run ends).
TENSORBOARD_FLUSH_SECONDS = 30
HPARAMS_PLOT = 'hparams.png'
PLOT_DPI = 100
# Config fields that may differ when resuming a workdir (they do not change
# what is computed).
RESUMABLE_FIELDS = ('log_every_steps', 'checkpoint_every_steps',
                    'keep_checkpoints', 'compilation_cache_dir', 'tensorboard',
                    'eval_every_epochs')


class RunError(RuntimeError):
  """A run cannot proceed; the message names the problem and the fix."""


class Interrupted(RunError):
  """SIGINT or SIGTERM stopped the run after saving its current step."""

  def __init__(self, signum: int, step: int):
    name = signal.Signals(signum).name
    super().__init__(f'Stopped by {name} at step {step}; its checkpoint is '
                     'saved. Rerun the same command to resume.')
    self.exit_code = SIGNAL_EXIT_BASE + signum


# A process stopped by signal N exits with 128 + N (the shell's convention).
SIGNAL_EXIT_BASE = 128
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
  """Records SIGINT / SIGTERM (Ctrl-C, a preempted VM) instead of dying.

  Yields the list of signals received; the loop saves and stops at the end
  of the step during which one arrived. Outside the main thread (where
  handlers cannot be installed) nothing is recorded.
  """
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = {s: signal.signal(s, lambda signum, _: received.append(signum))
              for s in STOP_SIGNALS}
  try:
    yield received
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


# ------------------------------------------------------------------ files
def write_atomic(path: str, write: Callable[[str], None]) -> None:
  """`write(tmp_path)` then renames the temporary file to `path`.

  The temporary name keeps `path`'s extension, so writers that pick the
  format from it (matplotlib) still do.
  """
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{ext}'
  write(tmp)
  os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  write_atomic(path, write)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to `path` through a temporary file and a rename."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def save_figure(fig: Any, path: str) -> None:
  """Saves a matplotlib figure as PNG, atomically, and closes it."""
  write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=PLOT_DPI))
  plots.plt.close(fig)


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl and, with
  `tensorboard`, the same numbers as TensorBoard scalars.

  On resume, the records that the restored checkpoint does not hold are
  dropped (and their TensorBoard events purged): those of later steps, and
  the test record of its own step, written after it was saved. The steps
  then continue where the checkpoint left off instead of repeating. In a
  multi-process run only process 0 writes; the others' writers do nothing.
  """

  def __init__(self, workdir: str, resume_step: int, tensorboard: bool):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = parallel.is_primary_process()
    self.events = None
    # Every process parses the file, so that a damaged one stops them all
    # alike instead of leaving the others waiting in the first step.
    kept = [r for r in (_read_records(self.path, torn_tail_ok=True)
                        if os.path.exists(self.path) else [])
            if r['step'] < resume_step or (
                r['step'] == resume_step and r.get('phase') != TEST_PHASE)]
    if not self.enabled:
      return
    if os.path.exists(self.path):
      write_text_atomic(self.path, ''.join(
          json.dumps(r, sort_keys=True) + '\n' for r in kept))
    if tensorboard:
      # Events from the checkpoint's own step on are purged, and that step's
      # kept records written again: its test record and plots are not kept.
      self.events = tensorboardX.SummaryWriter(
          os.path.join(workdir, TENSORBOARD_DIR),
          purge_step=resume_step or None,
          flush_secs=TENSORBOARD_FLUSH_SECONDS)
      for record in kept:
        if resume_step and record['step'] == resume_step:
          self._add_scalars(record)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record, sort_keys=True) + '\n')
    self._add_scalars(record)

  def _add_scalars(self, record: dict[str, Any]) -> None:
    if self.events is not None:
      for tag, value in tensorboard_scalars(record).items():
        self.events.add_scalar(tag, value, record['step'])

  def write_image(self, step: int, png_path: str) -> None:
    """A saved PNG plot as a TensorBoard image, tagged by its file name."""
    if self.events is not None:
      with PIL.Image.open(png_path) as image:
        pixels = np.asarray(image.convert('RGB'))
      self.events.add_image(os.path.splitext(os.path.basename(png_path))[0],
                            pixels, int(step), dataformats='HWC')

  def close(self) -> None:
    if self.events is not None:
      self.events.close()


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
  """{'<phase>/<key>': value} of a metrics record's numbers (booleans as
  0/1); strings, lists and the step itself are left to metrics.jsonl."""
  prefix = record.get('phase', 'run')
  return {f'{prefix}/{k}': float(v) for k, v in record.items()
          if k != 'step' and isinstance(v, (int, float, bool))}


def _to_python(value: Any) -> Any:
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl."""
  return _read_records(os.path.join(workdir, METRICS_FILE))


def _read_records(path: str, torn_tail_ok: bool = False
                  ) -> list[dict[str, Any]]:
  """The JSON lines of `path`. With `torn_tail_ok`, a last line that does
  not parse (a kill in the middle of appending it) is dropped with a
  warning.

  Raises:
    RunError: when another line does not parse.
  """
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  records = []
  for i, line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if torn_tail_ok and i == lines[-1][0]:
        logging.warning('Dropping the torn last line %d of %s (%s).', i,
                        path, e)
        continue
      raise RunError(f'{path} line {i} is not JSON ({e}); the file is '
                     'damaged. Repair or delete that line, then rerun.') from e
  return records


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
  elif parallel.is_primary_process():
    write_json_atomic(path, current)


def ignored_fields(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{config field: what sets it instead} for fields this run ignores:
  those that a component of every weight-training phase replaces."""
  spec = modes.mode_spec(config.mode)
  ctx = modes.BuildContext(search=spec.search, param_shapes=None,
                           param_count=lambda support: 0,
                           multiply_adds=lambda support: 0.0,
                           space=spaces.from_config(config))
  final = [p for p in spec.phases() if p.trains_final_weights]
  per_phase = []
  for phase in final:
    replaced = {}
    for c in modes.build_components(phase.components, config, ctx):
      replaced.update(c.replaces)
    per_phase.append(replaced)
  common = set.intersection(*(set(r) for r in per_phase)) if per_phase else ()
  return {k: per_phase[0][k] for k in sorted(common)}


def make_workdir(workdir: str) -> None:
  """Creates the workdir; a file in its place or no permission is a
  RunError that says so."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{jax.process_index()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except (FileExistsError, NotADirectoryError) as e:
    raise RunError(f'--workdir={workdir} is not a folder ({e.strerror}: '
                   f'{e.filename}); pass a folder path.') from e
  except PermissionError as e:
    raise RunError(f'--workdir={workdir} cannot be written ({e.strerror}: '
                   f'{e.filename}); pass a folder you may write to.') from e


# ------------------------------------------------------------ construction
def load_genotype(spec: str, space: spaces.SearchSpace = spaces.cell_space()
                  ) -> spaces.Genotype:
  """A built-in genotype of `space` ('darts_v2', 'proxyless_mobile') or the
  path of a genotype.json of that space."""
  if spec in space.genotypes:
    return space.genotypes[spec]
  if not os.path.exists(spec):
    raise RunError(f'model.genotype={spec!r} is neither a built-in genotype '
                   f'of model.space={space.name!r} '
                   f'({sorted(space.genotypes)}) nor an existing '
                   'genotype.json file.')
  with open(spec) as f:
    return space.parse_genotype(f.read())


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int) -> nn.Module:
  """The network of `config.model` (`model.space` picks its kind)."""
  depthwise.check_implementation(config.model.depthwise)
  pooling.check_implementation(config.model.pooling)
  return spaces.create_network(config.model, num_classes)


def input_shape(config: ml_collections.ConfigDict,
                dataset: data_lib.Dataset) -> tuple[int, int, int, int]:
  """Shape of one network input example batch of size 1."""
  size = (config.preprocess.crop_size if config.preprocess.mode == 'imagenet'
          else dataset.image_size)
  return (1, size, size, 3)


def init_variables(model: nn.Module, arch: search_space.Architecture,
                   shape: tuple[int, ...], key: jax.Array,
                   train: bool = True) -> dict:
  """Initialises params and batch stats eagerly.

  `jax.jit(model.init)` of a DARTS network compiles for minutes on CPU
  (docs/design.md, 'Measured costs') while eager init takes seconds. With
  `train=False` the auxiliary head is not built.
  """
  params_key, dropout_key = jax.random.split(key)
  variables = model.init({'params': params_key, 'dropout': dropout_key},
                         jnp.zeros(shape, jnp.float32), arch, train=train)
  return {'params': variables['params'],
          'batch_stats': variables['batch_stats']}


def variable_shapes(model: nn.Module,
                    arch: search_space.Architecture,
                    shape: tuple[int, ...], train: bool = True) -> dict:
  """{'params', 'batch_stats'} of `arch`'s network as shape structs (no
  computation: `jax.eval_shape`)."""
  return jax.eval_shape(lambda: init_variables(model, arch, shape,
                                               jax.random.key(0), train))


def param_count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def multiply_adds(model: nn.Module, arch: search_space.Architecture,
                  shape: tuple[int, ...]) -> int:
  """Multiply-adds of `arch`'s network at inference on a batch of `shape`
  (`dha_jax.nas.resources`; traced, not run).

  Counted with grouped depthwise convs: the other implementations compute
  the same function with C times as many (block-diagonal) or no (shifted)
  convolution multiply-adds ('ffi' hides them in FFI calls)."""
  counted = model.clone(depthwise='grouped')
  return resources.multiply_adds(
      lambda v, x: counted.apply(v, x, arch, train=False),
      variable_shapes(model, arch, shape, train=False),
      jax.ShapeDtypeStruct(shape, jnp.float32))


def load_extra_components(config: ml_collections.ConfigDict
                          ) -> tuple[Component, ...]:
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
  return tuple(out)


# ------------------------------------------------------------------ runs
@dataclasses.dataclass
class Run:
  """What every phase of a run shares: config, data, model, mesh.

  Build it with `Run.create`; it holds no training state.
  """
  config: ml_collections.ConfigDict
  workdir: str
  spec: modes.ModeSpec
  phases: tuple[modes.PhaseSpec, ...]
  mesh: Any
  dataset: data_lib.Dataset
  steps_per_epoch: int
  train_steps: int
  search_budget: int
  space: spaces.SearchSpace
  model: nn.Module
  shape: tuple[int, int, int, int]
  pre: step_lib.Preprocess
  tx: optax.GradientTransformation
  key: jax.Array
  extra: tuple[Component, ...]
  hpo_split: data_lib.Split | None
  heldout_batch_size: int
  train_eval: data_lib.Split
  eval_fn: Callable
  compiled: set = dataclasses.field(default_factory=set)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, workdir: str) -> 'Run':
    """Checks the whole config and builds the run; writes nothing.

    Raises:
      RunError, DataError: the config or the data is unusable (the message
        names the field and the fix).
    """
    check_loop_config(config)
    try:
      spec = modes.mode_spec(config.mode)
    except modes.ModeError as e:
      raise RunError(str(e)) from e
    mesh = parallel.make_mesh()
    num_devices = mesh.devices.size
    data_lib.check_batch_size(config.batch_size, num_devices)
    data_lib.check_batch_size(config.eval_batch_size, num_devices,
                              'eval_batch_size')
    heldout_batch_size = config.heldout_batch_size or config.batch_size
    data_lib.check_batch_size(heldout_batch_size, num_devices,
                              'heldout_batch_size')
    ds = data_lib.load_dataset(config.dataset)
    logging.info('Data %s: %d train, %d HPO, %d test examples, %d classes, '
                 '%d devices.', ds.name, len(ds.train), len(ds.hpo),
                 len(ds.test), ds.num_classes, num_devices)
    steps_per_epoch = data_lib.steps_per_epoch(ds.train, config.batch_size)
    space = spaces.from_config(config)
    model = create_model(config, ds.num_classes)
    if spec.search is None:
      # The genotype must be of this space: fail before the workdir is made.
      space.genotype_to_support(load_genotype(config.model.genotype, space))
    pre = step_lib.Preprocess.from_config(config, ds.mean, ds.std)
    run = cls(
        config=config, workdir=workdir, spec=spec, phases=spec.phases(),
        mesh=mesh, dataset=ds, steps_per_epoch=steps_per_epoch,
        train_steps=_total_steps(config, steps_per_epoch),
        search_budget=modes.search_budget(config, steps_per_epoch),
        space=space, model=model, shape=input_shape(config, ds),
        pre=pre, tx=hpo_inner.optimizer_from_config(config),
        key=jax.random.key(config.seed),
        extra=load_extra_components(config), hpo_split=None,
        heldout_batch_size=heldout_batch_size,
        train_eval=train_eval_subset(ds.train, config.eval_train_examples,
                                     config.dataset.split_seed),
        eval_fn=step_lib.make_eval_step(mesh, model=model, pre=pre))
    for phase in run.phases:
      try:
        check_components(list(run.components(phase, param_shapes=None)))
      except ValueError as e:
        raise RunError(
            f'The components of the {phase.name} phase clash: {e}. Give each '
            'user component of config.extra_components its own name and a '
            'slot that no other component of the mode fills, and list each '
            'factory once.') from e
    # The held-out batch feeds the components that declare `uses_heldout`
    # (exact HPO, the two-stage search); the phases without one never read
    # it (`run_phase`).
    if run.uses_heldout():
      try:
        data_lib.steps_per_epoch(ds.hpo, heldout_batch_size)
      except data_lib.DataError as e:
        raise RunError(
            f'The HPO split ({len(ds.hpo)} examples) holds no held-out batch '
            f'of {heldout_batch_size}: lower heldout_batch_size, or raise '
            'dataset.val_ratio (or dataset.max_train_examples).') from e
      run.hpo_split = ds.hpo
    return run

  def components(self, phase: modes.PhaseSpec, param_shapes: Any
                 ) -> tuple[Component, ...]:
    """The components of `phase`; user components join the phases whose
    weights are deployed."""
    ctx = modes.BuildContext(search=self.spec.search,
                             param_shapes=param_shapes,
                             param_count=self.param_count_of,
                             multiply_adds=self.multiply_adds_of,
                             space=self.space)
    built = modes.build_components(phase.components, self.config, ctx)
    return built + (self.extra if phase.trains_final_weights else ())

  def uses_heldout(self) -> bool:
    """Whether any phase's components read the held-out batch."""
    return any(c.uses_heldout for p in self.phases
               for c in self.components(p, param_shapes=None))

  def dense_architecture(self) -> search_space.Architecture:
    """Every op on every edge: θ of a search holds every op's parameters."""
    return search_space.make_architecture(self.space.dense_support())

  def variable_shapes(self, arch: search_space.Architecture) -> dict:
    return variable_shapes(self.model, arch, self.shape)

  def param_count_of(self, support: dict) -> int:
    """Parameters (auxiliary head excluded) of the network on `support`."""
    return param_count(variable_shapes(
        self.model, search_space.make_architecture(support), self.shape,
        train=False)['params'])

  def multiply_adds_of(self, support: dict) -> int:
    """Multiply-adds per image of the network on `support` (inference)."""
    return multiply_adds(self.model, search_space.make_architecture(support),
                         self.shape)


def check_loop_config(config: ml_collections.ConfigDict) -> None:
  """Raises RunError on a loop field that the run would only trip over
  after writing its workdir."""
  if not isinstance(config.seed, int) or config.seed < 0:
    raise RunError(f'config.seed={config.seed!r}: give a non-negative '
                   'integer.')
  for field in ('log_every_steps', 'checkpoint_every_steps'):
    if config[field] <= 0:
      raise RunError(f'config.{field}={config[field]}: give a positive '
                     'number of steps.')
  if config.eval_train_examples == 0 or config.eval_train_examples < -1:
    raise RunError(f'config.eval_train_examples={config.eval_train_examples}'
                   ': give a positive number of examples, or -1 for all of '
                   'them (0 would measure the train accuracy on none).')


def train_eval_subset(split: data_lib.Split, max_examples: int, seed: int
                      ) -> data_lib.Split:
  """The fixed training examples whose clean (un-augmented) accuracy is
  the run's train accuracy: all of `split`, or `max_examples` drawn once."""
  if max_examples < 0 or max_examples >= len(split):
    return split
  rng = np.random.default_rng(seed)
  return split.subset(np.sort(rng.permutation(len(split))[:max_examples]))


def _total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int
                 ) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * steps_per_epoch)


# ---------------------------------------------------------------- phases
@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a run stands; saved with every checkpoint (as its JSON `meta`).

  Attributes:
    phase: name of the phase the next step belongs to.
    phase_start: the step at which that phase started.
    state_start: the step at which the state's weights were initialised
      (the start of the last phase with a fresh state).
    search_steps: steps the search took (0 until it ended).
    genotype: the searched genotype as JSON, once a search ended.
  """
  phase: str
  phase_start: int = 0
  state_start: int = 0
  search_steps: int = 0
  genotype: dict | None = None

  def to_json(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items()
            if v is not None}

  @classmethod
  def from_json(cls, meta: dict[str, Any], fresh_state: bool) -> 'Progress':
    """Reads checkpoint metadata; checkpoints written before `state_start`
    existed started their state with their phase, or at 0 (one-stage)."""
    state_start = meta.get('state_start',
                           meta['phase_start'] if fresh_state else 0)
    return cls(phase=meta['phase'], phase_start=meta['phase_start'],
               state_start=state_start, search_steps=meta['search_steps'],
               genotype=meta.get('genotype'))


@dataclasses.dataclass(frozen=True)
class Phase:
  """A phase ready to run: its spec, step range, components, architecture.

  `arch` is None while a component supplies the architecture (a search);
  `genotype` is that of the fixed architecture, if any.
  """
  spec: modes.PhaseSpec
  start: int
  end: int
  components: tuple[Component, ...]
  arch: search_space.Architecture | None
  genotype: spaces.Genotype | None

  @property
  def name(self) -> str:
    return self.spec.name


def phase_index(run: Run, name: str | None) -> int:
  names = [p.name for p in run.phases]
  if name not in names:
    raise RunError(f'The checkpoint is of a {name!r} phase, which mode '
                   f'{run.config.mode!r} does not have ({names}): the '
                   'workdir was made by a different code version. Use a new '
                   '--workdir, or rerun with the code that made it.')
  return names.index(name)


def _phase_genotype(run: Run, progress: Progress) -> spaces.Genotype:
  """The genotype of a genotype phase: the search's, else the config's."""
  if progress.genotype is not None:
    return run.space.parse_genotype(json.dumps(progress.genotype))
  return load_genotype(run.config.model.genotype, run.space)


def _init_architecture(run: Run, spec: modes.PhaseSpec, progress: Progress
                       ) -> search_space.Architecture:
  """The architecture a fresh state of `spec` is initialised on."""
  if spec.architecture == modes.ARCH_GENOTYPE:
    return run.space.genotype_architecture(_phase_genotype(run, progress))
  return run.dense_architecture()


def _param_shapes(state: step_lib.TrainState) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      state.params)


def fresh_state(run: Run, index: int, progress: Progress
                ) -> step_lib.TrainState:
  """Newly initialised weights and component states for phase `index`,
  whose fresh state starts at `progress.state_start`."""
  spec = run.phases[index]
  arch = _init_architecture(run, spec, progress)
  start = progress.state_start
  key = run.key if start == 0 else jax.random.fold_in(run.key, start)
  components = run.components(spec, run.variable_shapes(arch)['params'])
  variables = init_variables(run.model, arch, run.shape, key)
  init_key = jax.random.fold_in(key, 1)
  return step_lib.TrainState(
      step=jnp.asarray(start, jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=run.tx.init(variables['params']),
      components={c.name: c.init(component_key(init_key, c.name))
                  for c in components},
      rng=jax.random.key_data(jax.random.fold_in(key, 2)))


def first_phase(run: Run) -> tuple[Phase, step_lib.TrainState]:
  """The first phase of a fresh run and its initial state (on the host)."""
  progress = Progress(phase=run.phases[0].name)
  state = fresh_state(run, 0, progress)
  return build_phase(run, progress, state), state


def _state_origin(run: Run, index: int) -> int:
  """The phase whose fresh state phase `index` carries on with."""
  while not run.phases[index].fresh_state:
    index -= 1
  return index


def build_phase(run: Run, progress: Progress, state: step_lib.TrainState
                ) -> Phase:
  """The phase `progress` points at, on `state` (host or device)."""
  index = phase_index(run, progress.phase)
  spec = run.phases[index]
  components = run.components(spec, _param_shapes(state))
  arch = genotype = None
  if spec.architecture == modes.ARCH_GENOTYPE:
    genotype = _phase_genotype(run, progress)
    arch = run.space.genotype_architecture(genotype)
  elif spec.architecture == modes.ARCH_SEARCHED:
    arch = searched_architecture(
        run.components(run.phases[index - 1], _param_shapes(state)), state)
    genotype = run.space.support_to_genotype(arch.support_dict)
  end = (progress.state_start + run.train_steps
         if spec.trains_final_weights else np.inf)
  if spec.searching:
    end = min(end, progress.phase_start + run.search_budget)
  return Phase(spec=spec, start=progress.phase_start, end=int(end),
               components=components, arch=arch, genotype=genotype)


def restore_checkpoint(run: Run, manager: ocp.CheckpointManager
                       ) -> tuple[Progress, step_lib.TrainState, int | None]:
  """The newest checkpoint that reads back, or the fresh start.

  A checkpoint whose files fail to read (deleted or truncated) is moved to
  workdir/damaged_checkpoints/ with a warning, and the next older one is
  tried; when none is left, the run starts afresh.

  Returns:
    (progress, the state on the host, the checkpoint's step or None).

  Raises:
    RunError: when a checkpoint reads back but is not of this run's code
      and components (another phase, state tree or shape): nothing is moved.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      progress, state = _read_checkpoint(run, manager, step)
    except RunError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types for damaged files.
      aside = _move_aside(run.workdir, manager, step)
      logging.warning('The checkpoint of step %d does not read back (%s: '
                      '%s); moved it to %s and trying an older one.', step,
                      type(e).__name__, str(e).splitlines()[0][:200], aside)
      damaged.append(step)
      continue
    components = dict(state.components)
    for c in run.components(run.phases[_state_origin(
        run, phase_index(run, progress.phase))], _param_shapes(state)):
      if c.restore is not None:
        components[c.name] = c.restore(components[c.name])
    return progress, state.replace(components=components), step
  if damaged:
    logging.warning('No checkpoint reads back (all moved to %s); starting '
                    'from step 0.', DAMAGED_DIR)
  progress = Progress(phase=run.phases[0].name)
  return progress, fresh_state(run, 0, progress), None


def _move_aside(workdir: str, manager: ocp.CheckpointManager,
                step: int) -> str:
  damaged = os.path.join(workdir, DAMAGED_DIR)
  os.makedirs(damaged, exist_ok=True)
  target = os.path.join(damaged, str(step))
  suffix = 0
  while os.path.exists(target):
    suffix += 1
    target = os.path.join(damaged, f'{step}.{suffix}')
  if parallel.is_primary_process():
    os.replace(os.path.join(workdir, CHECKPOINT_DIR, str(step)), target)
  parallel.wait_for_all_processes(f'set aside checkpoint {step}')
  manager.reload()
  return target


def _read_checkpoint(run: Run, manager: ocp.CheckpointManager, step: int
                     ) -> tuple[Progress, step_lib.TrainState]:
  """The progress and state saved at `step`, read into this run's template.

  Raises:
    RunError: the checkpoint is of another phase set, progress record or
      state tree.
    Exception: of Orbax or TensorStore, when its files do not read.
  """
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']
  index = phase_index(run, meta.get('phase'))
  try:
    progress = Progress.from_json(meta, run.phases[index].fresh_state)
    template = fresh_state(run, _state_origin(run, index), progress)
  except Exception as e:  # pylint: disable=broad-except
    # Its files read: what fails is this code on what another code wrote.
    raise RunError(
        f'The checkpoint of step {step} reads back, but this code cannot '
        f'rebuild its run ({type(e).__name__}: {e}): the workdir was made by '
        'a different code version; nothing was moved. Use a new --workdir, '
        'or rerun with the code that made it.') from e
  stored = ocp.StandardCheckpointHandler().metadata(
      manager.directory / str(step) / STATE_ITEM).tree
  differences = ocp.tree.tree_difference(
      ocp.tree.serialize_tree(template, keep_empty_nodes=True), stored,
      is_leaf=lambda x: not isinstance(x, (dict, list, tuple)) or not x,
      leaves_equal=lambda a, b: (getattr(a, 'shape', None)
                                 == getattr(b, 'shape', None)))
  if differences:
    paths = sorted('/'.join(map(str, path)) for path in ocp.tree.to_flat_dict(
        differences, is_leaf=lambda x: hasattr(x, 'lhs')))
    raise RunError(
        f'The checkpoint of step {step} reads back, but its state differs '
        f'from what this run builds (in {paths[:MAX_LISTED]}): the workdir '
        'was made by a different code version or component set; nothing was '
        'moved. Use a new --workdir, or rerun with the code that made it.')
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))['state']
  return progress, state


def next_progress(run: Run, phase: Phase, state: step_lib.TrainState,
                  progress: Progress) -> Progress | None:
  """Where the run goes after `phase` (None: it is over).

  After a search, the searched genotype (of the searcher's fixed
  architecture) is recorded; a phase with a fresh state starts its weights
  at the current step.
  """
  index = phase_index(run, phase.name)
  if index + 1 == len(run.phases):
    return None
  done = int(state.step)
  nxt = run.phases[index + 1]
  updates = {'phase': nxt.name, 'phase_start': done}
  if nxt.fresh_state:
    updates['state_start'] = done
  if phase.spec.searching:
    arch = searched_architecture(phase.components, state)
    updates['search_steps'] = done
    updates['genotype'] = json.loads(
        run.space.support_to_genotype(arch.support_dict).to_json())
  return dataclasses.replace(progress, **updates)


def log_search_summary(run: Run, phase: Phase,
                       state: step_lib.TrainState) -> None:
  """Logs one line on what the search learned (the `summary` hooks); on
  process 0, which holds metrics.jsonl."""
  if not parallel.is_primary_process():
    return
  records = read_metrics(run.workdir)
  components = jax.device_get(state.components)
  parts = [f"{c.name}: " + c.summary(
      components[c.name], [r for r in records
                           if r['phase'] == f'{c.name}_epoch'])
           for c in phase.components if c.summary is not None]
  if parts:
    logging.info('Search done at step %d. %s.', int(state.step),
                 '; '.join(parts))


def deployable_variables(run: Run, state: step_lib.TrainState,
                         arch: search_space.Architecture) -> dict[str, Any]:
  """{'params', 'batch_stats'} of `state` pruned to `arch`'s support, as
  the network runs at inference: without the training-only auxiliary head."""
  shapes = variable_shapes(run.model, arch, run.shape, train=False)
  return {k: network.prune_params(getattr(state, k), shapes[k])
          for k in ('params', 'batch_stats')}


# ------------------------------------------------------------ the steps
def make_step(run: Run, phase: Phase) -> Callable:
  """The jitted train step of `phase`: η from a component or the schedule
  (with `optimizer.anneal_learned_lr`, a component's η times the schedule's
  fraction of its initial value)."""
  config = run.config
  total = max(phase.end - phase.start, 1)
  # Constant during the search (as the reference), scheduled afterwards.
  schedule = (optax.constant_schedule(config.optimizer.learning_rate)
              if phase.spec.searching
              else hpo_inner.learning_rate_schedule(config, total))
  weight_decay = jnp.asarray(config.optimizer.weight_decay, jnp.float32)
  drop_prob = 0.0 if phase.spec.searching else config.model.drop_path_prob
  start = phase.start

  def default_hparams(step):
    return {'learning_rate': schedule(step - start),
            'weight_decay': weight_decay}

  def drop_path_rate(step):
    return drop_prob * (step - start) / total

  def schedule_fraction(step):
    return schedule(step - start) / config.optimizer.learning_rate

  return step_lib.make_train_step(
      run.mesh, model=run.model, tx=run.tx, components=phase.components,
      fixed_arch=phase.arch, pre=run.pre, aux_weight=config.model.aux_weight,
      default_hparams=default_hparams,
      drop_path_rate=drop_path_rate if drop_prob > 0 else None,
      learned_lr_scale=(schedule_fraction
                        if config.optimizer.anneal_learned_lr else None))


def epoch_end(run: Run, state: step_lib.TrainState, phase: Phase, epoch: int,
              writer: MetricsWriter) -> step_lib.TrainState:
  """Host-side per-epoch hooks; each report becomes a `<name>_epoch` record."""
  hooks = [c for c in phase.components if c.epoch_end is not None]
  if not hooks:
    return state
  components = dict(jax.device_get(state.components))
  for c in hooks:
    components[c.name], report = c.epoch_end(components[c.name], epoch)
    writer.write(int(state.step), {'phase': f'{c.name}_epoch', **report})
  return parallel.replicate(run.mesh, state.replace(components=components))


def _search_done(phase: Phase, state: step_lib.TrainState) -> bool:
  return phase.spec.searching and any(
      c.search_done(jax.device_get(state.components[c.name]))
      for c in phase.components if c.search_done is not None)


def _nonfinite_error(writer: MetricsWriter, step: int, what: str,
                     value: Any, manager: ocp.CheckpointManager) -> RunError:
  """Records a non-finite value in metrics.jsonl; the error to raise."""
  writer.write(step, {'phase': 'nonfinite', 'what': what,
                      'value': str(value)})
  latest = manager.latest_step()
  kept = ('no checkpoint was saved' if latest is None else
          f'the newest checkpoint, of step {latest}, holds finite values')
  return RunError(
      f'{what} is {value} at step {step}; {kept} (a non-finite state is '
      'never saved). Lower the learning rate (or hpo.lr_bounds) or check '
      'the data, then rerun with a new --workdir.')


def _check_window(writer: MetricsWriter, history: list[dict], done: int,
                  manager: ocp.CheckpointManager) -> None:
  """Raises at the first step of the window with a non-finite metric."""
  first = done - len(history) + 1
  for i, metrics in enumerate(history):
    for name, value in metrics.items():
      if not np.isfinite(float(value)):
        raise _nonfinite_error(writer, first + i, f'The training {name}',
                               float(value), manager)


def _all_finite(tree: Any) -> bool:
  """Whether every float leaf is finite (on the host: nothing compiles)."""
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(
      jax.device_get(tree)) if np.issubdtype(np.asarray(x).dtype, np.inexact))


def _log_window(writer: MetricsWriter, history: list[dict], done: int,
                phase: Phase, steps_per_epoch: int, window_start: float,
                window_steps: int) -> None:
  """Writes the mean metrics of the steps since the last log; their time
  per step only when the window holds a timed step (the first step of a
  phase, which compiles, is not timed)."""
  values = {k: float(np.mean([float(m[k]) for m in history]))
            for k in history[0]}
  line = (f'[{phase.name}] step {done}/{phase.end}  loss {values["loss"]:.4f}'
          f'  acc {values["accuracy"]:.3f}  lr {values["learning_rate"]:.4g}')
  if window_steps:
    seconds = max(time.time() - window_start, 1e-9) / window_steps
    values['step_seconds'] = seconds
    line += (f'  {1.0 / seconds:.2f} steps/s  '
             f'ETA {(phase.end - done) * seconds:.0f} s')
  writer.write(done, {'phase': phase.name, 'epoch': done / steps_per_epoch,
                      **values})
  logging.info('%s', line)


def _save(manager: ocp.CheckpointManager, state: step_lib.TrainState,
          progress: Progress, writer: MetricsWriter) -> None:
  """Checkpoints the state with the run's progress (once per step).

  Raises:
    RunError: when the state holds a NaN or an infinity (never saved).
  """
  step = int(state.step)
  if manager.latest_step() == step:
    return
  if not _all_finite(state):
    raise _nonfinite_error(writer, step, 'The training state (θ or a '
                           'component)', 'non-finite', manager)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave(progress.to_json())))


def _stop_requested(stop: list[int], done: int, every: int) -> bool:
  """Whether the run stops after step `done`: at once with one process;
  with several, they agree every `every` steps, since agreeing is a host
  round trip that would otherwise stall the device queue at every step."""
  if jax.process_count() == 1:
    return bool(stop)
  return done % every == 0 and parallel.any_process(bool(stop))


def run_phase(run: Run, phase: Phase, state: step_lib.TrainState,
              progress: Progress, manager: ocp.CheckpointManager,
              writer: MetricsWriter, stop: list[int]
              ) -> step_lib.TrainState:
  """Trains from state.step to the end of `phase` (or until its search is
  done).

  Checkpoints at the configured interval, never at the last step of the
  phase: the caller saves that one with the next phase's progress. When
  `stop` holds a signal, saves the current step and raises `Interrupted`.
  """
  config, spe = run.config, run.steps_per_epoch
  train_fn = make_step(run, phase)
  start = int(state.step)
  train_iter = data_lib.train_batches(run.dataset.train, config.batch_size,
                                      seed=config.seed, start_step=start,
                                      **parallel.process_slice())
  # A phase without a held-out reader gets the training batch in its place
  # (the step ignores it), so nothing is read or sent to the devices for it.
  hpo_iter = (data_lib.train_batches(run.hpo_split, run.heldout_batch_size,
                                     seed=config.seed + 1, start_step=start,
                                     **parallel.process_slice())
              if any(c.uses_heldout for c in phase.components) else None)
  if start < phase.end:
    logging.info('%s phase: steps %d to %d (%d per epoch). Compiling the '
                 'step, this might take some minutes...', phase.name, start,
                 phase.end, spe)
  window_start, window_steps, history = time.time(), 0, []
  for step in range(start, phase.end):
    run.compiled.add((phase.name, jax.tree.structure(state.components)))
    batch = parallel.shard_batch(run.mesh, next(train_iter))
    hpo_batch = (batch if hpo_iter is None
                 else parallel.shard_batch(run.mesh, next(hpo_iter)))
    state, metrics = train_fn(state, batch, hpo_batch)
    history.append(metrics)
    window_steps += 1
    done = step + 1
    if step == start:
      jax.block_until_ready(state)
      logging.info('First step (with compilation) took %.1f s.',
                   time.time() - window_start)
      window_start, window_steps = time.time(), 0
    if (done % config.log_every_steps == 0 or done == phase.end
        or done % config.checkpoint_every_steps == 0):
      _check_window(writer, history, done, manager)
    if done % config.log_every_steps == 0 or done == phase.end:
      _log_window(writer, history, done, phase, spe, window_start,
                  window_steps)
      history, window_start, window_steps = [], time.time(), 0
    if (done - phase.start) % spe == 0:
      epoch = (done - phase.start) // spe - 1
      state = epoch_end(run, state, phase, epoch, writer)
      if config.eval_every_epochs > 0 and (
          (epoch + 1) % config.eval_every_epochs == 0):
        arch = parallel.replicate(run.mesh, current_architecture(phase, state))
        writer.write(done, {'phase': 'eval', 'epoch': done / spe,
                            **evaluate_fit(run, state.params,
                                           state.batch_stats, arch)})
      if _search_done(phase, state):
        logging.info('The search is done at step %d.', done)
        if history:
          _check_window(writer, history, done, manager)
          _log_window(writer, history, done, phase, spe, window_start,
                      window_steps)
        return state
    if done % config.checkpoint_every_steps == 0 and done < phase.end:
      _save(manager, state, progress, writer)
    if done < phase.end and _stop_requested(stop, done,
                                            config.log_every_steps):
      if history:
        _check_window(writer, history, done, manager)
        _log_window(writer, history, done, phase, spe, window_start,
                    window_steps)
      _save(manager, state, progress, writer)
      raise Interrupted(stop[0] if stop else signal.SIGTERM, done)
  return state


# ------------------------------------------------------------ the results
def evaluate(eval_fn: Callable, params: Any, batch_stats: Any,
             arch: search_space.Architecture, split: data_lib.Split,
             batch_size: int, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Accuracy and mean loss over a whole split."""
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  for images, labels, mask in data_lib.eval_batches(
      split, batch_size, **parallel.process_slice()):
    out = eval_fn(params, batch_stats, arch,
                  *parallel.shard_batch(mesh, (images, labels, mask)))
    for k in totals:
      totals[k] += float(out[k])
  count = max(totals['count'], 1.0)
  return {'accuracy': totals['correct'] / count,
          'loss': totals['loss_sum'] / count}


def current_architecture(phase: Phase, state: step_lib.TrainState
                         ) -> search_space.Architecture:
  """The network that `state` runs now: the phase's fixed architecture, or
  in a search the one its searcher would fix at this point."""
  if phase.arch is not None:
    return phase.arch
  return searched_architecture(phase.components, state)


def searched_architecture(components: tuple[Component, ...],
                          state: step_lib.TrainState
                          ) -> search_space.Architecture:
  """The architecture that the searcher among `components` (the owner of
  `fixed_architecture`) fixes from `state`."""
  searcher = next(c for c in components if c.fixed_architecture is not None)
  return searcher.fixed_architecture(
      jax.device_get(state.components[searcher.name]))


def evaluate_fit(run: Run, params: Any, batch_stats: Any,
                 arch: search_space.Architecture) -> dict[str, float | None]:
  """Clean accuracy and loss on the training examples of
  `run.train_eval` and on the HPO split: how far θ fits what it trains on
  beyond what it generalises to (the test split is left for the end).

  `params`, `batch_stats` and `arch` are on the mesh (replicated).
  """
  fit = evaluate(run.eval_fn, params, batch_stats, arch, run.train_eval,
                 run.config.eval_batch_size, run.mesh)
  heldout = (evaluate(run.eval_fn, params, batch_stats, arch,
                      run.dataset.hpo, run.config.eval_batch_size, run.mesh)
             if len(run.dataset.hpo) else {'accuracy': None, 'loss': None})
  return {'train_accuracy': fit['accuracy'], 'train_loss': fit['loss'],
          'hpo_accuracy': heldout['accuracy'], 'hpo_loss': heldout['loss']}


def write_results(run: Run, writer: MetricsWriter, state: step_lib.TrainState,
                  phase: Phase, progress: Progress, start_time: float
                  ) -> dict[str, Any]:
  """Evaluates the final network (every process) and writes every result
  file (process 0); returns the summary."""
  config = run.config
  state = jax.device_get(state)
  arch = phase.arch
  repl = parallel.replicate(run.mesh, (state.params, state.batch_stats, arch))
  test = evaluate(run.eval_fn, *repl, run.dataset.test,
                  config.eval_batch_size, run.mesh)
  # The HPO split is held out from θ's training: choices between runs are
  # made on it, never on the test split.
  fit = evaluate_fit(run, *repl)
  writer.write(int(state.step), {'phase': TEST_PHASE,
                                 'test_accuracy': test['accuracy'],
                                 'test_loss': test['loss'], **fit})
  logging.info('Test accuracy %.4f, loss %.4f (HPO split accuracy %s, clean '
               'train accuracy %.4f).', test['accuracy'], test['loss'],
               fit['hpo_accuracy'], fit['train_accuracy'])
  # The deployable network: θ pruned to the final support.
  deployed = deployable_variables(run, state, arch)
  genotype_json = json.loads(phase.genotype.to_json())
  genotype_json['alphas'] = {c: [np.asarray(a).tolist() for a in w]
                             for c, w in arch.weights.items()}
  summary = {'mode': config.mode, 'dataset': run.dataset.name,
             'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
             'hpo_accuracy': fit['hpo_accuracy'],
             'train_accuracy': fit['train_accuracy'],
             'train_steps': int(state.step),
             'search_steps': progress.search_steps,
             'wall_seconds': time.time() - start_time,
             'param_count': param_count(deployed['params']),
             'multiply_adds': run.multiply_adds_of(arch.support_dict),
             'compiled_supports': len(run.compiled),
             'genotype': genotype_json}
  if parallel.is_primary_process():
    write_result_files(run, writer, state, deployed, summary)
  return summary


def write_result_files(run: Run, writer: MetricsWriter,
                       state: step_lib.TrainState, deployed: dict[str, Any],
                       summary: dict[str, Any]) -> None:
  """The deployable network, genotype, plots and exports, then (last, as
  it marks the run finished) summary.json."""
  workdir = run.workdir
  write_atomic(os.path.join(workdir, DEPLOY_FILE), lambda tmp: open(
      tmp, 'wb').write(flax.serialization.to_bytes(deployed)))
  write_json_atomic(os.path.join(workdir, GENOTYPE_FILE), summary['genotype'])
  records = read_metrics(workdir)
  plot_paths = [os.path.join(workdir, HPARAMS_PLOT)]
  save_figure(plots.series_figure(
      [r for r in records if r['phase'] in {p.name for p in run.phases}],
      ('learning_rate', 'weight_decay', 'loss'), 'η and the training loss'),
              plot_paths[0])
  exporters = {c.name: c for spec in run.phases
               for c in run.components(spec, param_shapes=None)
               if c.export is not None}
  for c in exporters.values():
    reports = [r for r in records if r['phase'] == f'{c.name}_epoch']
    exports = c.export(state.components.get(c.name), reports)
    for name, obj in exports.items():
      path = os.path.join(workdir, name)
      if name.endswith('.json'):
        write_json_atomic(path, obj)
      else:
        save_figure(obj, path)
        plot_paths.append(path)
  for path in plot_paths:
    writer.write_image(int(state.step), path)
  write_json_atomic(os.path.join(workdir, SUMMARY_FILE), summary)


# ------------------------------------------------------------------ main
def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; resumes from `workdir`.

  Returns the summary (also written to workdir/summary.json). A workdir that
  already holds a summary is not retrained: its summary is returned.
  """
  start_time = time.time()

  # ---------------------------------------------------- the workdir
  workdir = os.path.abspath(os.path.expanduser(workdir))
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  if os.path.exists(summary_path):
    check_workdir_config(workdir, config)
    logging.info('%s exists: this run is finished, not retraining.',
                 summary_path)
    with open(summary_path) as f:
      return json.load(f)

  # ---------------------------------------------------- set-up
  # The whole config is checked before the workdir is touched, so a
  # rejected command leaves nothing behind that would refuse its fix.
  try:
    run = Run.create(config, workdir)
  except ValueError as e:
    if isinstance(e, data_lib.DataError):
      raise
    raise RunError(f'The config is invalid: {e}') from e
  make_workdir(workdir)
  check_workdir_config(workdir, config)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           create=True))

  # ---------------------------------------------------- restore
  progress, state, latest = restore_checkpoint(run, manager)
  if latest is not None:
    logging.info('Resumed from the checkpoint of step %d (%s phase).', latest,
                 progress.phase)
  logging.info('Mode %s; %d parameters.', config.mode,
               param_count(state.params))

  # ---------------------------------------------------- the phases
  with contextlib.closing(MetricsWriter(
      workdir, int(state.step), config.tensorboard)) as writer:
    with stop_requests() as stop:
      try:
        while True:
          phase = build_phase(run, progress, state)
          state = run_phase(run, phase, parallel.replicate(run.mesh, state),
                            progress, manager, writer, stop)
          if phase.spec.searching:
            log_search_summary(run, phase, state)
          following = next_progress(run, phase, state, progress)
          if following is not None and run.phases[
              phase_index(run, following.phase)].fresh_state:
            state = fresh_state(run, phase_index(run, following.phase),
                                following)
          progress = following or progress
          _save(manager, parallel.replicate(run.mesh, state), progress,
                writer)
          # A signal during the phase's last step (or the search's) stops
          # the run here, its state saved, before the next phase compiles or
          # the final evaluation starts.
          if _stop_requested(stop, int(state.step), every=1):
            raise Interrupted(stop[0] if stop else signal.SIGTERM,
                              int(state.step))
          if following is None:
            break
      finally:
        # Pending asynchronous saves finish (or fail) before the run ends,
        # also when it ends by an error: no half-written checkpoint is left.
        manager.wait_until_finished()
        manager.close()

    # -------------------------------------------------- the results
    # Outside `stop_requests`: a signal now ends the process as usual. The
    # result files are atomic and the test record is dropped on resume, so a
    # rerun writes the results again from the final checkpoint.
    return write_results(run, writer, state, phase, progress, start_time)
