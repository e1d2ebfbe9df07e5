"""Step time of the official PyTorch DHA code, in bench_step's comparison.

Times the search-phase steps of the official code (github.com/kaichen-z/DHA)
on the CPU, in the configuration of `experiments.bench_step`'s comparison
(5 cells, C = 8, auxiliary head, batch 96, 32 px, the support of
experiments/bench_genotype.json), so that the two can be measured on the same
machine in the same sitting:

* `ista_one_stage`: one iteration of its One-Stage ISTA search loop
  (`ista_single_nor`: forward with the auxiliary head, backward, Adam on b,
  gradient clipping, SGD on θ);
* `dha`: one iteration of its DHA loop (`ista_single_doal`: the τ loss and
  its SGD step, the differentiable SGD step of θ, the held-out forward and
  backward, the η step). Its augmentation runs in the data loader's worker
  processes, outside this step (dha_jax's DHA step augments on device, inside
  the step): this times the step without it. The same holds for the
  Cutout of the comparison's configuration, a transform of its loader.

Both leave out the loop's accuracy metrics (`utils.accuracy`), which
dha_jax's step computes.

The official code is neither part of this repository nor a dependency: give
a checkout of it with `--official`, and run this in an environment with
torch, scikit-learn, pandas and numpy 1 (the official code's imports; it
calls `np.sum` on a generator, which numpy 2 refuses), e.g.

  python -m venv ../torch-env && ../torch-env/bin/pip install torch \\
      scikit-learn "numpy<2" "pandas<2.3"
  ../torch-env/bin/python -m experiments.bench_official \\
      --official PATH/TO/DHA --threads 1 --steps 8

The official code assumes CUDA; `_run_on_cpu` maps its CUDA calls to the CPU
(its math is untouched). The support is set by giving its sparse code x the
genotype's (input, op) pairs, which its own projection (`sample_and_proj`)
turns into the masks; the step checks that the network's nonzero op weights
are exactly those pairs. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

GENOTYPE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'bench_genotype.json')
# The official code's op order of the ISTA space (model/darts_genotypes.py).
PRIMITIVES_ISTA = ('max_pool_3x3', 'avg_pool_3x3', 'skip_connect',
                   'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3',
                   'dil_conv_5x5')
NODES = 4
# Its configuration keys at the comparison's values; the rest are the ISTA
# one-stage CIFAR defaults. The HPO and DA values set no cost of a step.
TRAIN_CONFIG = {'w_grad_clip': 5.0, 'print_freq': 50, 'w_lr': 0.025,
                'w_momentum': 0.9, 'w_weight_decay': 3e-4}
ARCH_CONFIG = {'init_channels': 8, 'layers': 5, 'steps': NODES,
               'sparseness': 2, 'proj_dims': 7, 'auxiliary': True,
               'aux_weight': 0.4, 'drop_path_prob': 0.0, 'alpha_lr': 3e-4,
               'alpha_weight_decay': 1e-3, 'dist_limit': 1e-3,
               'param_limit': 3.7}
DATASET_CONFIG = {'name': 'cifar10', 'num_class': 10}
HPO_CONFIG = {'learning_low': 0.01, 'learning_up': 0.05,
              'weight_decay_low': 1e-4, 'weight_decay_up': 5e-4,
              'h_lr': 1e-3, 'h_momentum': 0.9, 'h_nesterov': False,
              'h_weight_decay': 0.0}
DA_CONFIG = {'policy': 14, 'temperature': 0.5, 'd_lr': 1e-3,
             'd_momentum': 0.9, 'd_nesterov': False, 'd_weight_decay': 0.0}


def sparse_codes(cell: Sequence[Sequence[Any]]) -> list[np.ndarray]:
  """The official code's sparse code x of each node for a cell's genotype.

  Node i's x has (i + 2) · 7 entries, one per (input, op) in the official
  op order; the genotype's two (op, input) pairs of node i are 1, the rest 0.
  """
  if len(cell) != 2 * NODES:
    raise ValueError(f'a cell of the genotype has {len(cell)} edges, not '
                     f'{2 * NODES} (two per node)')
  codes = []
  for node in range(NODES):
    x = np.zeros((node + 2) * len(PRIMITIVES_ISTA))
    for op, source in cell[2 * node:2 * node + 2]:
      if op not in PRIMITIVES_ISTA[:-1] or not 0 <= source < node + 2:
        # The official selection (`picking_optimal`) never picks its last op.
        raise ValueError(f'node {node}: ({op!r}, {source}) is not an edge '
                         'the official code can select')
      x[source * len(PRIMITIVES_ISTA) + PRIMITIVES_ISTA.index(op)] = 1.0
    codes.append(x)
  return codes


def support_of(weights: np.ndarray) -> list[tuple[str, int]]:
  """The (op, input) pairs with nonzero weight, node by node, from the
  official network's op weights [edges, 7] (edges ordered by node, then
  input)."""
  pairs, edge = [], 0
  for node in range(NODES):
    for source in range(node + 2):
      pairs += [(PRIMITIVES_ISTA[k], source)
                for k in np.flatnonzero(weights[edge])]
      edge += 1
  return pairs


def _run_on_cpu(torch: Any) -> None:
  """The official code's CUDA calls, made to run on the CPU: `.cuda()` is
  the identity, `device='cuda'` the CPU, and `get_device()` (-1 on the CPU,
  which `Tensor.to` refuses) the tensor's device."""
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.nn.Module.cuda = lambda self, *a, **k: self
  randn = torch.randn

  def randn_on_cpu(*shape: Any, device: Any = None, **kwargs: Any) -> Any:
    del device
    return randn(*shape, **kwargs)

  torch.randn = randn_on_cpu
  torch.Tensor.get_device = lambda self: self.device


def _supernet(torch: Any, genotype: dict, seed: int) -> Any:
  """The official One-Stage ISTA super-network on the genotype's support."""
  from model import ista_sup_single   # pylint: disable=import-outside-toplevel
  np.random.seed(seed)
  torch.manual_seed(seed)
  net = ista_sup_single.Supernet_Itsa(TRAIN_CONFIG, DATASET_CONFIG,
                                      ARCH_CONFIG, device_ids=[0])
  with contextlib.redirect_stdout(io.StringIO()):   # its per-node prints
    net.initialization()
  net.x_normals_last = sparse_codes(genotype['normal'])
  net.x_reduces_last = sparse_codes(genotype['reduce'])
  net.pretrain(False, drop_path_prob=0.0, i=0, epochs=1)
  net.train()
  return net


def _check_support(net: Any, genotype: dict) -> None:
  for cell in ('normal', 'reduce'):
    got = support_of(getattr(net.model, f'alphas_{cell}').detach().numpy())
    want = sorted((op, source) for op, source in genotype[cell])
    if sorted(got) != want:
      raise RuntimeError(f'the official network runs {sorted(got)} in its '
                         f'{cell} cell, not the genotype\'s {want}')


def ista_one_stage_step(torch: Any, net: Any, batch: tuple) -> Callable:
  """Its `ista_single_nor` iteration (searchmanager_darts.py)."""
  images, labels = batch
  f = torch.nn.functional
  opt_alpha = torch.optim.Adam(net.alphas(), ARCH_CONFIG['alpha_lr'],
                               betas=(0.5, 0.999),
                               weight_decay=ARCH_CONFIG['alpha_weight_decay'])
  opt_w = torch.optim.SGD(net.weights(), TRAIN_CONFIG['w_lr'],
                          momentum=TRAIN_CONFIG['w_momentum'],
                          weight_decay=TRAIN_CONFIG['w_weight_decay'])

  def step() -> float:
    opt_w.zero_grad()
    opt_alpha.zero_grad()
    logits, logits_aux = net(images, False)
    loss = (f.cross_entropy(logits, labels) + ARCH_CONFIG['aux_weight']
            * f.cross_entropy(logits_aux, labels))
    loss.backward()
    opt_alpha.step()
    torch.nn.utils.clip_grad_norm_(net.weights(), TRAIN_CONFIG['w_grad_clip'])
    opt_w.step()
    return loss.item()

  return step


def dha_step(torch: Any, net: Any, batch: tuple, heldout: tuple) -> Callable:
  """Its `ista_single_doal` iteration (searchmanager_darts.py), on op codes
  [batch, 14, 2] as its data loader makes them."""
  from model import hpo_da   # pylint: disable=import-outside-toplevel
  images, labels = batch
  held_images, held_labels = heldout
  f = torch.nn.functional
  cpu = torch.device('cpu')
  hpo = hpo_da.HPO_INIT(HPO_CONFIG, device=cpu)
  da = hpo_da.DA_INIT(DA_CONFIG, device=cpu)
  opt_hp = torch.optim.SGD(
      [hpo.learning.module, hpo.weight_decay.module], lr=HPO_CONFIG['h_lr'],
      momentum=HPO_CONFIG['h_momentum'], nesterov=HPO_CONFIG['h_nesterov'],
      weight_decay=HPO_CONFIG['h_weight_decay'])
  opt_da = torch.optim.SGD(
      [da.policy_alpha.module], lr=DA_CONFIG['d_lr'],
      momentum=DA_CONFIG['d_momentum'], nesterov=DA_CONFIG['d_nesterov'],
      weight_decay=DA_CONFIG['d_weight_decay'])
  opt_alpha = torch.optim.Adam(net.alphas(), ARCH_CONFIG['alpha_lr'],
                               betas=(0.5, 0.999),
                               weight_decay=ARCH_CONFIG['alpha_weight_decay'])
  crit = torch.nn.CrossEntropyLoss(reduction='none')
  rng = np.random.default_rng(0)
  ops = np.zeros((len(labels), DA_CONFIG['policy'], 2), np.float32)
  for column in range(2):
    ops[np.arange(len(labels)),
        rng.integers(0, DA_CONFIG['policy'], len(labels)), column] = 1.0
  ops = torch.from_numpy(ops)

  def step() -> float:
    da.weights_matrix()   # the policy the loader samples the next batch from
    logits, logits_aux = net(images, False)
    loss = (crit(logits, labels)
            + ARCH_CONFIG['aux_weight'] * crit(logits_aux, labels))
    loss_tau = da.prob_loss(-loss.detach(), ops)
    opt_da.zero_grad()
    loss_tau.backward()
    opt_da.step()
    hpo.zero_grad(net.weights())
    opt_alpha.zero_grad()
    loss.mean().backward()
    opt_alpha.step()
    torch.nn.utils.clip_grad_norm_(net.weights(), TRAIN_CONFIG['w_grad_clip'])
    hpo.SGD_STEP(net.named_weights(), TRAIN_CONFIG['w_momentum'])
    held_logits, _ = net(held_images, False)
    held_loss = f.cross_entropy(held_logits, held_labels)
    opt_hp.zero_grad()
    held_loss.mean().backward()
    opt_hp.step()
    hpo.limited(freeze=False)
    hpo.reset_model(net.weights())
    return loss.mean().item()

  return step


def time_step(step: Callable[[], float], steps: int) -> dict[str, float]:
  """Best and median of `steps` step seconds, after one untimed step (as
  bench_step times its compiled step after compiling)."""
  step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  if not np.isfinite(loss):
    raise FloatingPointError(f'the official step\'s loss became {loss}')
  return {'step_s': float(np.min(times)),
          'step_median_s': float(np.median(times))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official', required=True,
                      help='a checkout of github.com/kaichen-z/DHA')
  parser.add_argument('--genotype', default=GENOTYPE,
                      help='the support, a genotype.json (default: the '
                           "comparison's, experiments/bench_genotype.json)")
  parser.add_argument('--batch', type=int, default=96)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--threads', default='1',
                      help="torch threads: 'all' or '1' (one thread, pinned "
                           "to one CPU, as bench_step's `--threads 1`)")
  parser.add_argument('--modes', default='ista_one_stage,dha')
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.official, 'model',
                                     'ista_sup_single.py')):
    parser.error(f'--official {args.official!r} is not a checkout of the '
                 'official code (no model/ista_sup_single.py): clone '
                 'github.com/kaichen-z/DHA and give its folder')
  modes = args.modes.split(',')
  unknown = set(modes) - {'ista_one_stage', 'dha'}
  if unknown:
    parser.error(f'--modes: unknown {sorted(unknown)}; the modes are '
                 'ista_one_stage and dha')
  if args.threads not in ('all', '1'):
    parser.error("--threads is 'all' or '1'")
  if args.threads == '1' and hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  import torch   # pylint: disable=import-outside-toplevel
  if args.threads == '1':
    torch.set_num_threads(1)
  _run_on_cpu(torch)
  sys.path.insert(0, os.path.abspath(args.official))
  with open(args.genotype) as f:
    genotype = json.load(f)
  rng = np.random.default_rng(0)

  def random_batch() -> tuple:
    images = rng.standard_normal((args.batch, 3, args.size, args.size))
    labels = rng.integers(0, DATASET_CONFIG['num_class'], args.batch)
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels)

  results = {'batch': args.batch, 'size': args.size,
             'threads': args.threads, 'torch': torch.__version__,
             'torch_threads': torch.get_num_threads(),
             'cpu_count': os.cpu_count(),
             'machine': platform.processor() or platform.machine(),
             'genotype': os.path.relpath(args.genotype)}
  for mode in modes:
    net = _supernet(torch, genotype, seed=0)
    train_batch = random_batch()
    step = (ista_one_stage_step(torch, net, train_batch)
            if mode == 'ista_one_stage'
            else dha_step(torch, net, train_batch, random_batch()))
    r = time_step(step, args.steps)
    _check_support(net, genotype)
    results[f'{mode}_step_s'] = r['step_s']
    results[f'{mode}_step_median_s'] = r['step_median_s']
    print(f'official {mode}: step {r["step_s"]:.3f} s (median '
          f'{r["step_median_s"]:.3f} s), {args.batch / r["step_s"]:.1f} '
          'images/s', flush=True)
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  main()
