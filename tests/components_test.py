"""The component API: slot checks, the built-in components' hooks, and a
user-written component (experiments/custom_component.py) composed into the
step without editing it."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dha_jax
from configs import default as default_config
from dha_jax import train
from dha_jax.augment import component as da_component
from dha_jax.augment import ops
from dha_jax.augment import policy
from dha_jax.components import check_components, component_key
from dha_jax.nas import component as nas_component
from dha_jax.nas import ista
from dha_jax.nas import search_space as ss
from experiments import custom_component
from tests import tiny


def _ctx(**kw):
  fields = dict(step=jnp.int32(0), key=jax.random.key(0),
                per_example_loss=None, grads=None, stash=None, params=None,
                param_grads=None, inner_update=None, heldout_loss=None)
  fields.update(kw)
  return dha_jax.StepContext(**fields)


def test_check_components_refuses_duplicates_and_two_owners():
  a = dha_jax.Component(name='a', init=lambda k: 0, loss=lambda *x: 0)
  b = dha_jax.Component(name='b', init=lambda k: 0, loss=lambda *x: 0)
  with pytest.raises(ValueError, match='unique'):
    check_components([a, a])
  with pytest.raises(ValueError, match="only one component may supply 'loss'"):
    check_components([a, b])


def test_component_draws_depend_on_its_name_alone():
  key = jax.random.key(0)
  data = lambda k: jax.random.key_data(k).tolist()
  assert data(component_key(key, 'nas')) == data(component_key(key, 'nas'))
  assert data(component_key(key, 'nas')) != data(component_key(key, 'da'))
  # Hence a mode's NAS codes do not depend on the components beside NAS:
  # ista_one_stage, nas_da and dha search from the same start.
  codes = {}
  for mode in ('ista_one_stage', 'dha'):
    run = train.Run.create(tiny.tiny_config(mode), workdir='')
    _, state = train.first_phase(run)
    codes[mode] = state.components['nas']
  chex.assert_trees_all_equal(codes['ista_one_stage'], codes['dha'])
  assert (codes['ista_one_stage'].ista.support
          == codes['dha'].ista.support)


def test_da_component_augments_and_raises_the_hardest_pair():
  comp = da_component.make_component(da_component.default_config())
  state = comp.init(jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (32, 8, 8, 3)), jnp.uint8)
  out, (op1, op2) = comp.augment(state, jax.random.key(1), images)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  assert op1.shape == op2.shape == (32,)
  # Pairs of the first example get a high loss: their probability must rise.
  losses = jnp.where(jnp.arange(32) == 0, 10.0, 0.1)
  new_state, metrics = comp.update(state, _ctx(per_example_loss=losses,
                                               stash=(op1, op2)))
  before = policy.pair_probs(state.logits)[op1[0], op2[0]]
  after = policy.pair_probs(new_state.logits)[op1[0], op2[0]]
  assert after > before
  assert metrics['entropy'] < policy.policy_entropy(state.logits)


def test_nas_component_keeps_frozen_codes_and_recovers_per_epoch():
  config = nas_component.default_config()
  config.max_iters = 2000
  comp = nas_component.make_component(config)
  state = comp.init(jax.random.key(0))
  frozen = jax.tree.map(lambda f: jnp.asarray(True), state.ista.frozen)
  frozen['normal'] = (jnp.asarray(False),) + frozen['normal'][1:]
  state = state.replace(ista=state.ista.replace(frozen=frozen))
  grads = jax.tree.map(jnp.ones_like, state.ista.b)
  new_state, _ = comp.update(state, _ctx(grads=grads))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.ista.b,
                       new_state.ista.b)
  assert moved['normal'][0] and not any(moved['normal'][1:])
  assert not any(moved['reduce'])
  recovered, report = comp.epoch_end(new_state, 1)
  assert report['frozen']['reduce'] == [True] * 4
  arch = comp.architecture(recovered, recovered.ista.b)
  assert arch.support == recovered.ista.support


def test_custom_component_loss_matches_optax_label_smoothing():
  logits = jax.random.normal(jax.random.key(0), (5, 10))
  labels = jnp.arange(5)
  logit = jnp.float32(0.3)
  r = custom_component.rate(logit)
  ours = custom_component.smoothed_loss(logit, logits, labels)
  ref = optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(labels, 10), r))
  np.testing.assert_allclose(ours, ref, rtol=1e-5)


@pytest.mark.slow
def test_custom_component_runs_in_the_train_loop(tmp_path):
  config = tiny.tiny_config('train', {
      'extra_components': 'experiments.custom_component:make_component',
      'num_train_steps': 3, 'log_every_steps': 1})
  workdir = str(tmp_path / 'wd')
  train.train_and_evaluate(config, workdir)
  rates = [r['label_smoothing/rate'] for r in train.read_metrics(workdir)
           if 'label_smoothing/rate' in r]
  assert len(rates) == 3
  assert all(0.0 < r < custom_component.MAX_RATE for r in rates)
  assert len(set(rates)) > 1  # the rate learns


def test_unknown_extra_component_is_a_clear_error():
  config = default_config.get_config()
  config.extra_components = 'no_such_module:make'
  with pytest.raises(train.RunError, match='module:factory'):
    train.load_extra_components(config)


def test_nas_component_moves_b_relative_to_its_scale_and_freezing_waits():
  config = nas_component.default_config()
  config.max_iters = 2000
  config.freeze_rule = 'relative'
  config.dist_limit = 10.0  # every node would freeze at its first chance,
  config.min_freeze_steps = 3  # but not before b has had 3 updates
  comp = nas_component.make_component(config)
  state = comp.init(jax.random.key(0))
  grads = jax.tree.map(jnp.ones_like, state.ista.b)
  moved, _ = comp.update(state, _ctx(grads=grads))
  # At the reference's scale (b ~ 1e-3) one Adam step of 3e-4 per coordinate
  # moves b by a large fraction of itself.
  relative = float(optax.tree.norm(jax.tree.map(
      jnp.subtract, moved.ista.b, state.ista.b)) / optax.tree.norm(
          state.ista.b))
  assert relative > 0.1
  moved, report = comp.epoch_end(moved, 1)
  np.testing.assert_allclose(report['code_relative_move'], relative,
                             rtol=1e-5)
  assert report['code_steps'] == 1 and report['frozen_nodes'] == 0
  start = ista.support_from_codes(state.x_init, state.ista.config)
  assert report['pairs_changed_from_start'] == ss.changed_pairs(
      start, moved.ista.support_dict)
  assert report['pairs_changed'] == report['pairs_changed_from_start']
  for _ in range(2):
    moved, _ = comp.update(moved, _ctx(grads=grads))
  frozen, report = comp.epoch_end(moved, 2)
  assert report['code_steps'] == 3 and report['frozen_nodes'] == 8
  assert comp.search_done(frozen)
  assert comp.summary(frozen, [report]).startswith('support changed')


def _tau_after_a_loss_favouring_one_pair(config, steps):
  """τ after `steps` updates where pair (3, 5) has 10x the loss of others."""
  comp = da_component.make_component(config)
  state = comp.init(jax.random.key(0))

  @jax.jit
  def step(state, key):
    op1, op2 = policy.sample_pairs(key, state.logits, 64, config.temperature)
    losses = jnp.where((op1 == 3) & (op2 == 5), 10.0, 1.0)
    return comp.update(state, _ctx(per_example_loss=losses,
                                   stash=(op1, op2)))[0]

  for key in jax.random.split(jax.random.key(1), steps):
    state = step(state, key)
  return comp, state


def test_adam_on_tau_leaves_uniform_under_a_loss_favouring_one_pair():
  config = da_component.default_config()
  config.policy_optimizer = 'adam'
  config.policy_lr = 0.05
  uniform = 2 * math.log(ops.NUM_OPS)
  comp, state = _tau_after_a_loss_favouring_one_pair(config, 200)
  _, report = comp.epoch_end(state, 0)
  assert report['entropy'] < uniform - 0.25
  np.testing.assert_allclose(report['kl_from_uniform'],
                             uniform - report['entropy'], rtol=1e-5)
  names = ops.OP_NAMES
  assert report['top_pair'] == f'{names[3]} -> {names[5]}'
  assert 'τ entropy' in comp.summary(state, [report])
  with pytest.raises(ValueError, match='policy_optimizer'):
    config.policy_optimizer = 'rmsprop'
    da_component.make_component(config)


def test_max_kl_from_uniform_keeps_a_long_run_from_collapsing():
  config = da_component.default_config()
  config.policy_optimizer = 'adam'
  config.policy_lr = 0.05
  _, free = _tau_after_a_loss_favouring_one_pair(config, 600)
  config.max_kl_from_uniform = 1.0
  comp, bounded = _tau_after_a_loss_favouring_one_pair(config, 600)
  # Unbounded, 600 steps collapse τ near one pair; bounded, it stops at the
  # bound with the same pair on top.
  assert policy.kl_from_uniform(free.logits) > 3.0
  np.testing.assert_allclose(policy.kl_from_uniform(bounded.logits), 1.0,
                             rtol=1e-3)
  top = lambda logits: int(jnp.argmax(logits))
  assert top(bounded.logits) == top(free.logits) == 3 * ops.NUM_OPS + 5
  config.max_kl_from_uniform = 2 * math.log(ops.NUM_OPS)
  with pytest.raises(ValueError, match='max_kl_from_uniform'):
    da_component.make_component(config)
