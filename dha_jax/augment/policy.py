"""The augmentation policy τ: a distribution over ordered op pairs (Eq. 2).

τ is a [K, K] array of logits; p(τ) = softmax(vec τ) over all K² entries is
the probability of applying op i then op j (docs/fidelity.md, 'DA', reference
`model/hpo_da.py`). Each train step:

1. draws Gumbel noise G [K, K] once and forms the perturbed sampling
   distribution P̃ = softmax((log p(τ) + G) / T) over the K² pairs;
2. draws each example's pair c ~ Categorical(P̃) independently,
   op1 = c // K, op2 = c % K (op1 is applied first; op1 == op2 allowed).
   No gradient flows through the sampling;
3. after the forward pass, updates τ on the DA loss (Eq. 2, the reference's
   batch mean): L_DA(τ) = mean_k[-stop_gradient(ℓ_k) · p(τ)[op1_k, op2_k]],
   whose gradient raises the probability of pairs that produced a high loss.

Unlike the reference (whose DataLoader workers keep the matrix they were
forked with, so sampling follows τ once per epoch), `sample_pairs` reads τ at
every step, as the paper intends.
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dha_jax.augment.ops import NUM_OPS, OP_NAMES

DEFAULT_TOP_K = 10


def init_policy(num_ops: int = NUM_OPS) -> jax.Array:
  """τ at initialisation: [K, K] float32, 1/K² everywhere (uniform p(τ))."""
  if num_ops < 1:
    raise ValueError(f'num_ops must be positive, got {num_ops}')
  return jnp.full((num_ops, num_ops), 1.0 / num_ops**2, jnp.float32)


def _check_logits(logits: chex.Array) -> int:
  chex.assert_rank(logits, 2)
  num_ops = logits.shape[0]
  chex.assert_shape(logits, (num_ops, num_ops))
  return num_ops


def pair_log_probs(logits: chex.Array) -> jax.Array:
  """log p(τ): [K, K] log-probabilities of the ordered pairs (op1, op2)."""
  num_ops = _check_logits(logits)
  return jax.nn.log_softmax(logits.reshape(-1)).reshape(num_ops, num_ops)


def pair_probs(logits: chex.Array) -> jax.Array:
  """p(τ): [K, K] probabilities of the ordered pairs; rows are op1."""
  return jnp.exp(pair_log_probs(logits))


def _noise_and_draw_keys(key: chex.PRNGKey) -> tuple[jax.Array, jax.Array]:
  noise_key, draw_key = jax.random.split(key)
  return noise_key, draw_key


def _check_temperature(temperature: chex.Numeric) -> None:
  """A Python temperature must be > 0 (a traced one cannot be checked)."""
  if isinstance(temperature, (int, float, np.number)) and not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature!r}: T = 0 '
                     'gives NaN probabilities (every example draws pair 0) '
                     'and T < 0 inverts the policy')


def _perturbed_log_probs(noise_key: chex.PRNGKey, logits: chex.Array,
                         temperature: chex.Numeric) -> jax.Array:
  _check_temperature(temperature)
  log_p = pair_log_probs(jax.lax.stop_gradient(logits)).reshape(-1)
  gumbel = jax.random.gumbel(noise_key, log_p.shape, log_p.dtype)
  return jax.nn.log_softmax((log_p + gumbel) / temperature)


def perturbed_pair_probs(key: chex.PRNGKey, logits: chex.Array,
                         temperature: chex.Numeric) -> jax.Array:
  """P̃ [K, K], the distribution `sample_pairs(key, ...)` draws from.

  P̃ = softmax((log p(τ) + G) / T), G ~ Gumbel(0, 1) [K, K], drawn from the
  same key as `sample_pairs` uses, so a test can check its draws.

  Args:
    key: the key that would be passed to `sample_pairs`.
    logits: τ [K, K].
    temperature: T > 0 (a Python number <= 0 raises ValueError); T -> 0
      makes P̃ one-hot at argmax(log p + G), whose position is itself
      distributed as p(τ) (the Gumbel-max trick).

  Returns:
    [K, K] probabilities (rows: op1), no gradient.
  """
  num_ops = _check_logits(logits)
  noise_key, _ = _noise_and_draw_keys(key)
  log_probs = _perturbed_log_probs(noise_key, logits, temperature)
  return jnp.exp(log_probs).reshape(num_ops, num_ops)


def sample_pairs(key: chex.PRNGKey, logits: chex.Array, num: int,
                 temperature: chex.Numeric) -> tuple[jax.Array, jax.Array]:
  """Draws `num` op pairs for one step (reference `weights_matrix` + sampler).

  One Gumbel draw per call: P̃ = `perturbed_pair_probs(key, logits,
  temperature)`; then every example draws c ~ Categorical(vec P̃)
  independently (row-major), op1 = c // K, op2 = c % K.

  Args:
    key: PRNG key of this step.
    logits: τ [K, K].
    num: number of examples (static).
    temperature: T > 0 of the Gumbel-softmax (a Python number <= 0 raises
      ValueError; a traced one is the caller's to check).

  Returns:
    (op1, op2), int32 [num] each; op1 is applied first.
  """
  num_ops = _check_logits(logits)
  noise_key, draw_key = _noise_and_draw_keys(key)
  log_probs = _perturbed_log_probs(noise_key, logits, temperature)
  flat = jax.random.categorical(draw_key, log_probs, shape=(num,))
  flat = flat.astype(jnp.int32)
  return flat // num_ops, flat % num_ops


def policy_loss(logits: chex.Array, per_example_loss: chex.Array,
                op1: chex.Array, op2: chex.Array) -> jax.Array:
  """The DA loss of Eq. 2 with the reference's batch mean.

  L_DA(τ) = (1/n) Σ_k -stop_gradient(ℓ_k) · p(τ)[op1_k, op2_k]. The paper
  sums over the batch; the reference averages (a rescaling of the learning
  rate of τ). Minimising it raises p of the pairs with the highest loss.

  Args:
    logits: τ [K, K].
    per_example_loss: ℓ [n], the training loss of each augmented example
      (main + aux heads); its gradient is stopped here.
    op1: int [n] in [0, K), first op of each example's pair.
    op2: int [n] in [0, K), second op. Indices are not range-checked (they
      are traced); out-of-range ones read a wrong pair or a clamped index.

  Returns:
    Scalar loss, differentiable w.r.t. `logits`.
  """
  num_ops = _check_logits(logits)
  chex.assert_rank(per_example_loss, 1)
  chex.assert_equal_shape([per_example_loss, op1, op2])
  chex.assert_type([op1, op2], int)
  probs = jax.nn.softmax(logits.reshape(-1))
  chosen = probs[op1 * num_ops + op2]
  return jnp.mean(-jax.lax.stop_gradient(per_example_loss) * chosen)


def policy_entropy(logits: chex.Array) -> jax.Array:
  """Entropy of p(τ) in nats; log(K²) when uniform, 0 when one-hot."""
  log_p = pair_log_probs(logits)
  return -jnp.sum(jnp.exp(log_p) * log_p)


def kl_from_uniform(logits: chex.Array) -> jax.Array:
  """KL(p(τ) ‖ uniform) = log K² − H(p(τ)) in nats; 0 when uniform."""
  num_ops = _check_logits(logits)
  return 2.0 * jnp.log(num_ops) - policy_entropy(logits)


# Bisection steps of `limit_kl_from_uniform`: the inverse temperature is
# found to 2⁻³⁰ of its range, below float32's resolution of the logits.
KL_LIMIT_BISECTION_STEPS = 30


def limit_kl_from_uniform(logits: chex.Array, max_kl: float) -> jax.Array:
  """τ cooled toward uniform just enough that KL(p(τ) ‖ uniform) ≤ max_kl.

  Returns s·τ with the largest s ∈ [0, 1] for which the bound holds (s = 1,
  τ itself, when it already does). KL(softmax(s·τ) ‖ uniform) does not
  decrease with the inverse temperature s, so s is found by bisection; the
  pairs keep their order and τ keeps its direction. Eq. 2 alone has no bound
  on how far τ moves: with Adam each logit moves ~policy_lr a step, so over
  a long enough run τ collapses onto one pair (docs/fidelity.md, 'DA').

  Args:
    logits: τ [K, K].
    max_kl: the bound in nats, in (0, log K²).

  Returns:
    [K, K] logits whose KL from uniform is at most max_kl (to the bisection's
    precision).
  """
  _check_logits(logits)
  if not max_kl > 0:
    raise ValueError(f'max_kl must be positive, got {max_kl}')

  def within(scale):
    return kl_from_uniform(scale * logits) <= max_kl

  def bisect(_, bounds):
    low, high = bounds
    mid = 0.5 * (low + high)
    return jnp.where(within(mid), mid, low), jnp.where(within(mid), high, mid)

  low, _ = jax.lax.fori_loop(0, KL_LIMIT_BISECTION_STEPS, bisect,
                             (jnp.float32(0.0), jnp.float32(1.0)))
  return jnp.where(within(1.0), logits, low * logits)


def export_policy(logits: chex.Array, top_k: int = DEFAULT_TOP_K,
                  op_names: Sequence[str] | None = None) -> dict[str, Any]:
  """τ as a JSON-ready dict (the workdir's `policy.json`).

  Args:
    logits: τ [K, K] (host or device array).
    top_k: how many of the most probable pairs to list.
    op_names: names of the K ops (default `OP_NAMES`, which needs K = 14).

  Returns:
    {'op_names': [K names], 'entropy': nats, 'max_entropy': log K²,
     'top_pairs': [{'op1', 'op2', 'probability'} for the top_k pairs, most
     probable first], 'pair_probs': K x K nested list (rows: op1),
     'op1_marginal' / 'op2_marginal': {name: probability}}.
  """
  num_ops = _check_logits(logits)
  names = tuple(OP_NAMES if op_names is None else op_names)
  if len(names) != num_ops:
    raise ValueError(f'policy has {num_ops} ops but {len(names)} op names '
                     'were given; pass op_names with one name per op')
  probs = np.asarray(pair_probs(jnp.asarray(logits)), np.float64)
  order = np.argsort(-probs.reshape(-1), kind='stable')[:top_k]
  top_pairs = [{'op1': names[c // num_ops], 'op2': names[c % num_ops],
                'probability': float(probs.reshape(-1)[c])} for c in order]
  return {
      'op_names': list(names),
      'entropy': float(policy_entropy(jnp.asarray(logits))),
      'max_entropy': float(np.log(num_ops**2)),
      'top_pairs': top_pairs,
      'pair_probs': probs.tolist(),
      'op1_marginal': dict(zip(names, probs.sum(axis=1).tolist())),
      'op2_marginal': dict(zip(names, probs.sum(axis=0).tolist())),
  }
