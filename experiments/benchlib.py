"""Shared helpers of the benchmarks: timing a configured train step."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default as default_config
from dha_jax import host_memory
from dha_jax import hpo
from dha_jax import parallel
from dha_jax import step as step_lib
from dha_jax import train
from dha_jax.components import Component, component_key
from dha_jax.nas import depthwise
from dha_jax.nas import pooling
from dha_jax.nas import search_space
from dha_jax.nas import spaces

# One XLA:CPU thread (`--threads 1`): Eigen's pool off (the process is also
# pinned to one CPU, see `parse_args`).
SINGLE_THREAD_XLA = '--xla_cpu_multi_thread_eigen=false'

BENCH_LR = 0.05
BENCH_WD = 3e-4

# The network, batch and length options of the benchmarks that time a train
# step (`bench_config`, `network_info`), with their defaults; a benchmark
# that times something else offers only those it reads (`parse_args`).
STEP_OPTIONS = {'channels': 8, 'layers': 5, 'batch': 16, 'size': 32,
                'steps': 5, 'aux': 0, 'cutout': 0, 'genotype': '',
                'depthwise': 'auto', 'pooling': 'auto',
                'space': 'darts_cell', 'width_multiplier': 1.0}
# How the process runs; every benchmark offers them.
MACHINE_OPTIONS = {'threads': 'all', 'retain_host_memory': 1}


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
      drop_path_rate=None)
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
  """Compile seconds of the jitted step `fn`, its best and its median of
  `steps` (this machine's step times vary by ±20 % from run to run)."""
  start = time.perf_counter()
  compiled = fn.lower(state, batch, heldout).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, heldout)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {'compile_s': compile_s, 'step_s': float(np.min(times)),
          'step_median_s': float(np.median(times))}


def parse_args(doc: str, *, options: Sequence[str] = tuple(STEP_OPTIONS),
               argv: Sequence[str] | None = None,
               **extra: Any) -> argparse.Namespace:
  """The benchmark's options: `options` (names of `STEP_OPTIONS`, all of
  them by default), `MACHINE_OPTIONS`, and `extra` ({option name: default};
  '--name' flags with the default's type, overriding a default above).

  `--threads 1` runs XLA:CPU on one thread and pins the process to one CPU
  (without the pin, XLA still ran independent ops on a second core: the
  process used 1.6 CPU-seconds per second of a '1-thread' step);
  `--retain-host-memory 1` (the benchmarks' default; `dha_jax.main`'s
  `--retain_host_memory` is off by default) keeps freed host memory in the
  process (`dha_jax.host_memory`). Both must happen before JAX starts its
  backend, which is why the benchmarks call this first.

  Args:
    doc: the benchmark's docstring (its first line is the description).
    options: the `STEP_OPTIONS` the benchmark reads.
    argv: the arguments (None: the command line's).
    **extra: the benchmark's own options and their defaults.
  """
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  unknown = sorted(set(options) - set(STEP_OPTIONS))
  if unknown:
    raise ValueError(f'parse_args: options {unknown} are not in '
                     f'STEP_OPTIONS {sorted(STEP_OPTIONS)}')
  defaults = {**{name: STEP_OPTIONS[name] for name in options},
              **MACHINE_OPTIONS, **extra}
  helps = {
      'aux': '1: the auxiliary head (weight 0.4), as DARTS on CIFAR',
      'cutout': 'side of the Cutout square on training images (0: none)',
      'genotype': "the child network: a built-in genotype of --space or a "
                  "genotype.json; '': a search step's initial support, and "
                  "the space's built-in genotype (DARTS-V2, ProxylessNAS-"
                  "mobile) where a fixed network is timed",
      'depthwise': 'model.depthwise: ' + ', '.join(
          depthwise.IMPLEMENTATIONS),
      'pooling': 'model.pooling: ' + ', '.join(pooling.IMPLEMENTATIONS),
      'space': "model.space: 'darts_cell' (channels, layers) or 'mobilenet' "
               "(ProxylessNAS' 21 layers at width-multiplier)",
      'threads': "XLA:CPU threads: 'all' or '1' (one thread, pinned to one "
                 "CPU)",
      'retain_host_memory': '1 (default): keep freed host memory in the '
                            'process (dha_jax.host_memory), what '
                            "dha_jax.main's --retain_host_memory turns on (it "
                            "is off there by default); 0: glibc's defaults"}
  for name, default in defaults.items():
    parser.add_argument(f'--{name.replace("_", "-")}', type=type(default),
                        default=default, help=helps.get(name))
  args = parser.parse_args(argv)
  if args.threads not in ('all', '1'):
    parser.error("--threads is 'all' or '1'")
  if args.threads == '1':
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                               + SINGLE_THREAD_XLA).strip()
    if hasattr(os, 'sched_setaffinity'):   # Linux; elsewhere unpinned
      os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  if args.retain_host_memory:
    host_memory.retain_freed_memory()
  return args


def bench_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """configs/default.py at the benchmark's network and batch size."""
  config = default_config.get_config()
  config.model.channels = args.channels
  config.model.layers = args.layers
  config.model.auxiliary = bool(args.aux)
  config.model.depthwise = args.depthwise
  config.model.pooling = args.pooling
  config.preprocess.cutout_size = args.cutout
  config.dataset.image_size = args.size
  config.batch_size = args.batch
  config.model.space = args.space
  config.model.width_multiplier = args.width_multiplier
  if args.space == spaces.MOBILENET:
    config.model.genotype = 'proxyless_mobile'
    config.nas.alpha_norm = 'group_mean_abs'
  if args.genotype:
    config.model.genotype = args.genotype
  return config


def genotype_support(config: ml_collections.ConfigDict,
                     space: spaces.SearchSpace) -> dict:
  """The support of `config.model.genotype` in `space` (`--genotype`, else
  the space's built-in: DARTS-V2's cells or ProxylessNAS-mobile's
  layers)."""
  return space.genotype_to_support(
      train.load_genotype(config.model.genotype, space))


def network_info(args: argparse.Namespace) -> dict[str, Any]:
  return {'channels': args.channels, 'layers': args.layers,
          'batch': args.batch, 'size': args.size, 'aux': args.aux,
          'cutout': args.cutout, 'genotype': args.genotype,
          'space': args.space, 'width_multiplier': args.width_multiplier,
          'depthwise': args.depthwise, 'pooling': args.pooling,
          'threads': args.threads,
          'retain_host_memory': args.retain_host_memory,
          **machine_info()}


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


@dataclasses.dataclass
class StepSetup:
  """A mode's jitted first-phase train step with its inputs, on one
  device. `support`: the child network's support (equal across modes)."""
  fn: Any
  state: Any
  batch: Any
  heldout: Any
  support: Any


def search_step_setup(mode: str, args: argparse.Namespace,
                      hpo_mode: str = 'exact', hpo_batch: int = 0
                      ) -> StepSetup:
  """`mode`'s first-phase train step (the search phase of a search mode,
  the fixed-genotype step of 'train').

  The held-out (HPO) batch has `hpo_batch` examples (0: `args.batch`).
  With `args.genotype` set, a search's child network runs on that
  genotype's pairs instead of its initial support (α by Eq. 7 on them), so
  that a search step and a fixed-architecture step can be timed on the
  same ops; 'train' trains that genotype (DARTS-V2 by default).
  """
  config = bench_config(args)
  config.mode = mode
  config.hpo.mode = hpo_mode
  config.heldout_batch_size = hpo_batch
  config.nas.max_iters = 2000
  run = train.Run.create(config, workdir='')
  run.mesh = parallel.make_mesh(jax.devices()[:1])
  phase, state = train.first_phase(run)
  support = search_space.support_items(genotype_support(config, run.space))
  nas = state.components.get('nas')
  if nas is not None and args.genotype:
    nas = nas.replace(ista=nas.ista.replace(support=support))
    state = state.replace(components={**state.components, 'nas': nas})
  elif nas is not None:
    support = nas.ista.support
  batch = parallel.shard_batch(run.mesh,
                               random_batch(args.batch, args.size))
  heldout = parallel.shard_batch(run.mesh, random_batch(
      run.heldout_batch_size, args.size, seed=1))
  return StepSetup(fn=train.make_step(run, phase),
                   state=parallel.replicate(run.mesh, state), batch=batch,
                   heldout=heldout, support=support)


def time_search_step(mode: str, args: argparse.Namespace,
                     hpo_mode: str = 'exact', hpo_batch: int = 0
                     ) -> dict[str, float]:
  """Compile and best step seconds of `mode`'s first-phase train step
  (`search_step_setup`), and its 'support'."""
  setup = search_step_setup(mode, args, hpo_mode, hpo_batch)
  timing = _time_step(setup.fn, setup.state, setup.batch, setup.heldout,
                      args.steps)
  return {**timing, 'support': setup.support}
