"""The paper's methods as data: which phases a mode runs, with which components.

A mode (`config.mode`) is a `ModeSpec`: its search kind and the components
that train beside θ. `ModeSpec.phases` turns it into a sequence of
`PhaseSpec` records, which the loop (`dha_jax.train`) runs in order without
knowing what any component is:

  train            train   (genotype of `model.genotype`, fresh weights)
  one-stage modes  search  (NAS + the mode's components, dense weights)
                   fixed   (the same weights, α of the search fixed: no
                            retraining)
  two-stage modes  search  (NAS alone, b on the held-out batch)
                   train   (the searched genotype from scratch, with the
                            mode's components)

This module is the composition root: the one place outside the component
packages that names them (`build_components`). docs/design.md, 'Phases',
draws the same picture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from dha_jax import hpo
from dha_jax.augment import component as da_component
from dha_jax.components import Component
from dha_jax.nas import component as nas_component
from dha_jax.nas import spaces

SEARCH, FIXED, TRAIN = 'search', 'fixed', 'train'
ONE_STAGE, TWO_STAGE = 'one_stage', 'two_stage'
# Where a phase's architecture comes from.
ARCH_SEARCH = 'search'      # a component supplies α at every step
ARCH_SEARCHED = 'searched'  # fixed α that the search left (one-stage)
ARCH_GENOTYPE = 'genotype'  # α = 1 on a genotype's support


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
  """One phase of a mode.

  Attributes:
    name: SEARCH, FIXED or TRAIN (unique within a mode; checkpoints record
      the phase by name).
    components: names of the components that run in this phase.
    architecture: ARCH_SEARCH, ARCH_SEARCHED or ARCH_GENOTYPE.
    fresh_state: the phase starts from newly initialised weights and
      component states; otherwise it carries on with the previous phase's.
    searching: a search phase: θ's learning rate is constant (as the
      reference), no drop path, it ends after the search budget or once a
      component's `search_done` says so.
    trains_final_weights: its steps train the weights that are deployed, so
      they count towards the run's `num_train_steps` / `num_epochs`.
  """
  name: str
  components: tuple[str, ...]
  architecture: str
  fresh_state: bool
  searching: bool
  trains_final_weights: bool


@dataclasses.dataclass(frozen=True)
class ModeSpec:
  """What a mode runs (docs/fidelity.md, 'Modes').

  Attributes:
    search: None (train `model.genotype`), ONE_STAGE (search with the same
      weights that then train on, α fixed: no retraining) or TWO_STAGE
      (search with b on the held-out batch, then train the genotype from
      scratch).
    components: the components active while θ trains (in one-stage modes,
      during the search too), besides the search's own.
  """
  search: str | None
  components: tuple[str, ...]

  def phases(self) -> tuple[PhaseSpec, ...]:
    """The phases of this mode, in order."""
    if self.search is None:
      return (PhaseSpec(TRAIN, self.components, ARCH_GENOTYPE,
                        fresh_state=True, searching=False,
                        trains_final_weights=True),)
    if self.search == ONE_STAGE:
      return (PhaseSpec(SEARCH, (SEARCHER,) + self.components, ARCH_SEARCH,
                        fresh_state=True, searching=True,
                        trains_final_weights=True),
              PhaseSpec(FIXED, self.components, ARCH_SEARCHED,
                        fresh_state=False, searching=False,
                        trains_final_weights=True))
    return (PhaseSpec(SEARCH, (SEARCHER,), ARCH_SEARCH, fresh_state=True,
                      searching=True, trains_final_weights=False),
            PhaseSpec(TRAIN, self.components, ARCH_GENOTYPE,
                      fresh_state=True, searching=False,
                      trains_final_weights=True))


# The component that searches the architecture.
SEARCHER = 'nas'
MODES = {
    'train': ModeSpec(None, ()),
    'ista_one_stage': ModeSpec(ONE_STAGE, ()),
    'nas_da': ModeSpec(ONE_STAGE, ('da',)),
    'nas_hpo': ModeSpec(ONE_STAGE, ('hpo',)),
    'dha': ModeSpec(ONE_STAGE, ('da', 'hpo')),
    'ista_two_stage': ModeSpec(TWO_STAGE, ()),
    'sequential_nas_da': ModeSpec(TWO_STAGE, ('da',)),
    'sequential_nas_hpo': ModeSpec(TWO_STAGE, ('hpo',)),
    'sequential_dha': ModeSpec(TWO_STAGE, ('da', 'hpo')),
}


class ModeError(ValueError):
  """An unknown mode; the message lists the valid ones."""


def mode_spec(mode: str) -> ModeSpec:
  if mode not in MODES:
    raise ModeError(f'config.mode={mode!r} is not a mode; choose one of '
                    f'{sorted(MODES)}.')
  return MODES[mode]


def search_budget(config: ml_collections.ConfigDict,
                  steps_per_epoch: int) -> int:
  """Steps of a search phase: `nas.search_steps` when positive, else
  `nas.search_epochs` epochs."""
  if config.nas.search_steps > 0:
    return int(config.nas.search_steps)
  return int(config.nas.search_epochs * steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What component factories may need besides the config.

  Attributes:
    search: the mode's search kind (ModeSpec.search).
    param_shapes: θ's shapes in the phase (`jax.eval_shape` structs).
    param_count: maps a NAS support {group: CellSupport} to the parameter
      count of the network built on it (Eq. 1's resource).
    space: the search space of `config.model.space`.
    multiply_adds: maps a NAS support to the multiply-adds per image of the
      network built on it (the other resource Eq. 1 may constrain).
  """
  search: str | None
  param_shapes: Any
  param_count: Callable[[dict], int]
  space: spaces.SearchSpace
  multiply_adds: Callable[[dict], float] | None = None


def _nas(config: ml_collections.ConfigDict, ctx: BuildContext) -> Component:
  nas_config = (nas_component.two_stage_config(config.nas)
                if ctx.search == TWO_STAGE else config.nas)
  return nas_component.make_component(nas_config, ctx.param_count,
                                      space=ctx.space,
                                      multiply_adds_fn=ctx.multiply_adds)


FACTORIES: dict[str, Callable[[ml_collections.ConfigDict, BuildContext],
                              Component]] = {
    SEARCHER: _nas,
    'da': lambda config, ctx: da_component.make_component(config.da),
    'hpo': lambda config, ctx: hpo.make_component(
        config.hpo, ctx.param_shapes,
        annealed=config.optimizer.anneal_learned_lr),
}


def build_components(names: tuple[str, ...],
                     config: ml_collections.ConfigDict,
                     ctx: BuildContext) -> tuple[Component, ...]:
  """The named built-in components, in order."""
  return tuple(FACTORIES[name](config, ctx) for name in names)
