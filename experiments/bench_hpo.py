"""Step-time cost of the HPO hypergradient against a plain train step.

Times three train steps on the same network (`--genotype`'s; by default
DARTS-V2's cells, or ProxylessNAS-mobile's layers with `--space
mobilenet`) and batch: plain (fixed η), HPO `exact` (Eq. 4: one more forward/backward on the
HPO batch at θ⁺) and HPO `online` (the next step's training gradient; only
the linearised optax update is added). The last line printed is JSON:

  python -m experiments.bench_hpo [--channels 8 --layers 5 --batch 16 --size 32]

Keys: `<mode>_step_s`, `<mode>_compile_s`, `exact_over_plain`,
`online_over_plain`.
"""

from __future__ import annotations

import json

import jax

from dha_jax import hpo
from dha_jax import train
from dha_jax.nas import search_space as ss
from dha_jax.nas import spaces
from experiments import benchlib


def main() -> None:
  args = benchlib.parse_args(__doc__)
  config = benchlib.bench_config(args)
  model = train.create_model(config, 10)
  arch = ss.make_architecture(benchlib.genotype_support(
      config, spaces.from_config(config)))
  variables = train.init_variables(model, arch, (1, args.size, args.size, 3),
                                   jax.random.key(0))
  batch = benchlib.random_batch(args.batch, args.size)

  results = {}
  for mode in ('plain', 'exact', 'online'):
    components = ()
    if mode != 'plain':
      hpo_config = hpo.default_config()
      hpo_config.mode = mode
      components = (hpo.make_component(hpo_config, variables['params']),)
    r = benchlib.time_train_step(config, model, variables, components, arch,
                                 batch, args.steps)
    results[f'{mode}_compile_s'] = r['compile_s']
    results[f'{mode}_step_s'] = r['step_s']
    print(f'{mode}: compile {r["compile_s"]:.1f} s, step {r["step_s"]:.3f} s',
          flush=True)
  for mode in ('exact', 'online'):
    results[f'{mode}_over_plain'] = (results[f'{mode}_step_s']
                                     / results['plain_step_s'])
  results.update(benchlib.network_info(args))
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  main()
