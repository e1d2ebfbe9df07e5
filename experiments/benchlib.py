"""Shared helpers of the benchmarks: timing a configured train step."""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default as default_config
from dha_jax import hpo
from dha_jax import parallel
from dha_jax import step as step_lib
from dha_jax import train
from dha_jax.components import Component, component_key

BENCH_LR = 0.05
BENCH_WD = 3e-4


def time_train_step(config: ml_collections.ConfigDict, model: Any,
                    variables: dict, components: Sequence[Component],
                    fixed_arch: Any, batch: tuple[np.ndarray, np.ndarray],
                    steps: int) -> dict[str, float]:
  """Compile seconds and the best of `steps` step seconds, on one device."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = hpo.optimizer_from_config(config)
  pre = step_lib.Preprocess.from_config(config, (0.5,) * 3, (0.25,) * 3)
  fn = step_lib.make_train_step(
      mesh, model=model, tx=tx, components=tuple(components),
      fixed_arch=fixed_arch, pre=pre, aux_weight=config.model.aux_weight,
      default_hparams=lambda s: {'learning_rate': jnp.float32(BENCH_LR),
                                 'weight_decay': jnp.float32(BENCH_WD)},
      drop_path_rate=lambda s: jnp.float32(0.0))
  variables = jax.device_get(variables)  # the step donates its own copy
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']),
      components={c.name: c.init(component_key(jax.random.key(2), c.name))
                  for c in components},
      rng=jax.random.key_data(jax.random.key(1)))
  batch = parallel.shard_batch(mesh, batch)
  return _time_step(fn, parallel.replicate(mesh, state), batch, batch, steps)


def _time_step(fn: Any, state: Any, batch: Any, heldout: Any,
               steps: int) -> dict[str, float]:
  """Compile seconds of the jitted step `fn` and its best of `steps`."""
  start = time.perf_counter()
  compiled = fn.lower(state, batch, heldout).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, heldout)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {'compile_s': compile_s, 'step_s': float(np.min(times))}


def parse_args(doc: str, **extra: Any) -> argparse.Namespace:
  """The network and batch options every benchmark takes, plus `extra`
  ({option name: default}; '--name' flags with the default's type)."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  defaults = {'channels': 8, 'layers': 5, 'batch': 16, 'size': 32, 'steps': 5,
              **extra}
  for name, default in defaults.items():
    parser.add_argument(f'--{name.replace("_", "-")}', type=type(default),
                        default=default)
  return parser.parse_args()


def bench_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """configs/default.py at the benchmark's network and batch size."""
  config = default_config.get_config()
  config.model.channels = args.channels
  config.model.layers = args.layers
  config.model.auxiliary = False
  config.dataset.image_size = args.size
  config.batch_size = args.batch
  return config


def network_info(args: argparse.Namespace) -> dict[str, Any]:
  return {'channels': args.channels, 'layers': args.layers,
          'batch': args.batch, 'size': args.size, **machine_info()}


def random_batch(batch: int, size: int, classes: int = 10,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
          rng.integers(0, classes, (batch,)).astype(np.int32))


def machine_info() -> dict[str, Any]:
  """Where the figures come from (report them with the numbers)."""
  return {'backend': jax.default_backend(), 'devices': jax.device_count(),
          'device_kind': jax.devices()[0].device_kind,
          'cpu_count': os.cpu_count(),
          'machine': platform.processor() or platform.machine(),
          'jax': jax.__version__}


def time_search_step(mode: str, args: argparse.Namespace,
                     hpo_mode: str = 'exact', hpo_batch: int = 0
                     ) -> dict[str, float]:
  """Compile and best step seconds of `mode`'s search-phase train step.

  The held-out (HPO) batch has `hpo_batch` examples (0: `args.batch`).
  'support' is the child network's initial support (equal across modes,
  whose NAS codes start from the same key).
  """
  config = bench_config(args)
  config.mode = mode
  config.hpo.mode = hpo_mode
  config.heldout_batch_size = hpo_batch
  config.nas.max_iters = 2000
  run = train.Run.create(config, workdir='')
  run.mesh = parallel.make_mesh(jax.devices()[:1])
  phase, state = train.first_phase(run)
  fn = train.make_step(run, phase)
  batch = parallel.shard_batch(run.mesh,
                               random_batch(args.batch, args.size))
  heldout = parallel.shard_batch(run.mesh, random_batch(
      run.heldout_batch_size, args.size, seed=1))
  support = state.components['nas'].ista.support
  timing = _time_step(fn, parallel.replicate(run.mesh, state), batch, heldout,
                      args.steps)
  return {**timing, 'support': support}
