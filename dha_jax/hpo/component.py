"""HPO as a `dha_jax.components.Component` for the train step.

The step injects `hyperparams(state)` into θ's update and then calls
`update(state, ctx)`, which runs `hpo_update` (as `hpo_step` does) through
the step's own update (`ctx.inner_update`, `inner_step` with the step's θ,
gradients and optimizer state), with `ctx.heldout_loss` (exact mode) or
`ctx.param_grads` (online mode). Per epoch (`epoch_end`) it reports η.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dha_jax.components import Component, StepContext
from dha_jax.hpo import hypergradient as hg

PyTree = Any
# θ's optimizer fields that η overrides, and the fields that set η instead.
REPLACED_FIELDS = {
    'optimizer.learning_rate': 'hpo.init_lr and hpo.lr_bounds',
    'optimizer.min_learning_rate': 'hpo.lr_bounds',
    'optimizer.schedule': 'the learned η (hpo.*)',
    'optimizer.weight_decay': 'hpo.init_wd and hpo.wd_bounds',
}
# The fields that still shape θ's learning rate when η is annealed by them.
ANNEALED_FIELDS = ('optimizer.schedule', 'optimizer.min_learning_rate')


def make_component(config: ml_collections.ConfigDict, params: PyTree,
                   name: str = 'hpo', annealed: bool = False) -> Component:
  """The HPO component.

  Args:
    config: the HPO config (`default_config`).
    params: θ or its `jax.eval_shape` (online mode: the tangents' shapes).
    name: the component's name (metrics are prefixed with it).
    annealed: whether the loop scales η's learning rate by the schedule
      (`optimizer.anneal_learned_lr`); then the schedule is not replaced.

  Returns:
    The Component; it reads the held-out batch in exact mode.
  """
  hg.check_config(config)

  def update(state: hg.HPOState, ctx: StepContext):
    _, _, state, metrics, _ = hg.hpo_update(
        lambda hp: (ctx.inner_update(hp), None), state, config,
        grads=ctx.param_grads,
        loss_fn=lambda p: (ctx.heldout_loss(p), None))
    return state, metrics

  def epoch_end(state: hg.HPOState, epoch: int):
    hparams = hg.current_hparams(state, config)
    return state, {'epoch': epoch,
                   **{k: float(v) for k, v in hparams.items()}}

  def summary(state: hg.HPOState, reports: list[dict]) -> str:
    del reports
    now = {k: float(v) for k, v in hg.current_hparams(state, config).items()}
    start = {k: float(v) for k, v in hg.initial_hparams(config).items()}
    return ', '.join(f'{k} {start[k]:.4g} -> {now[k]:.4g}' for k in now)

  return Component(
      name=name, init=lambda key: hg.init_hpo(config, params),
      hyperparams=lambda state: hg.current_hparams(state, config),
      update=update, epoch_end=epoch_end,
      uses_heldout=config.mode == 'exact', summary=summary,
      replaces={k: v for k, v in REPLACED_FIELDS.items()
                if not (annealed and k in ANNEALED_FIELDS)})
