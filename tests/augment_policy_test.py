"""The policy τ: initialisation, Gumbel-perturbed sampling, Eq. 2, export."""

import json
import math

import jax
import matplotlib.pyplot as plt
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dha_jax.augment import component as da_component
from dha_jax.augment import ops
from dha_jax.augment import policy

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('augment_policy_test')

# Chi-square tests: reject only on overwhelming evidence (the keys are fixed,
# so each test is deterministic; a wrong sampler fails by a wide margin).
SIGNIFICANCE = 1e-3
MIN_EXPECTED_COUNT = 5


def chi_square_p_value(draws: np.ndarray, probs: np.ndarray) -> float:
  """p-value of flat-index draws against probs, small cells pooled."""
  probs = probs.reshape(-1)
  counts = np.bincount(draws, minlength=probs.size)
  expected = probs * len(draws)
  small = expected < MIN_EXPECTED_COUNT
  observed = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  if expected[-1] == 0:
    assert observed[-1] == 0
    observed, expected = observed[:-1], expected[:-1]
  return stats.chisquare(observed, expected * observed.sum() /
                         expected.sum()).pvalue


@pytest.fixture(scope='module')
def skewed_logits():
  """A non-uniform τ over the 14 ops (p spans ~3 orders of magnitude)."""
  return jax.random.normal(jax.random.key(42), (ops.NUM_OPS, ops.NUM_OPS))


@pytest.fixture(scope='module')
def jitted_sample_pairs():
  return jax.jit(policy.sample_pairs, static_argnums=2)


def test_init_policy_is_uniform_reference_value():
  logits = policy.init_policy()
  assert logits.shape == (ops.NUM_OPS, ops.NUM_OPS)
  np.testing.assert_allclose(logits, 1 / ops.NUM_OPS**2)
  np.testing.assert_allclose(policy.pair_probs(logits), 1 / ops.NUM_OPS**2,
                             rtol=1e-6)
  np.testing.assert_allclose(policy.policy_entropy(logits),
                             math.log(ops.NUM_OPS**2), rtol=1e-5)


def test_pair_log_probs_normalised_over_all_pairs(skewed_logits):
  log_p = policy.pair_log_probs(skewed_logits)
  np.testing.assert_allclose(jnp.sum(jnp.exp(log_p)), 1., rtol=1e-5)
  np.testing.assert_allclose(
      log_p - log_p[0, 0], skewed_logits - skewed_logits[0, 0], atol=1e-5)


def test_sample_pairs_shapes_and_decoding(skewed_logits, jitted_sample_pairs):
  key = jax.random.key(0)
  op1, op2 = jitted_sample_pairs(key, skewed_logits, 64, 1.)
  assert op1.shape == op2.shape == (64,)
  assert op1.dtype == op2.dtype == jnp.int32
  assert int(op1.min()) >= 0 and int(op1.max()) < ops.NUM_OPS
  assert int(op2.min()) >= 0 and int(op2.max()) < ops.NUM_OPS
  again = jitted_sample_pairs(key, skewed_logits, 64, 1.)
  np.testing.assert_array_equal(op1, again[0])
  np.testing.assert_array_equal(op2, again[1])


@pytest.mark.parametrize('temperature', [1., 5.])
def test_draws_follow_perturbed_probs(skewed_logits, jitted_sample_pairs,
                                      temperature):
  """With one key, every example draws from the P̃ of that call."""
  key = jax.random.key(1)
  num = 20_000
  op1, op2 = jitted_sample_pairs(key, skewed_logits, num, temperature)
  draws = np.asarray(op1) * ops.NUM_OPS + np.asarray(op2)
  perturbed = np.asarray(
      policy.perturbed_pair_probs(key, skewed_logits, temperature), np.float64)
  np.testing.assert_allclose(perturbed.sum(), 1., rtol=1e-5)
  assert chi_square_p_value(draws, perturbed) > SIGNIFICANCE
  # The noise matters: P̃ is not p(τ), and the draws tell them apart.
  unperturbed = np.asarray(policy.pair_probs(skewed_logits), np.float64)
  assert chi_square_p_value(draws, unperturbed) < SIGNIFICANCE


def test_low_temperature_follows_policy_across_steps(jitted_sample_pairs):
  """T -> 0: P̃ is one-hot at argmax(log p + G), distributed as p(τ)."""
  logits = jnp.log(jnp.asarray([[0.4, 0.2, 0.1], [0.1, 0.08, 0.05],
                                [0.03, 0.02, 0.02]]))
  keys = jax.random.split(jax.random.key(2), 4000)
  first = jax.vmap(lambda k: jitted_sample_pairs(k, logits, 1, 1e-3))(keys)
  draws = np.asarray(first[0][:, 0] * 3 + first[1][:, 0])
  probs = np.asarray(policy.pair_probs(logits), np.float64)
  assert chi_square_p_value(draws, probs) > SIGNIFICANCE


@pytest.mark.parametrize('temperature', [0, 0., -1.])
def test_non_positive_temperature_is_rejected(skewed_logits, temperature):
  """T = 0 would give NaN probabilities (every example drawing pair 0) and
  T < 0 the inverted policy: a Python T <= 0 raises, naming the field."""
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='temperature must be > 0'):
    policy.sample_pairs(key, skewed_logits, 4, temperature)
  with pytest.raises(ValueError, match='temperature must be > 0'):
    policy.perturbed_pair_probs(key, skewed_logits, temperature)
  config = da_component.default_config()
  config.temperature = temperature
  with pytest.raises(ValueError, match='da.temperature'):
    da_component.make_component(config)


def test_policy_loss_needs_integer_pair_indices(skewed_logits):
  losses = jnp.ones((2,))
  with pytest.raises(AssertionError, match='type'):
    policy.policy_loss(skewed_logits, losses, jnp.asarray([0., 1.]),
                       jnp.asarray([1, 2]))


def test_export_without_a_final_state_writes_the_curves_only():
  """A run whose final state no longer holds τ still gets its curves."""
  comp = da_component.make_component(da_component.default_config())
  state = comp.init(jax.random.key(0))
  _, report = comp.epoch_end(state, 0)
  reports = [{**report, 'step': 10}]
  full = comp.export(state, reports)
  assert set(full) == {'policy.json', 'policy.png', 'policy_search.png'}
  assert full['policy.json']['op_names'] == list(ops.OP_NAMES)
  curves_only = comp.export(None, reports)
  assert set(curves_only) == {'policy_search.png'}
  for fig in [*curves_only.values(), full['policy.png'],
              full['policy_search.png']]:
    plt.close(fig)


def test_policy_loss_value_and_stopped_loss_gradient(skewed_logits):
  losses = jnp.asarray([1., 2., 3.])
  op1 = jnp.asarray([0, 5, 13])
  op2 = jnp.asarray([1, 5, 0])
  probs = policy.pair_probs(skewed_logits)
  expected = -jnp.mean(losses * probs[op1, op2])
  np.testing.assert_allclose(
      policy.policy_loss(skewed_logits, losses, op1, op2), expected,
      rtol=1e-5)
  loss_grad = jax.grad(policy.policy_loss, argnums=1)(skewed_logits, losses,
                                                      op1, op2)
  np.testing.assert_array_equal(loss_grad, 0.)


def test_gradient_step_raises_high_loss_pairs():
  """One SGD step on Eq. 2 favours the pairs whose examples had high loss."""
  logits = policy.init_policy()
  k = ops.NUM_OPS
  rng = np.random.RandomState(0)
  # Uniform pairs, plus 8 examples of (Rotate, ShearX), the hard pair.
  op1 = jnp.asarray(rng.randint(0, k, 256)).at[:8].set(2)
  op2 = jnp.asarray(rng.randint(0, k, 256)).at[:8].set(9)
  hard = (op1 == 2) & (op2 == 9)
  losses = jnp.where(hard, 5., 1.)
  grads = jax.jit(jax.grad(policy.policy_loss))(logits, losses, op1, op2)
  new_probs = policy.pair_probs(logits - 10. * grads)
  old_probs = policy.pair_probs(logits)
  assert new_probs[2, 9] > old_probs[2, 9]
  assert int(jnp.argmax(new_probs)) == 2 * k + 9
  unseen = np.ones((k, k), bool)
  unseen[np.asarray(op1), np.asarray(op2)] = False
  assert bool(jnp.all(new_probs[unseen] < old_probs[unseen]))


def test_entropy_of_one_hot_is_zero():
  logits = jnp.full((4, 4), -1e4).at[1, 2].set(0.)
  np.testing.assert_allclose(policy.policy_entropy(logits), 0., atol=1e-4)


def test_export_policy_is_json_ready(skewed_logits):
  exported = policy.export_policy(skewed_logits, top_k=5)
  text = json.dumps(exported)
  assert json.loads(text)['op_names'] == list(ops.OP_NAMES)
  probs = np.asarray(exported['pair_probs'])
  assert probs.shape == (ops.NUM_OPS, ops.NUM_OPS)
  np.testing.assert_allclose(probs.sum(), 1., rtol=1e-5)
  top = [pair['probability'] for pair in exported['top_pairs']]
  assert len(top) == 5 and top == sorted(top, reverse=True)
  np.testing.assert_allclose(top[0], probs.max(), rtol=1e-6)
  best = np.unravel_index(probs.argmax(), probs.shape)
  assert exported['top_pairs'][0]['op1'] == ops.OP_NAMES[best[0]]
  assert exported['top_pairs'][0]['op2'] == ops.OP_NAMES[best[1]]
  np.testing.assert_allclose(sum(exported['op1_marginal'].values()), 1.,
                             rtol=1e-5)
  assert exported['entropy'] < exported['max_entropy']
  np.testing.assert_allclose(exported['max_entropy'],
                             math.log(ops.NUM_OPS**2))


def test_export_policy_needs_names_for_other_sizes():
  with pytest.raises(ValueError, match='op_names'):
    policy.export_policy(policy.init_policy(3))
  exported = policy.export_policy(policy.init_policy(3),
                                  op_names=('a', 'b', 'c'))
  assert exported['top_pairs'][0]['op1'] == 'a'


def test_limit_kl_from_uniform_cools_tau_to_the_bound(skewed_logits):
  kl = float(policy.kl_from_uniform(skewed_logits))
  bound = kl / 2
  limited = policy.limit_kl_from_uniform(skewed_logits, bound)
  np.testing.assert_allclose(policy.kl_from_uniform(limited), bound,
                             rtol=1e-4)
  # A temperature: the same direction and order of pairs.
  scale = limited.reshape(-1) @ skewed_logits.reshape(-1) / jnp.sum(
      skewed_logits**2)
  assert 0 < scale < 1
  np.testing.assert_allclose(limited, scale * skewed_logits, rtol=1e-5,
                             atol=1e-6)
  # Within the bound τ is returned unchanged, bit for bit.
  same = policy.limit_kl_from_uniform(skewed_logits, kl + 0.1)
  np.testing.assert_array_equal(same, skewed_logits)
  with pytest.raises(ValueError, match='positive'):
    policy.limit_kl_from_uniform(skewed_logits, 0.0)
