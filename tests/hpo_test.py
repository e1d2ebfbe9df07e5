"""Tests of HPO (dha_jax/hpo/): the inner step and Eq. 3-4 hypergradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from sklearn import datasets

from dha_jax import hpo
from dha_jax.components import StepContext

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('hpo_test')

# Central finite differences in float64: step in raw η and tolerance.
FD_EPS = 1e-6
FD_RTOL = 1e-4
# Logistic regression on digits.
DIGITS_STEPS = 150
DIGITS_BATCH = 64
DIGITS_HPO_EXAMPLES = 297
TOO_SMALL_LR = 1e-4


def _config(**overrides):
  config = hpo.default_config()
  config.update(overrides)
  return config


# ------------------------------------------------ float64 finite differences
def _mlp_problem(dtype):
  """A tiny tanh MLP, a training batch and a separate HPO batch."""
  keys = jax.random.split(jax.random.key(0), 6)
  params = {'w1': jax.random.normal(keys[0], (5, 7), dtype),
            'b1': 0.1 * jax.random.normal(keys[1], (7,), dtype),
            'w2': jax.random.normal(keys[2], (7, 3), dtype)}
  x = jax.random.normal(keys[3], (16, 5), dtype)
  xh = jax.random.normal(keys[4], (16, 5), dtype)
  y = jax.random.randint(keys[5], (16,), 0, 3)
  yh = (y + 1) % 3

  def loss(p, inputs, labels):
    logits = jnp.tanh(inputs @ p['w1'] + p['b1']) @ p['w2']
    return jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  return params, functools.partial(loss, inputs=x, labels=y), functools.partial(
      loss, inputs=xh, labels=yh)


@pytest.mark.parametrize('parameterization', ['log', 'linear'])
@pytest.mark.parametrize('momentum,nesterov', [(0.0, False), (0.9, False),
                                               (0.9, True)])
def test_hypergradient_matches_finite_differences(momentum, nesterov,
                                                  parameterization):
  with jax.enable_x64(True):
    config = _config(parameterization=parameterization, lr_bounds=(1e-3, 1.0),
                     wd_bounds=(1e-3, 0.1), init_lr=0.3, init_wd=0.05)
    params, train_loss, hpo_loss = _mlp_problem(jnp.float64)
    # A threshold below the gradient norm, so clipping is active.
    tx = hpo.make_inner_optimizer(momentum=momentum, nesterov=nesterov,
                                  grad_clip=0.5,
                                  hyperparam_dtype=jnp.float64)
    state = hpo.init_hpo(config, params, dtype=jnp.float64)
    hparams = hpo.current_hparams(state, config)
    assert hparams['learning_rate'].dtype == jnp.float64
    opt_state = tx.init(params)
    # Warm-up: a non-zero momentum buffer and θ_1 ≠ θ_0.
    params, opt_state = hpo.inner_step(tx, params, jax.grad(train_loss)(params),
                                       opt_state, hparams)
    grads = jax.grad(train_loss)(params)
    assert float(optax.tree.norm(grads)) > 0.5
    loss_fn = lambda p: (hpo_loss(p), None)

    new_params, _, hypergrad, loss, _ = jax.jit(
        lambda *args: hpo.exact_hypergradient(
            functools.partial(hpo.inner_step, tx, *args[:3]), loss_fn,
            args[3], config))(params, grads, opt_state, state)

    @jax.jit
    def one_step_loss(raw):
      p, _ = hpo.inner_step(tx, params, grads, opt_state,
                            hpo.to_hparams(raw, config))
      return hpo_loss(p)

    np.testing.assert_allclose(loss, one_step_loss(state.raw), rtol=1e-12)
    for name in hpo.HPARAM_NAMES:
      bump = {n: jnp.where(n == name, FD_EPS, 0.0) for n in state.raw}
      plus = jax.tree.map(jnp.add, state.raw, bump)
      minus = jax.tree.map(jnp.subtract, state.raw, bump)
      fd = (one_step_loss(plus) - one_step_loss(minus)) / (2 * FD_EPS)
      assert abs(float(fd)) > 1e-6, name  # a non-trivial check
      np.testing.assert_allclose(hypergrad[name], fd, rtol=FD_RTOL,
                                 err_msg=name)

    # The online path's tangents give the same number from ∇L(θ⁺).
    _, _, tangents = hpo.online_tangents(
        functools.partial(hpo.inner_step, tx, params, grads, opt_state),
        state, config)
    online = hpo.online_hypergradient(
        state.replace(tangents=tangents), jax.grad(hpo_loss)(new_params))
    for name in hpo.HPARAM_NAMES:
      np.testing.assert_allclose(online[name], hypergrad[name], rtol=1e-10)

    # The reference's closed form ∂L/∂wd = −lr·⟨∇L(θ⁺), θ⟩ (no Nesterov).
    if not nesterov:
      lr, wd = hparams['learning_rate'], hparams['weight_decay']
      dwd = -lr * optax.tree.vdot(jax.grad(hpo_loss)(new_params), params)
      chain = wd if parameterization == 'log' else 1.0
      np.testing.assert_allclose(hypergrad['weight_decay'], chain * dwd,
                                 rtol=1e-10)


def _reference_sgd_step(params, grads, buf, lr, wd, momentum, nesterov,
                        grad_clip):
  """The reference's hand-written SGD step (`SGD_STEP`), with torch's
  Nesterov: d = clip(g) + wd·θ, buf = μ·buf + d (buf = d at the first
  step), θ⁺ = θ − lr·buf (Nesterov: θ − lr·(d + μ·buf)).

  Returns (θ⁺, buf, the step direction θ⁺ = θ − lr·direction).
  """
  norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
  scale = min(1.0, grad_clip / norm)
  d = jax.tree.map(lambda g, p: scale * g + wd * p, grads, params)
  buf = d if buf is None else jax.tree.map(lambda b, e: momentum * b + e, buf,
                                           d)
  direction = (jax.tree.map(lambda e, b: e + momentum * b, d, buf)
               if nesterov else buf)
  return (jax.tree.map(lambda p, u: p - lr * u, params, direction), buf,
          direction)


# (learning rate, weight decay) of each step: η changes between steps, as
# it does under HPO, so each step must use the momentum buffer it inherits.
REFERENCE_STEPS = ((0.3, 0.05), (0.2, 0.08), (0.25, 0.03))
REFERENCE_MOMENTUM = 0.9
REFERENCE_CLIP = 0.5


@pytest.mark.parametrize('nesterov', [False, True])
def test_inner_step_follows_reference_sgd(nesterov):
  """θ's optimizer is the reference step over several steps (momentum
  buffer carried, clipping active, decay before momentum), and the exact
  hypergradient is the closed form ∂L/∂lr = −⟨∇L(θ⁺), direction⟩ (the
  reference's −⟨∇L(θ⁺), buf⟩ without Nesterov), ∂L/∂wd = −lr·c·⟨∇L(θ⁺), θ⟩
  with c = 1 (1 + μ with Nesterov)."""
  with jax.enable_x64(True):
    config = _config(parameterization='linear', lr_bounds=(0.0, 1.0),
                     wd_bounds=(0.0, 1.0))
    params, train_loss, hpo_loss = _mlp_problem(jnp.float64)
    tx = hpo.make_inner_optimizer(momentum=REFERENCE_MOMENTUM,
                                  nesterov=nesterov, grad_clip=REFERENCE_CLIP,
                                  hyperparam_dtype=jnp.float64)
    opt_state = tx.init(params)
    state = hpo.init_hpo(config, dtype=jnp.float64)
    ref_params, buf = params, None
    for lr, wd in REFERENCE_STEPS:
      grads = jax.grad(train_loss)(params)
      assert float(optax.tree.norm(grads)) > REFERENCE_CLIP
      state = state.replace(raw={'learning_rate': jnp.float64(lr),
                                 'weight_decay': jnp.float64(wd)})
      update_fn = functools.partial(hpo.inner_step, tx, params, grads,
                                    opt_state)
      new_params, new_opt_state, hypergrad, _, _ = hpo.exact_hypergradient(
          update_fn, lambda p: (hpo_loss(p), None), state, config)
      ref_params, buf, direction = _reference_sgd_step(
          ref_params, jax.grad(train_loss)(ref_params), buf, lr, wd,
          REFERENCE_MOMENTUM, nesterov, REFERENCE_CLIP)
      for name in params:
        np.testing.assert_allclose(new_params[name], ref_params[name],
                                   rtol=1e-12, atol=1e-14, err_msg=name)
      val_grad = jax.grad(hpo_loss)(new_params)
      np.testing.assert_allclose(
          hypergrad['learning_rate'], -optax.tree.vdot(val_grad, direction),
          rtol=1e-10)
      wd_factor = 1 + REFERENCE_MOMENTUM if nesterov else 1.0
      np.testing.assert_allclose(
          hypergrad['weight_decay'],
          -lr * wd_factor * optax.tree.vdot(val_grad, params), rtol=1e-10)
      params, opt_state = new_params, new_opt_state


def test_x64_is_not_left_on():
  assert not jax.config.jax_enable_x64
  assert jnp.zeros(()).dtype == jnp.float32


# ------------------------------------------- logistic regression on digits
@pytest.fixture(scope='module')
def digits():
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  n_train = len(y) - DIGITS_HPO_EXAMPLES
  rng = np.random.default_rng(0)
  train_idx = rng.integers(0, n_train, (DIGITS_STEPS, DIGITS_BATCH))
  hpo_idx = rng.integers(n_train, len(y), (DIGITS_STEPS, DIGITS_BATCH))
  return dict(x=jnp.asarray(x), y=jnp.asarray(y), n_train=n_train,
              train_idx=jnp.asarray(train_idx), hpo_idx=jnp.asarray(hpo_idx))


def _logreg_loss(params, x, y):
  logits = x @ params['w'] + params['b']
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


DIGITS_CONFIG = dict(lr_bounds=(1e-5, 4.0), wd_bounds=(1e-6, 1e-2),
                     init_lr=TOO_SMALL_LR, init_wd=1e-4, meta_lr=0.05)
DIGITS_TX = hpo.make_inner_optimizer(momentum=0.9, nesterov=False,
                                     grad_clip=5.0)


def _digits_run(data, config):
  """Trains for DIGITS_STEPS; config None: the fixed initial η."""
  params = {'w': jnp.zeros((64, 10)), 'b': jnp.zeros((10,))}
  hpo_config = config or _config(**DIGITS_CONFIG)
  hstate = hpo.init_hpo(hpo_config, params)
  x, y = data['x'], data['y']

  def step(carry, idx):
    params, opt_state, hstate = carry
    tr, ho = idx
    grads = jax.grad(_logreg_loss)(params, x[tr], y[tr])
    if config is None:
      params, opt_state = hpo.inner_step(
          DIGITS_TX, params, grads, opt_state,
          hpo.current_hparams(hstate, hpo_config))
      return (params, opt_state, hstate), {}
    loss_fn = lambda p: (_logreg_loss(p, x[ho], y[ho]), None)
    params, opt_state, hstate, metrics, _ = hpo.hpo_step(
        DIGITS_TX, params, grads, opt_state, hstate, config, loss_fn)
    return (params, opt_state, hstate), metrics

  (params, _, hstate), metrics = jax.lax.scan(
      step, (params, DIGITS_TX.init(params), hstate),
      (data['train_idx'], data['hpo_idx']))
  n = data['n_train']
  return _logreg_loss(params, x[:n], y[:n]), hstate, metrics


@pytest.fixture(scope='module')
def digits_runs(digits):
  run = lambda config: jax.jit(lambda: _digits_run(digits, config))()
  return {'fixed': run(None),
          'exact': run(_config(**DIGITS_CONFIG, mode='exact')),
          'online': run(_config(**DIGITS_CONFIG, mode='online'))}


@pytest.mark.parametrize('mode', ['exact', 'online'])
def test_digits_learning_rate_grows_and_beats_fixed(digits_runs, mode):
  fixed_loss, _, _ = digits_runs['fixed']
  loss, hstate, metrics = digits_runs[mode]
  lr = np.asarray(metrics['learning_rate'])
  wd = np.asarray(metrics['weight_decay'])
  assert lr[-1] > 100 * TOO_SMALL_LR
  assert float(loss) < 0.5 * float(fixed_loss)
  lr_lo, lr_hi = DIGITS_CONFIG['lr_bounds']
  wd_lo, wd_hi = DIGITS_CONFIG['wd_bounds']
  assert np.all((lr >= lr_lo * (1 - 1e-6)) & (lr <= lr_hi * (1 + 1e-6)))
  assert np.all((wd >= wd_lo * (1 - 1e-6)) & (wd <= wd_hi * (1 + 1e-6)))
  # Online mode has no tangents at the first step: nothing moves there.
  first_real = 1 if mode == 'online' else 0
  assert np.all(np.asarray(metrics['updated'])[:first_real] == 0.0)
  assert np.all(np.asarray(metrics['updated'])[first_real:] == 1.0)
  assert int(hstate.nonfinite_count) == 0
  assert int(hstate.step) == DIGITS_STEPS


def test_nan_hypergradient_leaves_eta_unchanged(digits):
  config = _config(**DIGITS_CONFIG)
  params = {'w': jnp.zeros((64, 10)), 'b': jnp.zeros((10,))}
  x, y = digits['x'][:DIGITS_BATCH], digits['y'][:DIGITS_BATCH]
  grads = jax.grad(_logreg_loss)(params, x, y)
  hstate = hpo.init_hpo(config)
  nan_loss = lambda p: (_logreg_loss(p, x, y) * jnp.nan, None)
  _, _, new_state, metrics, _ = jax.jit(
      lambda *args: hpo.hpo_step(DIGITS_TX, *args, config, nan_loss))(
          params, grads, DIGITS_TX.init(params), hstate)
  for name in hpo.HPARAM_NAMES:
    assert new_state.raw[name] == hstate.raw[name]
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                      new_state.meta_opt_state, hstate.meta_opt_state)
  assert all(jax.tree.leaves(same))
  assert int(new_state.nonfinite_count) == 1
  assert int(metrics['nonfinite_count']) == 1
  assert float(metrics['updated']) == 0.0
  assert float(metrics['hypergrad_lr']) == 0.0
  # A later finite hypergradient moves η again; the count stays.
  later, metrics = hpo.update_hpo(
      new_state, {'learning_rate': jnp.float32(-1.0),
                  'weight_decay': jnp.float32(1.0)}, config)
  assert later.raw['learning_rate'] > hstate.raw['learning_rate']
  assert later.raw['weight_decay'] < hstate.raw['weight_decay']
  assert int(metrics['nonfinite_count']) == 1


# ----------------------------------------------- bounds, windows, config
def test_linear_parameterization_clips_to_bounds():
  config = _config(parameterization='linear', meta_optimizer='sgd',
                   meta_lr=1.0, lr_bounds=(0.0, 0.2), wd_bounds=(1e-4, 1e-3))
  state = hpo.init_hpo(config)
  hparams = hpo.current_hparams(state, config)
  np.testing.assert_allclose(hparams['learning_rate'], 0.1)
  np.testing.assert_allclose(hparams['weight_decay'], 5.5e-4)
  state, metrics = hpo.update_hpo(
      state, {'learning_rate': jnp.float32(-1e3),
              'weight_decay': jnp.float32(1e3)}, config)
  assert float(metrics['learning_rate']) == np.float32(0.2)
  assert float(metrics['weight_decay']) == np.float32(1e-4)
  state, metrics = hpo.update_hpo(
      state, {'learning_rate': jnp.float32(1e3),
              'weight_decay': jnp.float32(-1e3)}, config)
  assert float(metrics['learning_rate']) == 0.0
  assert float(metrics['weight_decay']) == np.float32(1e-3)


def test_log_parameterization_starts_at_geometric_midpoint():
  config = _config(lr_bounds=(1e-4, 1.0), wd_bounds=(1e-6, 1e-2))
  hparams = hpo.current_hparams(hpo.init_hpo(config), config)
  np.testing.assert_allclose(hparams['learning_rate'], 1e-2, rtol=1e-6)
  np.testing.assert_allclose(hparams['weight_decay'], 1e-4, rtol=1e-6)


def test_update_every_moves_eta_only_on_multiples_of_k():
  k = 3
  config = _config(parameterization='linear', meta_optimizer='sgd',
                   meta_lr=0.01, update_every=k, lr_bounds=(0.0, 1.0),
                   wd_bounds=(0.0, 1.0))
  state = hpo.init_hpo(config)
  update = jax.jit(lambda s, g: hpo.update_hpo(s, g, config))
  # Call 2 is NaN: skipped, so the first window's mean is (1 + 3) / 2.
  grads = [1.0, np.nan, 3.0, 4.0, 5.0, 6.0, 7.0]
  expected_lr = 0.5
  for call, g in enumerate(grads, start=1):
    before = float(state.raw['learning_rate'])
    state, metrics = update(state, {'learning_rate': jnp.float32(g),
                                    'weight_decay': jnp.float32(0.0)})
    after = float(state.raw['learning_rate'])
    if call % k == 0:
      window = [v for v in grads[call - k:call] if np.isfinite(v)]
      expected_lr -= 0.01 * np.mean(window)
      assert after != before
      assert float(metrics['updated']) == 1.0
    else:
      assert after == before
      assert float(metrics['updated']) == 0.0
    np.testing.assert_allclose(after, expected_lr, rtol=1e-6)
  assert int(state.nonfinite_count) == 1


@pytest.mark.parametrize('overrides,message', [
    (dict(wd_bounds=(0.0, 1e-3)), 'lower bound > 0'),
    (dict(lr_bounds=(0.5, 0.1)), 'lo <= hi'),
    (dict(init_lr=2.0), 'outside'),
    (dict(mode='offline'), 'hpo.mode'),
    (dict(update_every=0), 'update_every'),
])
def test_bad_config_is_rejected(overrides, message):
  with pytest.raises(ValueError, match=message):
    hpo.init_hpo(_config(**overrides))


def test_inner_optimizer_keeps_float32_hyperparams_under_bf16():
  params = {'w': jnp.ones((3,), jnp.bfloat16)}
  tx = hpo.make_inner_optimizer(momentum=0.9, nesterov=True, grad_clip=1.0)
  opt_state = tx.init(params)
  new_params, opt_state = hpo.inner_step(
      tx, params, params, opt_state,
      {'learning_rate': jnp.float32(0.1), 'weight_decay': jnp.float32(0.0)})
  assert opt_state.hyperparams['learning_rate'].dtype == jnp.float32
  assert new_params['w'].dtype == jnp.bfloat16


def test_online_first_step_is_skipped_and_the_first_real_one_full_size(
    digits):
  """No tangents at the first online step: η, Adam's state and the counters
  stay; the next step is Adam's first, which moves log η by ~meta_lr."""
  config = _config(**DIGITS_CONFIG, mode='online')
  params = {'w': 0.01 * jnp.ones((64, 10)), 'b': jnp.zeros((10,))}
  x, y = digits['x'], digits['y']
  batches = [(x[k * DIGITS_BATCH:(k + 1) * DIGITS_BATCH],
              y[k * DIGITS_BATCH:(k + 1) * DIGITS_BATCH]) for k in range(2)]
  step = jax.jit(lambda *args: hpo.hpo_step(DIGITS_TX, *args, config))
  hstate = hpo.init_hpo(config, params)
  opt_state = DIGITS_TX.init(params)
  states = [hstate]
  for xb, yb in batches:
    grads = jax.grad(_logreg_loss)(params, xb, yb)
    params, opt_state, hstate, metrics, _ = step(params, grads, opt_state,
                                                 hstate)
    states.append(hstate)
  first, second = states[1], states[2]
  assert first.raw == states[0].raw
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                      first.meta_opt_state, states[0].meta_opt_state)
  assert all(jax.tree.leaves(same))
  assert int(first.accum_count) == 0 and int(first.nonfinite_count) == 0
  assert int(first.step) == 1
  assert float(metrics['updated']) == 1.0
  # (The weight decay's hypergradient here, ~1e-9, is below Adam's eps.)
  moved = abs(float(second.raw['learning_rate'] - first.raw['learning_rate']))
  np.testing.assert_allclose(moved, config.meta_lr, rtol=1e-3)


@pytest.mark.parametrize('mode', ['exact', 'online'])
def test_component_hypergradient_is_reference_closed_form(digits, mode):
  """The component reads the step's context as the hypergradient needs:
  ∂L/∂log lr = −lr·⟨∇L(θ⁺), buf⟩ with L the held-out loss at θ⁺ (exact) or
  the next training batch's loss (online, one step stale)."""
  config = _config(**DIGITS_CONFIG, mode=mode)
  params = {'w': 0.01 * jnp.ones((64, 10)), 'b': jnp.zeros((10,))}
  x, y = digits['x'][:DIGITS_BATCH], digits['y'][:DIGITS_BATCH]
  xh, yh = digits['x'][-DIGITS_BATCH:], digits['y'][-DIGITS_BATCH:]
  component = hpo.make_component(config, params)
  hstate = component.init(jax.random.key(0))
  opt_state = DIGITS_TX.init(params)

  def context(params, grads, opt_state):
    return StepContext(
        step=hstate.step, key=jax.random.key(1), per_example_loss=None,
        grads=None, stash=None, params=params, param_grads=grads,
        inner_update=lambda hp: hpo.inner_step(DIGITS_TX, params, grads,
                                               opt_state, hp)[0],
        heldout_loss=lambda p: _logreg_loss(p, xh, yh))

  grads = jax.grad(_logreg_loss)(params, x, y)
  lr = float(component.hyperparams(hstate)['learning_rate'])
  new_params, new_opt_state = hpo.inner_step(
      DIGITS_TX, params, grads, opt_state, component.hyperparams(hstate))
  # The reference's buf after one step from θ (the buffer starts at zero).
  buf = jax.tree.map(lambda a, b: -(a - b) / lr, new_params, params)
  hstate, metrics = component.update(hstate, context(params, grads,
                                                     opt_state))
  if mode == 'exact':
    val_grad = jax.grad(_logreg_loss)(new_params, xh, yh)
    np.testing.assert_allclose(metrics['hpo_loss'],
                               _logreg_loss(new_params, xh, yh), rtol=1e-6)
  else:
    assert float(metrics['updated']) == 0.0
    # The next step's training gradient at θ⁺ gives the hypergradient.
    val_grad = jax.grad(_logreg_loss)(new_params, xh, yh)
    _, metrics = component.update(
        hstate, context(new_params, val_grad, new_opt_state))
  assert float(metrics['updated']) == 1.0
  expected = -lr * float(optax.tree.vdot(val_grad, buf))
  assert abs(expected) > 1e-6
  np.testing.assert_allclose(metrics['hypergrad_lr'], expected, rtol=1e-4)


@pytest.mark.parametrize('mode', ['exact', 'online'])
def test_state_checkpoints_with_orbax(tmp_path, mode):
  config = _config(mode=mode)
  params = {'w': jnp.ones((3, 2))}
  state, _ = hpo.update_hpo(
      hpo.init_hpo(config, params), {'learning_rate': jnp.float32(1.0),
                                     'weight_decay': jnp.float32(-1.0)},
      config)
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    manager.save(0, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    restored = manager.restore(0, args=ocp.args.StandardRestore(
        hpo.init_hpo(config, params)))
  assert isinstance(restored, hpo.HPOState)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), restored, state)
  assert all(jax.tree.leaves(same))


def test_online_state_leaves_are_distinct_buffers():
  """A donated state must not hold one buffer twice (jit would refuse it)."""
  config = hpo.default_config()
  config.mode = 'online'
  state = hpo.init_hpo(config, {'w': jnp.ones((3,)), 'b': jnp.ones(())})
  leaves = jax.tree.leaves(state)
  assert len({id(x) for x in leaves}) == len(leaves)
