"""DA as a component: sample op pairs from τ, augment, learn τ by Eq. 2.

Per step (Algorithm 1): P̃ = softmax((log p(τ) + G)/T) with fresh Gumbel noise
G, each example draws an ordered pair (op1, op2) ~ P̃ and magnitudes
m ~ U(0, magnitude) clipped to [0, max_level]; after the forward pass τ takes
one SGD step on the importance-weighted loss

  L_DA(τ) = mean_k −stop_grad(ℓ_k) · p_τ(op1_k, op2_k)               (Eq. 2)

which raises the probability of pairs that produce a high training loss
(hard but useful augmentations). τ is pushed to the sampler at every step
(the reference effectively does it once per epoch, docs/fidelity.md, 'DA').

τ's optimizer is the paper's SGD (`policy_optimizer='sgd'`) or Adam
('adam', a deviation): Eq. 2's gradient is O(ℓ/K⁴) per logit, so SGD moves
the logits ~1e-4 a step and τ leaves uniform only over the paper's ~10⁵
steps; Adam's per-logit normalisation moves them ~`policy_lr` a step, and
`max_kl_from_uniform` bounds how far τ may go from uniform. Per
epoch (`epoch_end`) τ's entropy, KL from uniform and top pair are reported.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import ml_collections
import optax

from dha_jax import plots
from dha_jax.augment import ops
from dha_jax.augment import policy
from dha_jax.components import Component, StepContext


@flax.struct.dataclass
class DAState:
  """τ's logits [K, K] and their optimizer state."""
  logits: jax.Array
  opt_state: Any


def default_config() -> ml_collections.ConfigDict:
  """The DA fields (documented; `config.da` in the run configs)."""
  c = ml_collections.ConfigDict()
  # Gumbel temperature T > 0 of the per-step sampling distribution P̃.
  c.temperature = 1.0
  # Magnitudes are drawn from U(0, magnitude) and clipped to [0, max_level]:
  # the paper's [0, 10]; the reference code uses max_level = 8.
  c.magnitude = ops.PAPER_MAX_LEVEL
  c.max_level = ops.PAPER_MAX_LEVEL
  # Fill value of the geometric ops (rotate, shear, translate).
  c.fill_value = ops.DEFAULT_FILL_VALUE
  # τ's optimizer: 'sgd' (the paper and the reference: d_lr, d_momentum,
  # d_nesterov, d_weight_decay) or 'adam' (a deviation for short runs: moves
  # each logit ~policy_lr per step whatever the gradient's scale). With
  # 'sgd', Eq. 2's gradients are O(ℓ/K⁴) per logit, hence a large rate.
  # policy_lr = 0 keeps τ uniform (uniform RandAugment with pairs).
  c.policy_optimizer = 'sgd'
  c.policy_lr = 2.0
  # SGD only: momentum and Nesterov.
  c.policy_momentum = 0.9
  c.policy_nesterov = False
  # L2 weight decay on τ's logits (both optimizers).
  c.policy_weight_decay = 0.0
  # Upper bound on KL(p(τ) ‖ uniform) in nats after each update (τ is cooled
  # toward uniform just enough, `policy.limit_kl_from_uniform`); 0 = no
  # bound (the paper). Eq. 2 never stops raising the hardest pair, so
  # without a bound τ's end state depends on the run's length.
  c.max_kl_from_uniform = 0.0
  return c


POLICY_OPTIMIZERS = ('sgd', 'adam')
# Curves of policy_search.png, from the per-epoch reports.
PLOTTED_REPORT_KEYS = ('entropy', 'kl_from_uniform', 'max_pair_prob')


def policy_optimizer(config: ml_collections.ConfigDict
                     ) -> optax.GradientTransformation:
  """τ's optimizer (`config.policy_optimizer`), L2 decay first."""
  if config.policy_optimizer not in POLICY_OPTIMIZERS:
    raise ValueError(f'da.policy_optimizer must be one of '
                     f'{POLICY_OPTIMIZERS}, got {config.policy_optimizer!r}')
  if config.policy_optimizer == 'adam':
    step = optax.adam(config.policy_lr)
  else:
    step = optax.sgd(config.policy_lr,
                     momentum=config.policy_momentum or None,
                     nesterov=config.policy_nesterov)
  return optax.chain(optax.add_decayed_weights(config.policy_weight_decay),
                     step)


def epoch_report(logits: jax.Array) -> dict[str, Any]:
  """How far τ is from uniform: entropy, KL from uniform (nats), the
  probability and name of the most probable pair."""
  exported = policy.export_policy(logits, top_k=1)
  top = exported['top_pairs'][0]
  return {'entropy': exported['entropy'],
          'kl_from_uniform': float(policy.kl_from_uniform(logits)),
          'max_pair_prob': top['probability'],
          'top_pair': f"{top['op1']} -> {top['op2']}"}


def summary(state: DAState, reports: list[dict]) -> str:
  """One line on τ (for the run log)."""
  del reports
  report = epoch_report(state.logits)
  uniform = report['entropy'] + report['kl_from_uniform']
  return (f"τ entropy {report['entropy']:.3f} nats (uniform {uniform:.3f}), "
          f"top pair {report['top_pair']} p={report['max_pair_prob']:.4f}")


def make_component(config: ml_collections.ConfigDict,
                   name: str = 'da') -> Component:
  """The DA component over the 14 ops (`ops.OP_NAMES`)."""
  if not config.temperature > 0:
    raise ValueError(f'da.temperature must be > 0 (the Gumbel-softmax '
                     f'temperature T; 1 is the default), got '
                     f'{config.temperature!r}: T = 0 gives NaN probabilities '
                     'and T < 0 inverts the policy')
  tx = policy_optimizer(config)
  max_kl = 2.0 * math.log(ops.NUM_OPS)
  if not 0.0 <= config.max_kl_from_uniform < max_kl:
    raise ValueError(f'da.max_kl_from_uniform must be 0 (no bound) or in '
                     f'(0, log K² = {max_kl:.3f}) nats, got '
                     f'{config.max_kl_from_uniform}')

  def init(key: jax.Array) -> DAState:
    del key  # τ starts uniform
    logits = policy.init_policy(ops.NUM_OPS)
    return DAState(logits=logits, opt_state=tx.init(logits))

  def augment(state: DAState, key: jax.Array, images: jax.Array):
    pair_key, op_key = jax.random.split(key)
    op1, op2 = policy.sample_pairs(pair_key, state.logits, images.shape[0],
                                   config.temperature)
    images = ops.augment_pairs(op_key, images, op1, op2,
                               magnitude=config.magnitude,
                               max_level=config.max_level,
                               fill_value=config.fill_value)
    return images, (op1, op2)

  def update(state: DAState, ctx: StepContext):
    op1, op2 = ctx.stash
    loss, grads = jax.value_and_grad(policy.policy_loss)(
        state.logits, ctx.per_example_loss, op1, op2)
    updates, opt_state = tx.update(grads, state.opt_state, state.logits)
    logits = optax.apply_updates(state.logits, updates)
    if config.max_kl_from_uniform:
      logits = policy.limit_kl_from_uniform(logits, config.max_kl_from_uniform)
    return (DAState(logits=logits, opt_state=opt_state),
            {'policy_loss': loss, 'entropy': policy.policy_entropy(logits)})

  def epoch_end(state: DAState, epoch: int):
    return state, {'epoch': epoch, **epoch_report(state.logits)}

  def export(state: DAState | None, reports: list[dict]) -> dict[str, Any]:
    files = {'policy_search.png': plots.series_figure(
        reports, PLOTTED_REPORT_KEYS, 'τ (per epoch)')}
    if state is None:  # the final state no longer holds τ: curves only
      return files
    policy_json = policy.export_policy(state.logits)
    return {'policy.json': policy_json,
            'policy.png': plots.policy_figure(policy_json), **files}

  return Component(name=name, init=init, augment=augment, update=update,
                   epoch_end=epoch_end, export=export, summary=summary)
