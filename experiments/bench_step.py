"""Step time of the full DHA step against the One-Stage ISTA (NAS-only) step.

Both are the search-phase train step of `dha_jax.train.Run` on the same
network, batch and support: `ista_one_stage` (sparse child network, θ and b
gradients, Adam on b) and `dha` (plus op-pair sampling and augmentation from
τ, Eq. 2, and the HPO hypergradient, Eq. 4). The joint ablations `nas_da` and
`nas_hpo` are timed too, to split the cost; `train` (in `--modes`) is the
fixed-architecture step of `--genotype`. The last line printed is JSON:

  python -m experiments.bench_step [--channels 8 --layers 5 --batch 16 \
      --size 32 --hpo-batch 0 --hpo-mode exact --modes ...]

The configuration of the comparison with the official PyTorch code (5 cells,
C = 8, auxiliary head, batch 96, 32 px, Cutout 16, the support of
experiments/bench_genotype.json, one core; experiments/RESULTS.md):

  python -m experiments.bench_step --layers 5 --channels 8 --batch 96 \
      --size 32 --aux 1 --cutout 16 --genotype experiments/bench_genotype.json \
      --threads 1 --modes train,ista_one_stage,dha

`--depthwise` picks the depthwise conv implementation (default 'auto');
`--threads all` uses every core. Keys: `<mode>_step_s`, `<mode>_compile_s`,
`<mode>_images_per_s`, `dha_over_nas` (the paper's ratio is 76.6 / 55.2 =
1.39 GPU hours; target ≤ 1.3 with exact HPO), `hpo_batch`.

Exact HPO forwards and backpropagates the held-out batch once more per step
(`--hpo-batch` examples, 0: as many as `--batch`, the reference's CIFAR
setting), so on hardware whose step time grows with the batch, as a CPU's
does, it costs about `hpo_batch / batch` of a NAS step.
"""

from __future__ import annotations

import json

from experiments import benchlib

MODES = ('ista_one_stage', 'nas_da', 'nas_hpo', 'dha')


def main() -> None:
  args = benchlib.parse_args(__doc__, hpo_mode='exact', hpo_batch=0,
                             modes=','.join(MODES))
  results, supports = {}, set()
  for mode in args.modes.split(','):
    r = benchlib.time_search_step(mode, args, args.hpo_mode, args.hpo_batch)
    supports.add(r['support'])
    results[f'{mode}_compile_s'] = r['compile_s']
    results[f'{mode}_step_s'] = r['step_s']
    results[f'{mode}_step_median_s'] = r['step_median_s']
    results[f'{mode}_images_per_s'] = args.batch / r['step_s']
    print(f'{mode}: compile {r["compile_s"]:.1f} s, step {r["step_s"]:.3f} s '
          f'(median {r["step_median_s"]:.3f} s), '
          f'{args.batch / r["step_s"]:.1f} images/s', flush=True)
  if len(supports) != 1:
    raise RuntimeError('the modes ran on different supports, so their step '
                       'times are not comparable (with `train` among the '
                       'modes, give --genotype)')
  if 'dha_step_s' in results and 'ista_one_stage_step_s' in results:
    results['dha_over_nas'] = (results['dha_step_s']
                               / results['ista_one_stage_step_s'])
  results.update(hpo_mode=args.hpo_mode,
                 hpo_batch=args.hpo_batch or args.batch,
                 **benchlib.network_info(args))
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  main()
