"""The functional component API: how DA, HPO and NAS plug into one step.

A component is a handful of pure functions over its own PyTree state. The
train step (`dha_jax.step`) is composed from a list of components and knows
them only through these functions; no component knows another. Every hook is
optional:

* `init(key) -> state`.
* `augment(state, key, images) -> (images, stash)`: transforms the uint8
  training batch before normalisation (DA samples op pairs here); `stash` is
  handed back to `update`.
* `trainable(state) -> tree`: the part of the state differentiated together
  with θ through the training loss (NAS: the codes b).
* `architecture(state, trainable) -> Architecture`: the network's
  architecture for this step (NAS; at most one component supplies it).
* `loss(state, trainable, logits, labels) -> per-example loss [B] | None`: a
  replacement for the per-example cross-entropy (e.g. a learned label
  smoothing); at most one component supplies it.
* `hyperparams(state) -> {'learning_rate', 'weight_decay'}`: the η injected
  into the inner optax optimizer (HPO; otherwise the config's schedule).
* `update(state, ctx: StepContext) -> (state, metrics)`: learns from the
  step's quantities after the forward/backward pass.
* `epoch_end(state, epoch) -> (state, report)`: host-side, between steps, on
  the slower clock (NAS: ISTA recovery, freezing, constraints); the report
  (JSON-friendly) is logged as a `<name>_epoch` record of metrics.jsonl.

What the training loop needs to run the phases of a search, the component
declares (so the loop names no component):

* `uses_heldout`: `update` calls `ctx.heldout_loss`; the loop then draws the
  held-out batch from the HPO split (otherwise it is never read).
* `search_done(state) -> bool`: host side, after `epoch_end`; True ends the
  search phase early (NAS: every node frozen).
* `fixed_architecture(state) -> Architecture`: the architecture that the
  phase after the search trains with α fixed (the owner of `architecture`).
* `restore(state) -> state`: host side, after a checkpoint was restored
  into a template state; refreshes static metadata (NAS: the support).
* `export(state, reports) -> {file name: object}`: host side, at the end of
  the run; `reports` are this component's `epoch_end` reports and `state`
  its final state, or None when the run's final state no longer holds it
  (a search followed by training from scratch). A `.json`
  name maps to a JSON object, a `.png` name to a matplotlib figure; the loop
  writes them into the workdir (DA: policy.json, policy.png).
* `replaces`: {config field: what sets it instead}, the config fields this
  component makes ineffective (HPO: θ's learning rate and weight decay);
  the command line warns when one of them is set.
* `summary(state, reports) -> str`: host side, when the search phase ends;
  one line on what the component learned in it (NAS: how often the support
  changed; DA: τ's entropy; HPO: η), which the loop logs.

The step calls the `update` hooks with the state from before the step, so
their results do not depend on the order of the components; `augment` hooks
run in list order.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, NamedTuple

import jax

PyTree = Any


class StepContext(NamedTuple):
  """What one train step hands to every component's `update`.

  Attributes:
    step: the step counter (int32 scalar) before this step.
    key: a PRNG key for this component and step.
    per_example_loss: ℓ_k [B], detached (Eq. 2 uses it as a weight).
    grads: ∂ mean ℓ / ∂ trainable(state) for this component (None if none).
    stash: what this component's `augment` returned (None if none).
    params: θ before the update; param_grads: ∂ mean ℓ / ∂θ (clipping is
      part of the optimizer).
    inner_update: hparams -> θ⁺, the real optax step of θ as a function of
      η (Eq. 3), for hypergradients.
    heldout_loss: (θ, overrides=None) -> mean loss on the un-augmented HPO
      batch (Eq. 4); `overrides` {component name: trainable} replaces
      components' trainable parts (to differentiate w.r.t. them).
  """
  step: jax.Array
  key: jax.Array
  per_example_loss: jax.Array
  grads: PyTree
  stash: PyTree
  params: PyTree
  param_grads: PyTree
  inner_update: Callable[[dict], PyTree]
  heldout_loss: Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Component:
  """A named bundle of pure functions (see the module docstring)."""
  name: str
  init: Callable[[jax.Array], PyTree]
  augment: Callable[..., tuple[jax.Array, PyTree]] | None = None
  trainable: Callable[[PyTree], PyTree] | None = None
  architecture: Callable[[PyTree, PyTree], Any] | None = None
  loss: Callable[..., jax.Array] | None = None
  hyperparams: Callable[[PyTree], dict] | None = None
  update: Callable[[PyTree, StepContext], tuple[PyTree, dict]] | None = None
  epoch_end: Callable[[PyTree, int], tuple[PyTree, dict]] | None = None
  uses_heldout: bool = False
  search_done: Callable[[PyTree], bool] | None = None
  fixed_architecture: Callable[[PyTree], Any] | None = None
  restore: Callable[[PyTree], PyTree] | None = None
  export: Callable[[PyTree, list[dict]], dict[str, Any]] | None = None
  summary: Callable[[PyTree, list[dict]], str] | None = None
  replaces: dict[str, str] = dataclasses.field(default_factory=dict)


def component_key(key: jax.Array, name: str) -> jax.Array:
  """`key` folded with a hash of the component's name.

  A component's random numbers (its init, its draws in each step) then
  depend on its name alone, not on which other components run beside it:
  `ista_one_stage`, `nas_da` and `dha` start from the same codes b, hence
  the same support, and `nas_da` and `dha` draw the same op pairs.
  """
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7fffffff)


def check_components(components: list[Component]) -> None:
  """Raises ValueError on duplicate names or two owners of a single slot."""
  names = [c.name for c in components]
  if len(set(names)) != len(names):
    raise ValueError(f'component names must be unique, got {names}')
  for slot in ('architecture', 'loss', 'hyperparams', 'fixed_architecture'):
    owners = [c.name for c in components if getattr(c, slot) is not None]
    if len(owners) > 1:
      raise ValueError(f'only one component may supply {slot!r}; '
                       f'{owners} all do')
