"""θ's optimizer, used by every mode: one real optax step with η injected.

One optimizer step of the network weights, seen as a function of the
hyper-parameters η = {learning rate, weight decay}, is

  θ⁺(η) = OP(θ, η, ∇θ L_train(θ))                                    # Eq. 3

`make_inner_optimizer` builds OP as an ordinary `optax.inject_hyperparams`
transformation: global-norm clipping → d = g + wd·θ → SGD momentum
(optionally Nesterov) → scale by −lr. `inner_step` is the one place where the
train step, the hypergradients (`dha_jax.hpo.hypergradient`) and the tests
apply it, with the injected values replaced purely (via `_replace`). Without
an HPO component, η follows `learning_rate_schedule` and the config's fixed
weight decay.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import ml_collections
import optax

from dha_jax import flat_tree

PyTree = Any
HParams = dict[str, jax.Array]

# The injected hyper-parameters, in this order everywhere.
HPARAM_NAMES = ('learning_rate', 'weight_decay')
# η's dtype; optax would otherwise cast it to the parameters' (e.g. bf16).
HPARAM_DTYPE = jax.numpy.float32
SCHEDULES = ('cosine', 'constant')


def make_inner_optimizer(*, momentum: float, nesterov: bool,
                         grad_clip: float | None,
                         learning_rate: float = 0.0,
                         weight_decay: float = 0.0,
                         hyperparam_dtype: Any = HPARAM_DTYPE,
                         ) -> optax.GradientTransformation:
  """θ's optimizer with injectable `learning_rate` and `weight_decay` (Eq. 3).

  Global-norm clipping of g → d = g + weight_decay·θ (the reference's order:
  decay after clipping, before momentum) → buf = momentum·buf + d (Nesterov:
  d + momentum·buf) → −learning_rate·buf.

  Args:
    momentum: SGD momentum μ (0 = none, and no buffer is kept).
    nesterov: Nesterov momentum.
    grad_clip: global-norm clipping threshold (None or <= 0: no clipping).
    learning_rate: initial value stored in the optimizer state; callers
      override it at every step (`inner_step`).
    weight_decay: likewise.
    hyperparam_dtype: dtype of the injected hyper-parameters (float32 keeps
      η exact under bf16 parameters; float64 for x64 tests).

  Returns:
    An `optax.inject_hyperparams` transformation; its state's `hyperparams`
    holds 'learning_rate' and 'weight_decay'.
  """
  def factory(learning_rate, weight_decay):
    parts = []
    if grad_clip is not None and grad_clip > 0:
      parts.append(flat_tree.clip_by_global_norm(grad_clip))
    parts.append(optax.add_decayed_weights(weight_decay))
    if momentum > 0:
      parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)

  return optax.inject_hyperparams(factory, hyperparam_dtype=hyperparam_dtype)(
      learning_rate=learning_rate, weight_decay=weight_decay)


def optimizer_from_config(config: ml_collections.ConfigDict
                          ) -> optax.GradientTransformation:
  """`make_inner_optimizer` from a run config's `optimizer` block."""
  opt = config.optimizer
  return make_inner_optimizer(momentum=opt.momentum, nesterov=opt.nesterov,
                              grad_clip=opt.grad_clip)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  """θ's learning rate when no component supplies η (`config.optimizer`)."""
  opt = config.optimizer
  if opt.schedule == 'constant':
    return optax.constant_schedule(opt.learning_rate)
  if opt.schedule == 'cosine':
    return optax.cosine_decay_schedule(
        opt.learning_rate, max(total_steps, 1),
        alpha=opt.min_learning_rate / opt.learning_rate)
  raise ValueError(f'optimizer.schedule must be one of {SCHEDULES}, got '
                   f'{opt.schedule!r}')


def inner_step(tx: optax.GradientTransformation, params: PyTree,
               grads: PyTree, opt_state: optax.OptState, hparams: HParams
               ) -> tuple[PyTree, optax.OptState]:
  """One real optax update of θ with η injected: θ⁺ = OP(θ, η, g) (Eq. 3).

  Args:
    tx: an `optax.inject_hyperparams` optimizer (`make_inner_optimizer`).
    params: θ.
    grads: ∂L_train/∂θ, shaped like θ (unclipped: clipping is in `tx`).
    opt_state: `tx`'s state; it is not modified.
    hparams: values replacing the injected hyper-parameters of the same name.

  Returns:
    (θ⁺, the optimizer state after the update).
  """
  hyperparams = getattr(opt_state, 'hyperparams', None)
  if not isinstance(hyperparams, dict):
    raise TypeError('opt_state has no injected hyper-parameters: build the '
                    'optimizer with optax.inject_hyperparams '
                    '(make_inner_optimizer)')
  unknown = set(hparams) - set(hyperparams)
  if unknown:
    raise KeyError(f'{sorted(unknown)} are not hyper-parameters of this '
                   f'optimizer (it has {sorted(hyperparams)})')
  chex.assert_trees_all_equal_shapes(params, grads)
  opt_state = opt_state._replace(hyperparams={**hyperparams, **hparams})
  updates, new_opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), new_opt_state
