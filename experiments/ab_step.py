"""Interleaved A/B of a search step between two source trees.

On a shared machine the same step's time drifts by ±30 % within an hour
(experiments/RESULTS.md, 'Step time against the official code'), so two
`bench_step` runs one after the other do not tell a 10 % change. This script
starts one worker process per tree (each compiles `--mode`'s first-phase
step with that tree's code, one after the other), then alternates single
steps between them, ABBA, so that both see the same moments of the
machine, and prints each tree's best and median step and the median of the
paired ratios B/A:

  python -m experiments.ab_step --before /tmp/before --after . \\
      --mode ista_one_stage --rounds 20 -- --layers 5 --channels 8 \\
      --batch 96 --size 32 --aux 1 --cutout 16 \\
      --genotype experiments/bench_genotype.json --threads 1

`--before` and `--after` are checkouts of the repository (`git worktree add
/tmp/before <commit>`); the options after `--` are `bench_step`'s network
and batch options (experiments/benchlib.py), passed to both workers. With
`--threads 1` both workers are pinned to the same CPU and only one of them
runs at a time. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import IO

_READY = 'ready'


def _worker() -> None:
  """In a tree's own process, with that tree first on the path (so that
  `dha_jax` and `experiments.benchlib` are the tree's, which need not have
  this script): compile the step, then one step per line read on stdin,
  printing its seconds."""
  import jax   # pylint: disable=import-outside-toplevel
  from experiments import benchlib   # pylint: disable=import-outside-toplevel
  args = benchlib.parse_args(__doc__, mode='ista_one_stage', worker=0)
  setup = benchlib.search_step_setup(args.mode, args)
  step = setup.fn.lower(setup.state, setup.batch, setup.heldout).compile()
  state = setup.state
  for _ in range(2):   # warm-up: first touches of the step's host memory
    state, metrics = step(state, setup.batch, setup.heldout)
    jax.block_until_ready(metrics)
  print(_READY, flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    state, metrics = step(state, setup.batch, setup.heldout)
    jax.block_until_ready(metrics)
    print(time.perf_counter() - start, flush=True)


def _start(tree: str, mode: str, bench_args: list[str],
           log: IO[str]) -> subprocess.Popen:
  env = {**os.environ, 'PYTHONPATH': os.path.abspath(tree)}
  worker = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), '--worker', '1',
       '--mode', mode, *bench_args],
      cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      stderr=log, text=True)
  for line in worker.stdout:
    if line.strip() == _READY:
      return worker
  raise RuntimeError(f'the worker for {tree} exited before its first step; '
                     f'its output is in {log.name}')


def _step(worker: subprocess.Popen) -> float:
  worker.stdin.write('step\n')
  worker.stdin.flush()
  return float(worker.stdout.readline())


def abba_order(rounds: int) -> list[int]:
  """Which tree (0: A, 1: B) steps next, round by round: AB, BA, AB, ...,
  so that each tree goes first in every other round."""
  return [i for r in range(rounds) for i in ((0, 1) if r % 2 == 0 else (1, 0))]


def main() -> None:
  if '--worker' in sys.argv:
    _worker()
    return
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--before', required=True, help='tree A (a checkout)')
  parser.add_argument('--after', required=True, help='tree B (a checkout)')
  parser.add_argument('--mode', default='ista_one_stage')
  parser.add_argument('--rounds', type=int, default=20,
                      help='steps per tree, alternated ABBA')
  parser.add_argument('--log',
                      default=os.path.join(tempfile.gettempdir(),
                                           'ab_step.log'),
                      help="the workers' stderr")
  args, bench_args = parser.parse_known_args()
  bench_args = [a for a in bench_args if a != '--']
  trees = (args.before, args.after)
  for tree in trees:
    if not os.path.isfile(os.path.join(tree, 'experiments', 'benchlib.py')):
      parser.error(f'{tree} is not a checkout of this repository')
  with open(args.log, 'w') as log:
    workers = [_start(tree, args.mode, bench_args, log) for tree in trees]
    times = ([], [])
    for i in abba_order(args.rounds):
      times[i].append(_step(workers[i]))
    for worker in workers:
      worker.stdin.close()
      worker.wait()
  result = {'mode': args.mode, 'rounds': args.rounds,
            'bench_args': ' '.join(bench_args)}
  for name, tree, t in zip(('before', 'after'), trees, times):
    result[f'{name}_best_s'] = min(t)
    result[f'{name}_median_s'] = statistics.median(t)
    print(f'{args.mode} {name} ({tree}): best {min(t):.3f} s, median '
          f'{statistics.median(t):.3f} s over {len(t)} steps')
  result['after_over_before_paired_median'] = statistics.median(
      b / a for a, b in zip(*times))
  print(f"paired after/before, median: "
        f"{result['after_over_before_paired_median']:.3f}")
  print(json.dumps(result, sort_keys=True))


if __name__ == '__main__':
  main()
