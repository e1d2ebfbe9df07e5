"""Forward + backward time of one depthwise conv, per implementation.

The shapes are those of a DARTS CIFAR network's sep/dil convs: width C at
the input resolution, 2C at half, 4C at a quarter; kernels 3 and 5,
dilation 1 (sep_conv) and 2 (dil_conv), stride 1 and 2 (reduction cells):

  python -m experiments.bench_depthwise [--batch 96 --size 32 --channels 8 \
      --threads 1 --repeats 10]

Prints one row per shape with the best time of each implementation of
`dha_jax.nas.depthwise` and the one 'auto' picks, then JSON.
"""

from __future__ import annotations

import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dha_jax.nas import depthwise
from experiments import benchlib

IMPLS = tuple(i for i in depthwise.IMPLEMENTATIONS if i != 'auto')
KERNELS = (3, 5)
DILATIONS = (1, 2)
STRIDES = (1, 2)
WIDTHS = (1, 2, 4)   # multiples of C, each at 1/multiple of the resolution


def time_impl(impl: str, x: jax.Array, kernel: jax.Array, stride: int,
              dilation: int, repeats: int) -> float:
  """Best seconds of a jitted forward + backward (both inputs)."""
  padding = dilation * (kernel.shape[0] - 1) // 2
  loss = lambda x, w: jnp.sum(jnp.sin(depthwise.depthwise_conv(
      x, w, stride=stride, dilation=dilation, padding=padding, impl=impl)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(grad(x, kernel))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(x, kernel))
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  args = benchlib.parse_args(__doc__, options=('channels', 'batch', 'size'),
                             batch=96, repeats=10)
  rng = np.random.default_rng(0)
  rows = []
  for width, k, d, s in itertools.product(WIDTHS, KERNELS, DILATIONS,
                                          STRIDES):
    c, size = args.channels * width, args.size // width
    x = jnp.asarray(rng.normal(size=(args.batch, size, size, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
    row = {'channels': c, 'size': size, 'kernel': k, 'dilation': d,
           'stride': s, 'auto': depthwise.resolve('auto')}
    for impl in IMPLS:
      row[f'{impl}_ms'] = 1e3 * time_impl(impl, x, kernel, s, d, args.repeats)
    best = min(IMPLS, key=lambda i: row[f'{i}_ms'])
    row['best'] = best
    rows.append(row)
    print(f'C={c:3d} {size:3d}px k={k} d={d} s={s}: '
          + '  '.join(f'{i} {row[f"{i}_ms"]:7.2f} ms' for i in IMPLS)
          + f'  best {best}, auto {row["auto"]}', flush=True)
  auto_ms = sum(r[f'{r["auto"]}_ms'] for r in rows)
  totals = {i: sum(r[f'{i}_ms'] for r in rows) for i in IMPLS}
  print(json.dumps({'rows': rows, 'total_ms': totals, 'auto_total_ms': auto_ms,
                    'batch': args.batch, 'threads': args.threads,
                    **benchlib.machine_info()}, sort_keys=True))


if __name__ == '__main__':
  main()
