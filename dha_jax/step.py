"""The single jitted, data-parallel train step, composed from components.

Within one step, in the order of Algorithm 1 (docs/design.md, 'Data flow'):

  1. base geometry on the uint8 batch (crop, flip);
  2. component `augment` hooks (DA: sample op pairs from τ, apply them);
  3. normalise, Cutout;
  4. forward the network on the architecture a component supplies (NAS:
     α projected from b, Eq. 7) or on the fixed genotype, per-example loss
     ℓ = CE(main) + aux_weight · CE(aux);
  5. gradients of mean ℓ w.r.t. θ and every component's trainable part;
  6. θ⁺ = one optax step with η from the HPO component or the schedule (Eq. 3);
  7. every component's `update` (DA: Eq. 2; NAS: Adam on b; HPO: Eq. 4).

The step is a pure function `(state, batch, hpo_batch) -> (state, metrics)`;
`make_train_step` jits it over a 1-D mesh with the batch sharded and the
state replicated and donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dha_jax import flat_tree
from dha_jax import parallel
from dha_jax.augment import base as augment_base
from dha_jax.hpo import inner as hpo_inner
from dha_jax.components import (Component, StepContext, check_components,
                                component_key)
from dha_jax.nas.search_space import Architecture

PyTree = Any
Batch = tuple[jax.Array, jax.Array]
# Folded into the step's dropout key for the held-out forward, so that its
# drop-path masks are drawn apart from those of the training forward.
HELDOUT_DROPOUT_STREAM = 1


@flax.struct.dataclass
class TrainState:
  """Everything a run learns; a PyTree, checkpointed whole.

  Attributes:
    step: int32 scalar, steps taken.
    params: θ (Flax 'params').
    batch_stats: BatchNorm running statistics.
    opt_state: state of the inner optax optimizer (inject_hyperparams).
    components: {component name: its state}.
    rng: the run's base PRNG key (raw uint32 data, checkpoint-friendly);
      step s uses fold_in(rng, s), so a resumed run draws the same numbers.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  components: dict[str, PyTree]
  rng: jax.Array


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy [B] of integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@flax.struct.dataclass
class Preprocess:
  """Static description of the base preprocessing, built from the config."""
  mode: str = flax.struct.field(pytree_node=False)
  pad: int = flax.struct.field(pytree_node=False)
  crop_size: int = flax.struct.field(pytree_node=False)
  flip: bool = flax.struct.field(pytree_node=False)
  cutout_size: int = flax.struct.field(pytree_node=False)
  mean: tuple[float, ...] = flax.struct.field(pytree_node=False)
  std: tuple[float, ...] = flax.struct.field(pytree_node=False)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  mean: Sequence[float], std: Sequence[float]) -> 'Preprocess':
    p = config.preprocess
    return cls(mode=p.mode, pad=p.pad, crop_size=p.crop_size, flip=p.flip,
               cutout_size=p.cutout_size, mean=tuple(map(float, mean)),
               std=tuple(map(float, std)))


def eval_images(pre: Preprocess, images: jax.Array) -> jax.Array:
  """Evaluation and HPO-batch preprocessing: [centre crop], normalise."""
  return augment_base.eval_preprocess(images, mode=pre.mode,
                                      crop_size=pre.crop_size, mean=pre.mean,
                                      std=pre.std)


def _owner(components: Sequence[Component], slot: str) -> Component | None:
  return next((c for c in components if getattr(c, slot) is not None), None)


def augment_batch(state: TrainState, images: jax.Array, *,
                  components: Sequence[Component], pre: Preprocess,
                  geo_key: jax.Array, cutout_key: jax.Array,
                  comp_keys: dict[str, jax.Array],
                  ) -> tuple[jax.Array, dict[str, PyTree]]:
  """Steps 1-3: base geometry, the components' `augment` hooks (in list
  order), normalisation and Cutout.

  Args:
    state: the train state (the components read their own state).
    images: uint8 [B, H, W, 3].
    components: the step's components.
    pre: the base preprocessing.
    geo_key, cutout_key: keys of the crop/flip and of Cutout.
    comp_keys: {component name: its key for `augment`}.

  Returns:
    (float32 images [B, H', W', 3], {component name: its `augment` stash}).
  """
  images = augment_base.train_geometry(
      geo_key, images, mode=pre.mode, pad=pre.pad, crop_size=pre.crop_size,
      flip=pre.flip)
  stash = {}
  for c in components:
    if c.augment is not None:
      images, stash[c.name] = c.augment(state.components[c.name],
                                        comp_keys[c.name], images)
  images = augment_base.train_finalize(cutout_key, images, mean=pre.mean,
                                       std=pre.std,
                                       cutout_size=pre.cutout_size)
  return images, stash


def train_step(state: TrainState, batch: Batch, hpo_batch: Batch, *,
               model: Any, tx: optax.GradientTransformation,
               components: Sequence[Component], fixed_arch: Architecture | None,
               pre: Preprocess, aux_weight: float,
               default_hparams: Callable[[jax.Array], dict],
               drop_path_rate: Callable[[jax.Array], jax.Array] | None,
               learned_lr_scale: Callable[[jax.Array], jax.Array] | None = None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One DHA step (module docstring); pure, jit it with `make_train_step`.

  `drop_path_rate(step)` is the networks' drop-path probability (None: no
  drop path). `default_hparams(step)` is η when no component supplies it.
  When one does, θ's learning rate is its η times `learned_lr_scale(step)`
  (None: 1), in θ's update and in the update that its hypergradient
  differentiates, so that a learned η can share the schedule's annealing.
  """
  images, labels = batch
  chex.assert_rank(images, 4)
  chex.assert_type(images, jnp.uint8)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  geo_key, cutout_key, drop_key, comp_key = jax.random.split(key, 4)
  comp_keys = {c.name: component_key(comp_key, c.name) for c in components}

  images, stash = augment_batch(
      state, images, components=components, pre=pre, geo_key=geo_key,
      cutout_key=cutout_key,
      comp_keys={n: jax.random.fold_in(k, 0) for n, k in comp_keys.items()})

  arch_owner = _owner(components, 'architecture')
  loss_owner = _owner(components, 'loss')
  trainables = {c.name: c.trainable(state.components[c.name])
                for c in components if c.trainable is not None}
  rate = None if drop_path_rate is None else drop_path_rate(state.step)

  def forward(params, trainables, batch_stats, x, y, rngs, with_aux):
    arch = (fixed_arch if arch_owner is None else arch_owner.architecture(
        state.components[arch_owner.name], trainables.get(arch_owner.name)))
    (logits, aux_logits), new_vars = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, arch, train=True,
        drop_path_rate=rate, rngs=rngs, mutable=['batch_stats'])
    if loss_owner is None:
      per_example = cross_entropy(logits, y)
    else:
      per_example = loss_owner.loss(state.components[loss_owner.name],
                                    trainables.get(loss_owner.name), logits, y)
    if with_aux and aux_logits is not None:
      per_example = per_example + aux_weight * cross_entropy(aux_logits, y)
    return per_example, logits, new_vars['batch_stats']

  def loss_fn(params, trainables):
    per_example, logits, new_stats = forward(
        params, trainables, state.batch_stats, images, labels,
        {'dropout': drop_key}, True)
    return jnp.mean(per_example), (per_example, logits, new_stats)

  (loss, (per_example, logits, new_stats)), (param_grads, comp_grads) = (
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
          state.params, trainables))

  hp_owner = _owner(components, 'hyperparams')
  lr_scale = (1.0 if hp_owner is None or learned_lr_scale is None
              else learned_lr_scale(state.step))

  def inner_update(hp):
    return hpo_inner.inner_step(
        tx, state.params, param_grads, state.opt_state,
        {**hp, 'learning_rate': hp['learning_rate'] * lr_scale})

  hparams = (default_hparams(state.step) if hp_owner is None
             else hp_owner.hyperparams(state.components[hp_owner.name]))
  new_params, new_opt_state = inner_update(hparams)

  hpo_images = eval_images(pre, hpo_batch[0])

  def heldout_loss(params, overrides=None):
    # Main-head loss on the un-augmented HPO batch, BN in training mode as
    # the reference (docs/fidelity.md, 'HPO'); its batch statistics are not
    # kept. A forward of its own, so drop-path draws its own masks.
    values = trainables if overrides is None else {**trainables, **overrides}
    per_example, _, _ = forward(
        params, values, new_stats, hpo_images, hpo_batch[1],
        {'dropout': jax.random.fold_in(drop_key, HELDOUT_DROPOUT_STREAM)},
        False)
    return jnp.mean(per_example)

  metrics = {'loss': loss,
             'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
             'learning_rate': hparams['learning_rate'] * lr_scale,
             'weight_decay': hparams['weight_decay'],
             'grad_norm': flat_tree.norm(param_grads)}
  new_components = dict(state.components)
  for c in components:
    if c.update is None:
      continue
    ctx = StepContext(
        step=state.step, key=jax.random.fold_in(comp_keys[c.name], 1),
        per_example_loss=jax.lax.stop_gradient(per_example),
        grads=comp_grads.get(c.name), stash=stash.get(c.name),
        params=state.params, param_grads=param_grads,
        inner_update=lambda hp: inner_update(hp)[0],
        heldout_loss=heldout_loss)
    new_components[c.name], comp_metrics = c.update(
        state.components[c.name], ctx)
    metrics.update({f'{c.name}/{k}': v for k, v in comp_metrics.items()})

  new_state = state.replace(
      step=state.step + 1, params=new_params, batch_stats=new_stats,
      opt_state=new_opt_state, components=new_components)
  return new_state, metrics


def make_train_step(mesh: Mesh, **static) -> Callable:
  """Jits `train_step` over `mesh`: batch sharded, state replicated, donated.

  `static` holds the keyword arguments of `train_step` that are not arrays
  (model, tx, components, ...). The jit cache is keyed by the state's tree
  structure, so a new NAS support compiles once and is then reused.
  """
  check_components(list(static['components']))
  repl = parallel.replicated(mesh)
  data = parallel.batch_sharding(mesh)
  return jax.jit(functools.partial(train_step, **static),
                 in_shardings=(repl, data, data),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def eval_step(params: PyTree, batch_stats: PyTree, arch: Architecture,
              images: jax.Array, labels: jax.Array, mask: jax.Array, *,
              model: Any, pre: Preprocess) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions over the unmasked examples."""
  logits, _ = model.apply({'params': params, 'batch_stats': batch_stats},
                          eval_images(pre, images), arch, train=False)
  weight = mask.astype(jnp.float32)
  return {'loss_sum': jnp.sum(cross_entropy(logits, labels) * weight),
          'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * weight),
          'count': jnp.sum(weight)}


def make_eval_step(mesh: Mesh, *, model: Any, pre: Preprocess) -> Callable:
  """Jits `eval_step` with the batch sharded over `mesh`."""
  repl = parallel.replicated(mesh)
  data = parallel.batch_sharding(mesh)
  return jax.jit(functools.partial(eval_step, model=model, pre=pre),
                 in_shardings=(repl, repl, repl, data, data, data),
                 out_shardings=repl)
