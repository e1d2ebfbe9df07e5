"""Sparse child network vs dense all-ops super-network: compile and step time.

The NAS component runs, at every step, only the (edge, op) pairs of the
current support (2 per node), with real-valued α (Eq. 7). The alternative is
the dense super-network that computes every candidate op on every edge and
weights it by α (zero off the support). Both are timed here with the same
train step, network size and batch, the sparse child being `--genotype`'s
(DARTS-V2's cells by default); the last line printed is JSON:

  python -m experiments.bench_nas [--channels 8 --layers 5 --batch 16 --size 32]

In the MobileNet space (the sparse child: ProxylessNAS-mobile's one op per
layer; the dense network: all 6-7 candidates of each of its 21 layers):

  python -m experiments.bench_nas --space mobilenet --width-multiplier 0.25

Keys: sparse/dense compile seconds and step seconds, `sparse_over_dense`
(step time ratio; target ≤ 0.4) and `search_images_per_s` (the NAS search
step: sparse child, gradients for θ and the codes b, Adam on b).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from dha_jax import train
from dha_jax.nas import search_space as ss
from dha_jax.nas import spaces
from experiments import benchlib


def main() -> None:
  args = benchlib.parse_args(__doc__)
  config = benchlib.bench_config(args)
  space = spaces.from_config(config)
  model = train.create_model(config, 10)
  dense = space.dense_support()
  # `--genotype`'s; by default DARTS-V2's cells or ProxylessNAS-mobile's
  # layers.
  sparse = benchlib.genotype_support(config, space)
  rng = np.random.default_rng(0)
  sparse_w = {c: [rng.normal(size=len(n)).astype(np.float32)
                  for n in sparse[c]] for c in sparse}
  dense_w = {c: [np.zeros(len(n), np.float32) for n in dense[c]]
             for c in dense}
  for c in sparse:
    for node, pairs in enumerate(sparse[c]):
      for k, pair in enumerate(pairs):
        dense_w[c][node][dense[c][node].index(pair)] = sparse_w[c][node][k]
  shape = (1, args.size, args.size, 3)
  variables = train.init_variables(model, ss.make_architecture(dense), shape,
                                   jax.random.key(0))
  batch = benchlib.random_batch(args.batch, args.size)

  results = {}
  for name, arch in (('sparse', ss.make_architecture(sparse, sparse_w)),
                     ('dense', ss.make_architecture(dense, dense_w))):
    r = benchlib.time_train_step(config, model, variables, (), arch, batch,
                                 args.steps)
    results[f'{name}_compile_s'] = r['compile_s']
    results[f'{name}_step_s'] = r['step_s']
    print(f'{name}: compile {r["compile_s"]:.1f} s, step {r["step_s"]:.3f} s',
          flush=True)
  results['sparse_over_dense'] = (results['sparse_step_s']
                                  / results['dense_step_s'])
  search = benchlib.time_search_step('ista_one_stage', args)
  results['search_step_s'] = search['step_s']
  results['search_compile_s'] = search['compile_s']
  results['search_images_per_s'] = args.batch / search['step_s']
  results.update(benchlib.network_info(args))
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  main()
