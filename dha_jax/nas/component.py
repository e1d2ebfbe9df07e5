"""NAS as a component: one-stage ISTA-NAS inside the train step.

Per step the network runs the sparse child on α = Eq. 7 of the codes b
(`ista.architecture_from_codes`), and b moves by Adam (betas 0.5, 0.999, L2
weight decay, as the reference) on either

* the training loss, one-level, from the same backward pass as θ
  (`code_loss='train'`: one-stage ISTA-NAS and DHA), or
* the held-out HPO batch (`code_loss='heldout'`: the two-stage ISTA search,
  first-order alternating, docs/fidelity.md, 'NAS').

Frozen nodes keep their b exactly (their Adam updates are zeroed). Per epoch
(`epoch_end`, host side) x̂ is recovered by FISTA, nodes freeze and the
resource constraint is checked (Eq. 1) on the parameter count of the network
the candidate support would give; a new support retraces the jitted step once.
The epoch's report says how far the search moved: pairs of the support that
changed since the last epoch and since the start, and b's relative movement.
The search space (`spaces.SearchSpace`: DARTS cells or the MobileNet layers)
gives the nodes, the support rule and the genotypes; nothing here depends on
which it is.

The reference's dynamics (`default_config`) suit its 600-epoch runs; a short
run needs scale-free ones (configs/default.py, docs/fidelity.md, 'NAS'):
α normalised per node (`alpha_norm='mean_abs'`) so that b can keep the
reference's scale, and a relative freezing rule that waits for
`min_freeze_steps` steps of b.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dha_jax import plots
from dha_jax.components import Component, StepContext
from dha_jax.nas import ista
from dha_jax.nas import search_space
from dha_jax.nas import spaces

PARAMS_PER_MB = 1e6  # the reference's "param size in MB" is 1e6 parameters
MILLION = 1e6
CODE_LOSSES = ('train', 'heldout')
# Curves of architecture.png, from the per-epoch reports, followed by α's
# norm per group (`alpha_norm_<group>`).
PLOTTED_REPORT_KEYS = ('pairs_changed', 'pairs_changed_from_start',
                       'code_relative_move', 'frozen_nodes')


@flax.struct.dataclass
class NASState:
  """The search state.

  Attributes:
    ista: the ISTA-NAS codes and problems.
    opt_state: b's Adam state.
    steps: how many updates b has had (int32 scalar).
    x_init: x̂ of the initial codes (the initial support), for reports.
    b_prev: b at the previous `epoch_end`, for reports.
  """
  ista: ista.IstaState
  opt_state: Any
  steps: jax.Array
  x_init: dict[str, ista.PerNode]
  b_prev: dict[str, ista.PerNode]


def default_config() -> ml_collections.ConfigDict:
  """The NAS fields (documented; `config.nas` in the run configs)."""
  c = ml_collections.ConfigDict()
  # Adam on b: learning rate, L2 weight decay, betas (ISTA-NAS one-stage).
  c.code_lr = 3e-4
  c.code_weight_decay = 1e-3
  c.code_betas = (0.5, 0.999)
  # m, the length of each node's code b_i (ISTA-NAS proj_dims). A DARTS
  # node has 14-35 candidates; a MobileNet layer only 6-7, so the MobileNet
  # configs use 4 (m < n: a compressed code).
  c.proj_dims = ista.DEFAULT_PROJ_DIMS
  # Scale of b's N(0, 1) initialisation (the reference's 1e-3).
  c.code_init_scale = ista.DEFAULT_B_INIT_SCALE
  # α for the forward pass: 'none' (Eq. 7, the reference: α scales with b),
  # 'mean_abs' (α / mean|α| per node: the network's output does not depend
  # on b's scale; a deviation for short runs) or 'group_mean_abs' (α / mean|α|
  # over each group's nodes: the same, for nodes of one op, such as the
  # MobileNet layers, where 'mean_abs' would leave b without a gradient).
  c.alpha_norm = 'none'
  # A node freezes when its recovered x̂ moved by at most dist_limit in an
  # epoch: in L2 ('absolute', the reference) or relative to ‖x̂‖
  # ('relative': independent of b's scale). The search ends when every node
  # is frozen.
  c.freeze_rule = 'absolute'
  c.dist_limit = ista.DEFAULT_DIST_LIMIT
  # No node freezes before b has had this many updates (0: from the end of
  # the first epoch on, as the reference).
  c.min_freeze_steps = 0
  # Eq. 1: refuse a support whose network exceeds this many million
  # parameters (-1: no constraint).
  c.param_limit_mb = -1.0
  # ... or this many million multiply-adds per image at inference (the
  # "FLOPs" of the MobileNet papers; -1: no constraint).
  c.multiply_adds_limit_m = -1.0
  # Adds `none` to the 7 ISTA-NAS ops (never selected into the support;
  # DARTS cell space only).
  c.include_none = False
  # MobileNet space: ops each layer keeps in the support (ISTA's sparsity;
  # 1: one op per layer, as ProxylessNAS).
  c.ops_per_layer = 1
  # Search budget in epochs, unless search_steps is positive, which then
  # wins (for data sets whose epochs are a few steps); the
  # fixed-architecture phase follows.
  c.search_epochs = 10
  c.search_steps = -1
  # Which loss trains b: 'train' (one-level, one-stage) or 'heldout'.
  c.code_loss = 'train'
  # FISTA iterations cap for each per-epoch recovery.
  c.max_iters = ista.DEFAULT_MAX_ITERS
  return c


def ista_config(config: ml_collections.ConfigDict,
                space: spaces.SearchSpace) -> ista.IstaConfig:
  """The ISTA-NAS settings of the NAS config over `space`'s nodes."""
  return ista.IstaConfig(
      ops=space.ops, layout=space.layout, proj_dims=config.proj_dims,
      b_init_scale=config.code_init_scale, max_iters=config.max_iters,
      k_edges=space.k_edges, ops_per_edge=space.ops_per_edge,
      excluded_ops=space.excluded_ops, alpha_norm=config.alpha_norm)


def two_stage_config(config: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """The two-stage ISTA search: b learns on the held-out batch and nodes
  never freeze (the search runs its whole budget)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.code_loss = 'heldout'
  config.dist_limit = -1.0
  return config


def code_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (torch's Adam)."""
  b1, b2 = config.code_betas
  return optax.chain(optax.add_decayed_weights(config.code_weight_decay),
                     optax.scale_by_adam(b1=b1, b2=b2),
                     optax.scale(-config.code_lr))


def make_component(config: ml_collections.ConfigDict,
                   param_count_fn: Callable[[dict], int] | None = None,
                   name: str = 'nas',
                   space: spaces.SearchSpace | None = None,
                   multiply_adds_fn: Callable[[dict], float] | None = None
                   ) -> Component:
  """One-stage ISTA-NAS as a `Component`.

  Args:
    config: the NAS config (`default_config`).
    param_count_fn: maps a support {group: CellSupport} to the parameter
      count of the network built on it (Eq. 1's resource); needed when
      `config.param_limit_mb > 0`.
    name: component name (metrics prefix).
    space: the search space; None: the DARTS cells (with
      `config.include_none`).
    multiply_adds_fn: maps a support to the multiply-adds per image of its
      network; needed when `config.multiply_adds_limit_m > 0`.
  """
  if config.code_loss not in CODE_LOSSES:
    raise ValueError(f'nas.code_loss must be one of {CODE_LOSSES}, got '
                     f'{config.code_loss!r}')
  if config.freeze_rule not in ista.FREEZE_RULES:
    raise ValueError(f'nas.freeze_rule must be one of {ista.FREEZE_RULES}, '
                     f'got {config.freeze_rule!r}')
  budgets = {}
  for field, resource, fn, unit in (
      ('param_limit_mb', 'params_mb', param_count_fn, PARAMS_PER_MB),
      ('multiply_adds_limit_m', 'multiply_adds_m', multiply_adds_fn,
       MILLION)):
    if config[field] > 0:
      if fn is None:
        raise ValueError(f'nas.{field} needs the function that measures it')
      budgets[resource] = ista.Budget(
          measure=lambda support, fn=fn, unit=unit: fn(support) / unit,
          limit=config[field])
  tx = code_optimizer(config)
  if space is None:
    space = spaces.cell_space(config.include_none)
  icfg = ista_config(config, space)
  plotted = PLOTTED_REPORT_KEYS + tuple(f'alpha_norm_{group}'
                                        for group, _ in space.layout)

  def init(key: jax.Array) -> NASState:
    state = ista.init_ista(key, icfg)
    # Copies: the step donates the state, and a buffer may be donated once.
    return NASState(ista=state, opt_state=tx.init(state.b),
                    steps=jnp.zeros((), jnp.int32),
                    x_init=jax.tree.map(jnp.copy, state.x),
                    b_prev=jax.tree.map(jnp.copy, state.b))

  def update(state: NASState, ctx: StepContext):
    grads = ctx.grads
    if config.code_loss == 'heldout':
      grads = jax.grad(lambda b: ctx.heldout_loss(ctx.params, {name: b}))(
          state.ista.b)
    updates, opt_state = tx.update(grads, state.opt_state, state.ista.b)
    updates = ista.zero_frozen(state.ista, updates)
    new_b = optax.apply_updates(state.ista.b, updates)
    return (state.replace(ista=state.ista.replace(b=new_b),
                          opt_state=opt_state, steps=state.steps + 1),
            {'code_grad_norm': optax.tree.norm(grads)})

  def epoch_end(state: NASState, epoch: int):
    new_ista, report = ista.recover(
        state.ista, epoch=epoch, dist_limit=config.dist_limit,
        freeze_rule=config.freeze_rule,
        may_freeze=int(state.steps) >= config.min_freeze_steps,
        budgets=budgets)
    support = new_ista.support_dict
    report['pairs_changed'] = search_space.changed_pairs(
        state.ista.support_dict, support)
    report['pairs_changed_from_start'] = search_space.changed_pairs(
        ista.support_from_codes(state.x_init, icfg), support)
    report['code_relative_move'] = float(
        optax.tree.norm(jax.tree.map(np.subtract, new_ista.b, state.b_prev)) /
        optax.tree.norm(state.b_prev))
    report['code_steps'] = int(state.steps)
    arch = ista.architecture_from_codes(new_ista, new_ista.b)
    for cell, alphas in arch.weights.items():
      report[f'alpha_norm_{cell}'] = float(np.sqrt(sum(
          np.sum(np.square(a)) for a in alphas)))
    report['frozen_nodes'] = int(sum(sum(f) for f in report['frozen'].values()))
    report['candidate_support'] = json.loads(space.support_to_genotype(
        report['candidate_support']).to_json())
    return (state.replace(ista=new_ista,
                          b_prev=jax.tree.map(np.array, new_ista.b)),
            report)

  def export(state: NASState | None, reports: list[dict]) -> dict[str, Any]:
    del state  # the searched genotype is the run's, written by the loop
    curves = [{**r, 'support_changed': float(r['support_changed'])}
              for r in reports]
    return {'architecture.png': plots.series_figure(
        curves, plotted, 'architecture search (per epoch)')}

  return Component(
      name=name, init=init, trainable=lambda s: s.ista.b,
      architecture=lambda s, b: ista.architecture_from_codes(s.ista, b),
      update=update, epoch_end=epoch_end,
      uses_heldout=config.code_loss == 'heldout',
      search_done=lambda s: ista.all_frozen(s.ista),
      fixed_architecture=final_architecture,
      restore=lambda s: s.replace(ista=ista.sync_support(s.ista)),
      export=export, summary=summary)


def summary(state: NASState, reports: list[dict]) -> str:
  """One line on how far the search moved (for the run log)."""
  pairs = sum(len(node) for cell in state.ista.support_dict.values()
              for node in cell)
  changes = sum(bool(r['support_changed']) for r in reports)
  moved = reports[-1]['pairs_changed_from_start'] if reports else 0
  frozen = reports[-1]['frozen_nodes'] if reports else 0
  return (f'support changed {changes} times in {len(reports)} epochs, '
          f'{moved} of {pairs} pairs differ from the start, {frozen} nodes '
          'frozen')


def final_architecture(state: NASState) -> search_space.Architecture:
  """The architecture handed to the fixed phase: α of the current b, fixed."""
  arch = ista.architecture_from_codes(state.ista, state.ista.b)
  return jax.tree.map(np.asarray, arch)
