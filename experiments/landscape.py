"""Filter-normalised 2-D loss landscapes (Li et al., 2018) of finished runs.

Around a run's final weights θ*, two random directions δ and η are drawn
from N(0, I) and normalised filter by filter (Li et al., §4):

  d_{i,j} ← d_{i,j} / ‖d_{i,j}‖ · ‖θ*_{i,j}‖     for filter j of layer i,

where a filter is one output feature (the last axis of a Flax kernel: one
output channel of a conv, depthwise included, one unit of a dense layer).
Directions of 1-D parameters (biases, BatchNorm scale and offset) are zero,
the paper's setting for its figures ("ignore biases and BN"). Then

  f(a, b) = L(θ* + a·δ + b·η)

is evaluated on a `--grid` × `--grid` lattice of [-span, span]², in eval mode
(BatchNorm running statistics of θ*, not perturbed) on the run's final
architecture (the fixed α and support of its last phase), over a fixed
batch of `--examples` training or test images, and drawn as a contour plot,
one PNG per run (`<run>_landscape.png`, with the grid in
`<run>_landscape.json`, which names the workdir relative to the repository,
or by its folder name when it lies outside). `--workdirs` takes finished
workdirs, comma-separated, that hold their checkpoints and config.json:
runs made on this machine. The runs committed under
experiments/reproduce_runs keep only their results, so make the paper's
pair, One-Stage ISTA and DHA of seed 0, into a folder of your own first:

  python -m experiments.reproduce --modes ista_one_stage,dha --seeds 0 \
    --out DIR --report-dir DIR
  python -m experiments.landscape --out-dir experiments --grid 11 \
    --span 1.0 --examples 256 \
    --workdirs DIR/ista_one_stage_seed0,DIR/dha_seed0

A run is restored as `dha_jax.train.train_and_evaluate` resumes one
(`train.restore_checkpoint` and `train.build_phase` on the workdir's
config.json) and pruned as it was deployed (`train.deployable_variables`).

Cost: grid² forward passes of `--examples` images. Measured on this 2-core
CPU (shared with other work) for a `dha` run at the reproduce budget (C = 8,
3 cells), 256 images: 77 s with --grid 3 and 112 s with --grid 5, i.e. about
57 s to load, restore and compile plus 2.2 s per grid point, so the defaults
(11² points) take about 57 + 121 × 2.2 ≈ 320 s per run (extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs import default as default_config
from dha_jax import plots
from dha_jax import step as step_lib
from dha_jax import train
from experiments import reproduce
from experiments.paths import REPO_ROOT

PyTree = Any
# Li et al.'s code adds this to the direction's filter norm.
NORM_EPSILON = 1e-10
# Contour levels span this much loss above the minimum (Li et al. plot up to
# a loss of 10), in this many levels.
CONTOUR_LOSS_RANGE = 10.0
NUM_LEVELS = 30
FIGSIZE = (5.5, 4.5)
# The runs of the paper's §4.3 figure, as `experiments.reproduce` names them.
PAPER_MODES = ('ista_one_stage', 'dha')
PAPER_SEED = 0


def how_to_make_runs() -> str:
  """The commands that make the runs this script reads."""
  workdirs = ','.join(reproduce.workdir_of('DIR', mode, PAPER_SEED)
                      for mode in PAPER_MODES)
  return (f'make them with `python -m experiments.reproduce --modes '
          f'{",".join(PAPER_MODES)} --seeds {PAPER_SEED} --out DIR '
          f'--report-dir DIR` (DIR a new folder), then pass '
          f'`--workdirs {workdirs}`')


def recorded_workdir(workdir: str) -> str:
  """`workdir` as the results record it: relative to the repository, or
  its folder name outside it (no path of this machine)."""
  path = os.path.abspath(workdir)
  if os.path.commonpath([path, REPO_ROOT]) == REPO_ROOT:
    return os.path.relpath(path, REPO_ROOT)
  return os.path.basename(os.path.normpath(path))


# ---------------------------------------------------------------- numerics
def filter_normalize(direction: PyTree, params: PyTree) -> PyTree:
  """Scales each filter of `direction` to the norm of the weight's filter.

  Args:
    direction: a tree shaped like `params`.
    params: the weights θ*; a leaf of rank ≥ 2 is a kernel whose last axis
      indexes its filters, a leaf of rank ≤ 1 a bias or BatchNorm parameter.

  Returns:
    The direction with every filter d_j scaled to ‖θ*_j‖ (norm over all axes
    but the last) and the rank ≤ 1 leaves zeroed.
  """
  chex.assert_trees_all_equal_shapes(direction, params)

  def normalize(d: jax.Array, w: jax.Array) -> jax.Array:
    if w.ndim <= 1:
      return jnp.zeros_like(d)
    axes = tuple(range(w.ndim - 1))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
    return d * w_norm / (d_norm + NORM_EPSILON)

  return jax.tree.map(normalize, direction, params)


def random_direction(key: jax.Array, params: PyTree) -> PyTree:
  """A N(0, I) direction shaped like `params`, filter-normalised to it."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  noise = [jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys, leaves)]
  return filter_normalize(jax.tree.unflatten(treedef, noise), params)


def loss_surface(loss_fn: Callable[[PyTree], PyTree], params: PyTree,
                 directions: tuple[PyTree, PyTree], coords: jax.Array
                 ) -> PyTree:
  """f(a, b) = loss_fn(θ + a·δ + b·η) on the grid coords × coords.

  Args:
    loss_fn: θ ↦ scalar (or a PyTree of scalars, e.g. loss and accuracy).
    params: θ*.
    directions: (δ, η), trees shaped like `params`.
    coords: [G] grid coordinates, shared by both axes.

  Returns:
    loss_fn's output with leading axes [G (a, rows), G (b, columns)]; one
    compiled function evaluates the grid point by point (`lax.map`), so
    memory stays that of one evaluation.
  """
  chex.assert_rank(coords, 1)
  delta, eta = directions
  chex.assert_trees_all_equal_shapes(params, delta, eta)
  a, b = jnp.meshgrid(coords, coords, indexing='ij')

  @jax.jit
  def grid_values(points, params, delta, eta):
    def at(ab):
      return loss_fn(jax.tree.map(lambda w, d, e: w + ab[0] * d + ab[1] * e,
                                  params, delta, eta))
    return jax.lax.map(at, points)

  flat = grid_values(jnp.stack([a.ravel(), b.ravel()], axis=-1), params,
                     delta, eta)
  return jax.tree.map(lambda v: v.reshape(a.shape + v.shape[1:]), flat)


# ---------------------------------------------------------------- restore
def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the configs use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config of a run, from workdir/config.json; fields added to
  `configs/default.py` since the run was made read their defaults."""
  path = os.path.join(workdir, train.CONFIG_FILE)
  if not os.path.exists(path):
    raise train.RunError(f'{path} is missing: {workdir} is not the workdir '
                         'of a dha_jax run made on this machine (committed '
                         'runs keep only their results); '
                         f'{how_to_make_runs()}.')
  defaults = json.loads(default_config.get_config().to_json_best_effort())
  return ml_collections.ConfigDict(
      _tuples(train.read_config_json(path, defaults)))


def load_final(workdir: str) -> tuple[train.Run, dict, Any]:
  """A finished run's runner, pruned final variables and final architecture.

  Returns:
    (runner, {'params', 'batch_stats'} pruned to the final support, the
    final `Architecture`).

  Raises:
    RunError: when the run is not finished or its checkpoints are missing.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, train.SUMMARY_FILE)):
    raise train.RunError(f'{workdir} holds no finished run (no '
                         f'{train.SUMMARY_FILE}); finish it first, or '
                         f'{how_to_make_runs()}.')
  config = load_config(workdir)
  if not os.path.isdir(os.path.join(workdir, train.CHECKPOINT_DIR)):
    raise train.RunError(f'{workdir} holds no {train.CHECKPOINT_DIR}/ to '
                         f'restore the final weights from; '
                         f'{how_to_make_runs()}.')
  runner = train.Run.create(config, workdir)
  manager = ocp.CheckpointManager(
      os.path.join(workdir, train.CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  progress, state, _ = train.restore_checkpoint(runner, manager)
  manager.close()
  arch = train.build_phase(runner, progress, state).arch
  variables = train.deployable_variables(runner, state, arch)
  return runner, variables, arch


def fixed_batch(runner: train.Run, split_name: str, examples: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`examples` images and labels of a split, chosen by `seed`."""
  split = {'train': runner.dataset.train, 'test': runner.dataset.test}[
      split_name]
  n = min(examples, len(split))
  idx = np.sort(np.random.default_rng(seed).choice(len(split), n,
                                                   replace=False))
  return split.images.take(idx), split.labels[idx]


def run_landscape(workdir: str, *, grid: int, span: float, examples: int,
                  split: str, seed: int) -> dict[str, Any]:
  """Loss and accuracy surfaces around a finished run's final weights.

  Returns:
    {'coords' [G], 'loss' [G, G], 'accuracy' [G, G] (rows: a along δ,
    columns: b along η), 'center_loss', 'mode', 'test_accuracy', ...}.
  """
  runner, variables, arch = load_final(workdir)
  images, labels = fixed_batch(runner, split, examples, seed)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  mask = jnp.ones(labels.shape, bool)
  batch_stats = variables['batch_stats']

  def loss_fn(params):
    out = step_lib.eval_step(params, batch_stats, arch, images, labels, mask,
                             model=runner.model, pre=runner.pre)
    return {'loss': out['loss_sum'] / out['count'],
            'accuracy': out['correct'] / out['count']}

  key_delta, key_eta = jax.random.split(jax.random.key(seed))
  params = variables['params']
  directions = (random_direction(key_delta, params),
                random_direction(key_eta, params))
  coords = jnp.linspace(-span, span, grid)
  surface = loss_surface(loss_fn, params, directions, coords)
  with open(os.path.join(workdir, train.SUMMARY_FILE)) as f:
    summary = json.load(f)
  center = jax.jit(loss_fn)(params)
  return {'workdir': recorded_workdir(workdir), 'mode': runner.config.mode,
          'test_accuracy': summary['test_accuracy'], 'split': split,
          'examples': int(labels.shape[0]), 'seed': seed,
          'coords': np.asarray(coords).tolist(),
          'loss': np.asarray(surface['loss']).tolist(),
          'accuracy': np.asarray(surface['accuracy']).tolist(),
          'center_loss': float(center['loss']),
          'center_accuracy': float(center['accuracy'])}


def contour_figure(result: dict[str, Any], title: str) -> plots.plt.Figure:
  """Loss contours over (a, b), the final weights marked at the origin."""
  coords = np.asarray(result['coords'])
  loss = np.asarray(result['loss'])
  low = float(np.nanmin(loss))
  high = min(float(np.nanmax(loss)), low + CONTOUR_LOSS_RANGE)
  levels = np.linspace(low, high, NUM_LEVELS) if high > low else NUM_LEVELS
  fig, ax = plots.plt.subplots(figsize=FIGSIZE)
  # Rows of `loss` run along a (the x axis of the plot).
  cs = ax.contour(coords, coords, loss.T, levels=levels, cmap='viridis')
  ax.clabel(cs, cs.levels[::max(1, len(cs.levels) // 6)], fontsize=7,
            fmt='%.2f')
  ax.plot(0.0, 0.0, 'r*', markersize=10, label='final weights')
  ax.set_xlabel('δ (filter-normalised)')
  ax.set_ylabel('η (filter-normalised)')
  ax.set_title(title, fontsize=9)
  ax.set_aspect('equal')
  ax.legend(loc='upper right', fontsize=7)
  fig.tight_layout()
  return fig


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdirs', required=True,
                      help='comma-separated workdirs of finished runs made '
                      'on this machine (with their checkpoints); '
                      + how_to_make_runs())
  parser.add_argument('--out-dir', default='.',
                      help='where <run>_landscape.png / .json go')
  parser.add_argument('--grid', type=int, default=11,
                      help='points per axis')
  parser.add_argument('--span', type=float, default=1.0,
                      help='the grid covers [-span, span]^2')
  parser.add_argument('--examples', type=int, default=256,
                      help='images of the fixed batch')
  parser.add_argument('--split', choices=('train', 'test'), default='train')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the directions and of the batch')
  args = parser.parse_args(argv)
  if args.grid < 2 or args.span <= 0 or args.examples < 1:
    parser.error('--grid needs at least 2 points, --span a positive value '
                 'and --examples at least 1 image.')
  os.makedirs(args.out_dir, exist_ok=True)
  for workdir in filter(None, args.workdirs.split(',')):
    name = os.path.basename(os.path.normpath(workdir))
    try:
      result = run_landscape(workdir, grid=args.grid, span=args.span,
                             examples=args.examples, split=args.split,
                             seed=args.seed)
    except train.RunError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    train.write_json_atomic(
        os.path.join(args.out_dir, f'{name}_landscape.json'), result)
    fig = contour_figure(
        result, f"{name} ({result['mode']}): loss on {result['examples']} "
        f"{args.split} images\ntest accuracy {result['test_accuracy']:.4f}, "
        f"loss at θ* {result['center_loss']:.3f}")
    path = os.path.join(args.out_dir, f'{name}_landscape.png')
    fig.savefig(path, dpi=100)
    plots.plt.close(fig)
    loss = np.asarray(result['loss'])
    print(f'{name}: loss at θ* {result["center_loss"]:.4f}, grid min '
          f'{loss.min():.4f}, max {loss.max():.4f} -> {path}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
