"""A user-written AutoML component: a learned label-smoothing rate.

Shows the functional component API (`dha_jax.Component`) end to end: the
component owns a PyTree state (the rate's logit and its optimizer state),
replaces the per-example loss through the `loss` hook, is differentiated with
θ through its `trainable` part, and learns in `update`. No edit to the train
step is needed; list it in the config:

  python -m dha_jax.main --config=configs/default.py --workdir=/tmp/ls \
    --config.extra_components=experiments.custom_component:make_component

The rate r = max_rate · sigmoid(logit) smooths the targets,
ℓ = (1 − r)·CE(y) + r·mean_c(−log p_c), and follows the gradient of the mean
training loss (plus `target_pull` · (r − target_rate)², which keeps it from
collapsing to 0 early): an illustration of the API rather than a method from
the paper.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

import dha_jax

MAX_RATE = 0.3
TARGET_RATE = 0.1
TARGET_PULL = 1.0
RATE_LR = 0.05


@flax.struct.dataclass
class SmoothingState:
  logit: jax.Array
  opt_state: optax.OptState


def rate(logit: jax.Array) -> jax.Array:
  return MAX_RATE * jax.nn.sigmoid(logit)


def smoothed_loss(logit: jax.Array, logits: jax.Array,
                  labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy with label smoothing at rate(logit) [B]."""
  r = rate(logit)
  log_p = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  return (1.0 - r) * nll + r * -jnp.mean(log_p, axis=-1)


def make_component(config: ml_collections.ConfigDict,
                   name: str = 'label_smoothing') -> dha_jax.Component:
  del config  # this example has no settings of its own
  tx = optax.sgd(RATE_LR)
  logit0 = jnp.log(TARGET_RATE / (MAX_RATE - TARGET_RATE))  # rate = target

  def init(key):
    del key
    return SmoothingState(logit=logit0, opt_state=tx.init(logit0))

  def update(state: SmoothingState, ctx: dha_jax.StepContext):
    pull = jax.grad(lambda l: TARGET_PULL * (rate(l) - TARGET_RATE)**2)(
        state.logit)
    updates, opt_state = tx.update(ctx.grads + pull, state.opt_state)
    logit = optax.apply_updates(state.logit, updates)
    return (SmoothingState(logit=logit, opt_state=opt_state),
            {'rate': rate(logit)})

  return dha_jax.Component(
      name=name, init=init, trainable=lambda s: s.logit,
      loss=lambda s, logit, logits, labels: smoothed_loss(logit, logits,
                                                          labels),
      update=update)
