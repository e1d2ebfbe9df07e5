"""The tiny run configuration shared by the end-to-end tests, a reader of
the run's TensorBoard events, and the check that two implementations of a
network compute one function."""

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ml_collections
from tensorboard.backend.event_processing import event_accumulator

from configs import default as default_config

# Compiles in seconds on a CPU: 8-pixel digits, 2 cells of width 4.
TINY = {
    'dataset.image_size': 8, 'dataset.max_train_examples': 40,
    'dataset.max_test_examples': 16, 'dataset.val_ratio': 0.25,
    'model.channels': 4, 'model.layers': 2, 'batch_size': 8,
    'eval_batch_size': 16, 'num_train_steps': 4, 'log_every_steps': 2,
    'checkpoint_every_steps': 2, 'nas.search_epochs': 1,
    'nas.max_iters': 2000, 'compilation_cache_dir': '',
    # One XLA op per depthwise conv: the tests compile with most
    # optimisations off (conftest.py), where CPU's 'shifted' form is k²
    # unfused slices, slower to compile and to run. depthwise_test.py holds
    # every implementation equal, in the network too.
    'model.depthwise': 'grouped',
    # Likewise XLA's reduce-window for the pools (pooling_test.py holds the
    # 'shifted' form equal to it).
    'model.pooling': 'reduce_window',
}

# The tiny MobileNet-space network (add to TINY): 4 searchable layers of
# width 8 and 16, a 16-wide head, codes of length 4 for 6-7 candidates.
MOBILENET = {
    'model.space': 'mobilenet', 'model.stage_layers': (2, 2, 0, 0, 0, 0),
    'model.width_multiplier': 0.25, 'model.head_channels': 16,
    'nas.proj_dims': 4, 'nas.alpha_norm': 'group_mean_abs',
}


def tiny_config(mode: str, overrides: dict[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """configs/default.py with `TINY` and then `overrides` (dotted keys)."""
  config = default_config.get_config()
  config.mode = mode
  for key, value in {**TINY, **(overrides or {})}.items():
    *path, leaf = key.split('.')
    target = config
    for part in path:
      target = target[part]
    target[leaf] = value
  return config


def cli_flags(overrides: dict[str, Any] | None = None) -> list[str]:
  """The same settings as `--config.key=value` flags."""
  return [f'--config.{k}={v}' for k, v in {**TINY, **(overrides or {})}.items()]


def assert_same_network_function(model: Any, reference: Any, variables: dict,
                                 x: Any, arch: Any, rtol: float, atol: float
                                 ) -> None:
  """`model` and `reference` (two implementations of one network) give the
  same evaluation-mode logits and the same gradient of Σ logits² in the
  parameters; the gradients to 10x the tolerances."""
  def logits_and_grads(net):
    def loss(params):
      logits, _ = net.apply({**variables, 'params': params}, x, arch,
                            train=False)
      return jnp.sum(logits ** 2), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params'])
    return logits, grads
  logits, grads = logits_and_grads(model)
  ref_logits, ref_grads = logits_and_grads(reference)
  np.testing.assert_allclose(logits, ref_logits, rtol=rtol, atol=atol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=10 * rtol, atol=10 * atol), grads, ref_grads)


def read_tensorboard(workdir: str
                     ) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
  """({tag: [(step, value), ...]}, image tags) of workdir/tensorboard, as
  TensorBoard itself reads them (events of purged steps dropped)."""
  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, 'tensorboard'),
      size_guidance={event_accumulator.SCALARS: 0,
                     event_accumulator.IMAGES: 0})
  events.Reload()
  tags = events.Tags()
  scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
             for tag in tags['scalars']}
  return scalars, tags['images']
