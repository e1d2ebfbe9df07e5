"""Step time of the full DHA step against the One-Stage ISTA (NAS-only) step.

Both are the search-phase train step of `dha_jax.train.Runner` on the same
network, batch and support: `ista_one_stage` (sparse child network, θ and b
gradients, Adam on b) and `dha` (plus op-pair sampling and augmentation from
τ, Eq. 2, and the HPO hypergradient, Eq. 4). The joint ablations `nas_da` and
`nas_hpo` are timed too, to split the cost. The last line printed is JSON:

  python -m experiments.bench_step [--channels 8 --layers 5 --batch 16 --size 32]

Keys: `<mode>_step_s`, `<mode>_compile_s`, `dha_over_nas` (the paper's ratio
is 76.6 / 55.2 = 1.39 GPU hours; target ≤ 1.3 with exact HPO).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from dha_jax import parallel
from dha_jax import train
from experiments import benchlib

MODES = ('ista_one_stage', 'nas_da', 'nas_hpo', 'dha')


def time_mode(mode: str, args: argparse.Namespace) -> dict[str, float]:
  config = benchlib.bench_config(args)
  config.mode = mode
  config.hpo.mode = args.hpo_mode
  config.nas.max_iters = 2000
  run = train.Runner(config, workdir='')
  run.mesh = parallel.make_mesh(jax.devices()[:1])
  phase, state = run.initial({'phase': train.SEARCH, 'phase_start': 0,
                              'search_steps': 0})
  fn = run.make_step(phase)
  batch = parallel.shard_batch(run.mesh,
                               benchlib.random_batch(args.batch, args.size))
  state = parallel.replicate(run.mesh, state)
  start = time.perf_counter()
  compiled = fn.lower(state, batch, batch).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {'compile_s': compile_s, 'step_s': float(np.min(times))}


def main() -> None:
  args = benchlib.parse_args(__doc__, hpo_mode='exact', modes=','.join(MODES))
  results = {}
  for mode in args.modes.split(','):
    r = time_mode(mode, args)
    results[f'{mode}_compile_s'] = r['compile_s']
    results[f'{mode}_step_s'] = r['step_s']
    print(f'{mode}: compile {r["compile_s"]:.1f} s, step {r["step_s"]:.3f} s',
          flush=True)
  if 'dha_step_s' in results and 'ista_one_stage_step_s' in results:
    results['dha_over_nas'] = (results['dha_step_s']
                               / results['ista_one_stage_step_s'])
  results.update(hpo_mode=args.hpo_mode, **benchlib.network_info(args))
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  main()
