"""Tests of the ISTA-NAS math: (F)ISTA, Eq. 7, the support, the search state."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

from dha_jax.nas import component as nas_component
from dha_jax.nas import ista
from dha_jax.nas import mobilenet_space as ms
from dha_jax.nas import search_space as ss
from dha_jax.nas import spaces

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('ista_test')

M = ista.DEFAULT_PROJ_DIMS
NODE_SIZES = tuple(len(ss.ISTA_PRIMITIVES) * ss.num_edges(i)
                   for i in range(ss.NUM_NODES))  # 14, 21, 28, 35
# A moderately regularised problem that plain ISTA also solves within
# DEFAULT_MAX_ITERS (sklearn's alpha; λ = m·alpha).
MODERATE_ALPHA, MODERATE_SCALE = 1e-3, 0.1
# The reference's Lasso(alpha=1e-5) on a freshly initialised code.
REFERENCE_SCALE = ista.DEFAULT_B_INIT_SCALE
# Measured worst cases are 1.5e-4 (solution) and 2e-9 (objective).
SOLUTION_RTOL = 1e-3
OBJECTIVE_RTOL = 1e-6


@pytest.fixture(scope='module')
def solve():
  return jax.jit(ista.ista, static_argnames=('accelerated',))


@pytest.fixture(scope='module')
def state():
  return ista.init_ista(jax.random.key(0))


def _problem(n, scale, seed=0):
  rng = np.random.default_rng(seed + n)
  return rng.random((M, n)), scale * rng.standard_normal(M)


def _objective(A, b, x, lam):
  x = np.asarray(x, np.float64)
  return 0.5 * np.sum((A @ x - b) ** 2) + lam * np.abs(x).sum()


@functools.lru_cache(maxsize=None)
def _sklearn(n, scale, alpha):
  """sklearn's Lasso minimises (1/2m)‖Ax − b‖² + alpha‖x‖₁: λ = m·alpha."""
  A, b = _problem(n, scale)
  lasso = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=10**6)
  return lasso.fit(A, b).coef_


def _check_against_sklearn(solve, n, scale, alpha, accelerated):
  A, b = _problem(n, scale)
  lam = M * alpha
  result = solve(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32),
                 lam, accelerated=accelerated)
  assert result.num_iters <= ista.DEFAULT_MAX_ITERS
  x, x_ref = np.asarray(result.x, np.float64), _sklearn(n, scale, alpha)
  np.testing.assert_array_less(
      np.linalg.norm(x - x_ref), SOLUTION_RTOL * np.linalg.norm(x_ref))
  ref_obj = _objective(A, b, x_ref, lam)
  assert _objective(A, b, x, lam) <= ref_obj * (1 + OBJECTIVE_RTOL)


def test_soft_threshold():
  z = jnp.array([-3.0, -0.5, 0.0, 0.5, 2.0])
  np.testing.assert_allclose(ista.soft_threshold(z, 1.0),
                             [-2.0, 0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize('accelerated', [False, True])
@pytest.mark.parametrize('n', NODE_SIZES)
def test_matches_sklearn_lasso(solve, n, accelerated):
  _check_against_sklearn(solve, n, MODERATE_SCALE, MODERATE_ALPHA,
                         accelerated)


@pytest.mark.parametrize('n', NODE_SIZES)
def test_fista_matches_sklearn_at_reference_scale(solve, n):
  _check_against_sklearn(solve, n, REFERENCE_SCALE,
                         ista.REFERENCE_LASSO_ALPHA, accelerated=True)


def test_fista_converges_in_fewer_iterations(solve):
  """Iterations until the objective is within 1e-6 of sklearn's optimum."""
  budgets = [250 * 2**k for k in range(10)]  # up to 128k

  def iterations_needed(A, b, lam, optimum, accelerated):
    for budget in budgets:
      x = solve(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32),
                lam, max_iters=budget, tol=0.0, accelerated=accelerated).x
      if _objective(A, b, x, lam) <= optimum * (1 + OBJECTIVE_RTOL):
        return budget
    return np.inf

  for n in NODE_SIZES:
    A, b = _problem(n, MODERATE_SCALE)
    lam = M * MODERATE_ALPHA
    optimum = _objective(A, b, _sklearn(n, MODERATE_SCALE, MODERATE_ALPHA),
                         lam)
    fista_iters = iterations_needed(A, b, lam, optimum, True)
    assert fista_iters < iterations_needed(A, b, lam, optimum, False), n
    assert fista_iters < budgets[-1]


def test_warm_start_and_stopping(solve):
  A, b = (jnp.asarray(v, jnp.float32) for v in _problem(21, MODERATE_SCALE))
  lam = M * MODERATE_ALPHA
  cold = solve(A, b, lam, accelerated=False)
  assert bool(cold.converged) and cold.num_iters < ista.DEFAULT_MAX_ITERS
  warm = solve(A, b, lam, x0=cold.x, accelerated=False)
  assert warm.num_iters < 10
  np.testing.assert_allclose(warm.x, cold.x, atol=1e-7)
  capped = solve(A, b, lam, max_iters=5, accelerated=False)
  assert int(capped.num_iters) == 5 and not bool(capped.converged)
  # λ ≥ ‖Aᵀb‖∞ makes 0 the solution: one step, exactly zero.
  big = solve(A, b, float(jnp.max(jnp.abs(A.T @ b))) * 2, accelerated=True)
  assert int(big.num_iters) == 1 and not np.any(np.asarray(big.x))


def test_projection_is_eq7_and_the_reference_form():
  ops = ss.ISTA_PRIMITIVES
  rng = np.random.default_rng(7)
  A = rng.random((M, NODE_SIZES[2]))
  b, x = rng.standard_normal(M), rng.standard_normal(NODE_SIZES[2])
  support = ista.select_support(x, ops)
  mask = np.zeros(x.shape, bool)
  mask[[e * len(ops) + ops.index(o) for e, o in support]] = True
  alpha = np.asarray(ista.project_alpha(*(jnp.asarray(v, jnp.float32)
                                          for v in (A, b, x)), mask))
  # The reference (`sample_and_proj`, `proj_alphas`): E = AᵀA − I, x, A and
  # E zeroed off S, α = bᵀA_S − (E_Sᵀ x̃).
  E = A.T @ A - np.eye(A.shape[1])
  x_s, a_s, e_s = x * mask, A * mask, E * mask
  reference = a_s.T @ b - e_s.T @ x_s
  np.testing.assert_allclose(alpha[mask], reference[mask], rtol=1e-5)
  np.testing.assert_allclose(alpha[mask], (x_s + a_s.T @ (b - a_s @ x_s))[mask],
                             rtol=1e-5)
  assert np.all(alpha[~mask] == 0.0)
  # x off the support is ignored; ∂α/∂b = A_Sᵀ on S and exactly 0 off it.
  x_other = np.where(mask, x, 100.0)
  np.testing.assert_array_equal(
      ista.project_alpha(*(jnp.asarray(v, jnp.float32)
                           for v in (A, b, x_other)), mask), alpha)
  jac = np.asarray(jax.jacobian(ista.project_alpha, argnums=1)(
      *(jnp.asarray(v, jnp.float32) for v in (A, b, x)), mask))
  np.testing.assert_allclose(jac[mask], A.T[mask], rtol=1e-6)
  assert np.all(jac[~mask] == 0.0)


def _node_code(scores, ops):
  """x for a node from {(edge, op): value}, zeros elsewhere."""
  n_edges = 1 + max(e for e, _ in scores)
  x = np.zeros((n_edges, len(ops)))
  for (edge, op), value in scores.items():
    x[edge, ops.index(op)] = value
  return x.reshape(-1)


def test_support_top2_edges_signed_argmax_all_ops():
  ops = ss.ISTA_PRIMITIVES
  x = _node_code({(0, 'sep_conv_3x3'): 0.3, (0, 'skip_connect'): 0.2,
                  (1, 'dil_conv_5x5'): 0.9,   # the last op is selectable
                  (2, 'max_pool_3x3'): -5.0,  # signed: large |x| loses
                  (3, 'avg_pool_3x3'): 0.4, (3, 'sep_conv_5x5'): 0.1}, ops)
  assert ista.select_support(x, ops) == ((1, 'dil_conv_5x5'),
                                         (3, 'avg_pool_3x3'))
  assert ista.select_support(x, ops, k_edges=3) == (
      (0, 'sep_conv_3x3'), (1, 'dil_conv_5x5'), (3, 'avg_pool_3x3'))


def test_support_never_picks_none_and_breaks_ties_deterministically():
  ops = ss.primitives(include_none=True)
  x = _node_code({(0, 'none'): 9.0, (0, 'skip_connect'): 0.5,
                  (1, 'none'): 8.0, (2, 'none'): 7.0}, ops)
  # Edges 1 and 2 score 0 on every allowed op: the lower edge and the
  # earliest allowed op win the tie.
  assert ista.select_support(x, ops) == ((0, 'skip_connect'),
                                         (1, 'max_pool_3x3'))
  assert ista.select_support(np.zeros(5 * len(ops)), ops) == (
      (0, 'max_pool_3x3'), (1, 'max_pool_3x3'))


@pytest.mark.parametrize('x,kwargs,match', [
    (np.zeros(15), {}, 'vector of'),
    (np.full(14, np.nan), {}, 'non-finite'),
    (np.zeros(14), {'k_edges': 3}, 'k_edges'),
    (np.zeros(14), {'excluded_ops': ss.ISTA_PRIMITIVES}, 'every op'),
])
def test_support_errors(x, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ista.select_support(x, ss.ISTA_PRIMITIVES, **kwargs)


def test_config_errors():
  with pytest.raises(ValueError, match='k_edges'):
    ista.IstaConfig(k_edges=3)
  with pytest.raises(ValueError, match='excluded_ops'):
    ista.IstaConfig(ops=('none',))


def test_init(state, solve):
  config = state.config
  for cell in ss.CELL_TYPES:
    assert len(state.A[cell]) == ss.NUM_NODES
    for i, n in enumerate(NODE_SIZES):
      A, b, x = state.A[cell][i], state.b[cell][i], state.x[cell][i]
      assert A.shape == (M, n) and b.shape == (M,) and x.shape == (n,)
      assert 0.0 <= float(A.min()) and float(A.max()) < 1.0
      assert 0.0 < float(jnp.abs(b).max()) < 10 * config.b_init_scale
      np.testing.assert_allclose(
          x, solve(A, b, config.lam, accelerated=config.accelerated).x,
          atol=1e-9)
      assert not bool(state.frozen[cell][i])
  assert not np.array_equal(state.A['normal'][0], state.A['reduce'][0])
  assert state.support_dict == ista.support_from_codes(state.x, config)
  assert ista.sync_support(state).support == state.support
  assert not ista.all_frozen(state)


def test_architecture_from_codes(state):
  arch = jax.jit(ista.architecture_from_codes)(state, state.b)
  assert arch.support == state.support
  ops = state.config.ops
  for cell in ss.CELL_TYPES:
    for i, node in enumerate(state.support_dict[cell]):
      assert len(node) == 2 and node[0][0] != node[1][0]
      idx = np.array([e * len(ops) + ops.index(o) for e, o in node])
      mask = np.zeros(NODE_SIZES[i], bool)
      mask[idx] = True
      full = ista.project_alpha(state.A[cell][i], state.b[cell][i],
                                state.x[cell][i], mask)
      np.testing.assert_allclose(arch.weights[cell][i], full[idx], rtol=1e-6)
  # ∂(Σ α)/∂b_i = Σ_{j∈S_i} A_j, through the jitted function.
  grad = jax.grad(lambda b: sum(
      jnp.sum(w) for w in jax.tree.leaves(
          ista.architecture_from_codes(state, b))))(state.b)
  node = state.support_dict['reduce'][3]
  cols = np.array([e * len(ops) + ops.index(o) for e, o in node])
  np.testing.assert_allclose(grad['reduce'][3],
                             state.A['reduce'][3][:, cols].sum(1), rtol=1e-5)


def test_jit_retraces_exactly_when_the_support_changes(state):
  traces = []

  def arch_fn(s, b):
    traces.append(None)
    return ista.architecture_from_codes(s, b)

  jitted = jax.jit(arch_fn)
  first = jitted(state, state.b)
  other_b = jax.tree.map(lambda v: v + 1.0, state.b)
  assert jax.tree.structure(jitted(state, other_b)) == jax.tree.structure(first)
  # Scaling x by a positive factor keeps every argmax: same support.
  scaled = ista.sync_support(state.replace(
      x=jax.tree.map(lambda v: 2.0 * v, state.x)))
  assert scaled.support == state.support
  jitted(scaled, state.b)
  assert len(traces) == 1
  flipped = ista.sync_support(state.replace(
      x=jax.tree.map(lambda v: -v, state.x)))
  assert flipped.support != state.support
  assert jax.tree.structure(jitted(flipped, state.b)) != jax.tree.structure(
      first)
  assert len(traces) == 2


def _perturb(b, cell, node, scale, seed):
  """b with one node's code moved by scale·N(0, 1)."""
  noise = scale * jax.random.normal(jax.random.key(seed), b[cell][node].shape)
  nodes = list(b[cell])
  nodes[node] = nodes[node] + noise
  return {**b, cell: tuple(nodes)}


def test_freezing(state, solve):
  config = state.config
  # The first recovery, after epoch 0, freezes every node whose x̂ did not
  # move since init_ista (the reference's postrain(0) → show_selected(1)).
  first, report = ista.recover(state, epoch=0)
  assert report['distances']['normal'] == [0.0] * ss.NUM_NODES
  assert len(report['newly_frozen']) == 2 * ss.NUM_NODES
  assert ista.all_frozen(first)
  # may_freeze=False (nas.min_freeze_steps not reached) keeps them active.
  s0, report = ista.recover(state, epoch=0, may_freeze=False)
  assert not report['newly_frozen'] and not ista.all_frozen(s0)
  assert not report['refused'] and not report['support_changed']
  assert report['ista_iters']['normal'][0] > 0

  # Epoch 1: every node whose b did not move freezes; normal/2 moved.
  moved = _perturb(state.b, 'normal', 2, 0.1, seed=1)
  s1, report = ista.recover(s0, moved, epoch=1)
  assert report['distances']['normal'][2] > ista.DEFAULT_DIST_LIMIT
  assert report['frozen']['normal'] == [True, True, False, True]
  assert report['frozen']['reduce'] == [True] * ss.NUM_NODES
  assert ['normal', 2] not in report['newly_frozen']
  assert len(report['newly_frozen']) == 2 * ss.NUM_NODES - 1
  x_expected = solve(state.A['normal'][2], moved['normal'][2], config.lam,
                     accelerated=config.accelerated).x
  np.testing.assert_allclose(s1.x['normal'][2], x_expected, atol=1e-9)
  assert s1.support_dict == ista.support_from_codes(s1.x, config)
  assert s1.b is moved

  # Frozen nodes keep x and stay frozen whatever their b does.
  moved_again = _perturb(moved, 'reduce', 0, 1.0, seed=2)
  s2, report = ista.recover(s1, moved_again, epoch=2)
  assert report['distances']['reduce'][0] is None
  assert report['frozen']['reduce'][0]
  np.testing.assert_array_equal(s2.x['reduce'][0], state.x['reduce'][0])
  # normal/2's b did not move since epoch 1: it freezes now.
  assert report['newly_frozen'] == [['normal', 2]]
  assert report['all_frozen'] and ista.all_frozen(s2)


def test_freezing_threshold_is_inclusive(state):
  moved = _perturb(state.b, 'reduce', 1, 1e-2, seed=3)
  _, report = ista.recover(state, moved, epoch=1)
  dist = report['distances']['reduce'][1]
  assert dist > 0
  _, at = ista.recover(state, moved, epoch=1, dist_limit=dist)
  _, below = ista.recover(state, moved, epoch=1, dist_limit=0.999 * dist)
  assert at['frozen']['reduce'][1] and not below['frozen']['reduce'][1]


def test_resource_constraint_refuses_the_update(state):
  # A large move of every code changes the support.
  moved = state.b
  for k, (cell, node) in enumerate(
      (c, i) for c in ss.CELL_TYPES for i in range(ss.NUM_NODES)):
    moved = _perturb(moved, cell, node, 1.0, seed=10 + k)
  seen = []

  def param_count(support):
    seen.append(support)
    return 4.0

  def budgets(params_mb, multiply_adds_m):
    return {'params_mb': ista.Budget(param_count, params_mb),
            'multiply_adds_m': ista.Budget(lambda s: 60.0, multiply_adds_m)}

  refused, report = ista.recover(state, moved, epoch=1,
                                 budgets=budgets(3.7, 100.0))
  assert report['refused'] and report['over_budget'] == ['params_mb']
  assert report['resources'] == {'params_mb': 4.0, 'multiply_adds_m': 60.0}
  assert seen == [report['candidate_support']]
  assert report['candidate_support'] != state.support_dict
  assert not report['support_changed'] and not report['newly_frozen']
  assert refused.support == state.support
  assert refused.b is moved
  for name in ('A', 'x', 'frozen'):
    jax.tree.map(np.testing.assert_array_equal, getattr(refused, name),
                 getattr(state, name))

  _, report = ista.recover(state, moved, epoch=1, budgets=budgets(4.0, 50.0))
  assert report['refused'] and report['over_budget'] == ['multiply_adds_m']

  accepted, report = ista.recover(state, moved, epoch=1,
                                  budgets=budgets(4.0, 60.0))
  assert not report['refused'] and report['support_changed']
  assert accepted.support_dict == report['candidate_support']


def test_zero_frozen(state):
  frozen = state.replace(frozen={
      'normal': (jnp.asarray(True),) + state.frozen['normal'][1:],
      'reduce': state.frozen['reduce']})
  ones = jax.tree.map(jnp.ones_like, state.b)
  out = jax.jit(ista.zero_frozen)(frozen, ones)
  assert not np.any(np.asarray(out['normal'][0]))
  for leaf in jax.tree.leaves(out)[1:]:
    np.testing.assert_array_equal(leaf, 1.0)


def test_checkpoint_round_trip_and_sync_support(state, tmp_path):
  """Orbax restores the array leaves; the support is recomputed from x."""
  ocp = pytest.importorskip('orbax.checkpoint')
  searched, _ = ista.recover(state, jax.tree.map(lambda v: -v, state.b),
                             epoch=1)
  assert searched.support != state.support
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(0, args=ocp.args.StandardSave(searched))
    manager.wait_until_finished()
    restored = manager.restore(0, args=ocp.args.StandardRestore(state))
  assert restored.support == state.support  # the template's metadata
  restored = ista.sync_support(restored)
  assert restored.support == searched.support
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(searched)):
    np.testing.assert_array_equal(got, want)


def test_mean_abs_alpha_does_not_depend_on_the_scale_of_b(state):
  normed = state.replace(config=dataclasses.replace(state.config,
                                                    alpha_norm='mean_abs'))
  arch = jax.jit(ista.architecture_from_codes)(normed, normed.b)
  plain = ista.architecture_from_codes(state, state.b)
  for got, ref in zip(jax.tree.leaves(arch), jax.tree.leaves(plain)):
    # Eq. 7': the same signs and ratios as Eq. 7, mean |α| = 1 per node.
    np.testing.assert_allclose(got, ref / np.mean(np.abs(ref)), rtol=1e-5)
    np.testing.assert_allclose(np.mean(np.abs(got)), 1.0, rtol=1e-5)
  # α is homogeneous in (b, x): a 1000x larger code gives the same network.
  scale = 1000.0
  big = normed.replace(b=jax.tree.map(lambda v: scale * v, normed.b),
                       x=jax.tree.map(lambda v: scale * v, normed.x))
  for got, ref in zip(jax.tree.leaves(ista.architecture_from_codes(
      big, big.b)), jax.tree.leaves(arch)):
    np.testing.assert_allclose(got, ref, rtol=1e-4)
  grads = jax.grad(lambda b: sum(jnp.sum(w[:1]) for w in jax.tree.leaves(
      ista.architecture_from_codes(normed, b))))(normed.b)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match='alpha_norm'):
    ista.IstaConfig(alpha_norm='l2')


def test_relative_freezing_is_scale_free_and_waits(state):
  moved = _perturb(state.b, 'normal', 1, 1e-4, seed=4)
  _, report = ista.recover(state, moved, epoch=1, freeze_rule='relative',
                           dist_limit=0.05)
  rel = report['relative_distances']['normal'][1]
  np.testing.assert_allclose(
      rel, report['distances']['normal'][1]
      / np.linalg.norm(np.asarray(ista._solve(
          state.A['normal'][1], moved['normal'][1], state.config).x)),
      rtol=1e-6)
  assert 0 < rel
  _, at = ista.recover(state, moved, epoch=1, freeze_rule='relative',
                       dist_limit=rel)
  _, below = ista.recover(state, moved, epoch=1, freeze_rule='relative',
                          dist_limit=0.999 * rel)
  assert at['frozen']['normal'][1] and not below['frozen']['normal'][1]
  # The absolute rule with the same limit freezes everything at this scale.
  _, absolute = ista.recover(state, moved, epoch=1, dist_limit=0.999 * rel)
  assert absolute['frozen']['normal'][1]
  # No node freezes while freezing is not allowed yet.
  _, waiting = ista.recover(state, moved, epoch=1, freeze_rule='relative',
                            dist_limit=1.0, may_freeze=False)
  assert not waiting['newly_frozen']
  with pytest.raises(ValueError, match='freeze_rule'):
    ista.recover(state, epoch=1, freeze_rule='never')


def test_changed_pairs_and_random_genotypes():
  support = ista.support_from_codes(
      ista.init_ista(jax.random.key(0)).x, ista.IstaConfig())
  assert ss.changed_pairs(support, support) == 0
  node = support['normal'][0]
  other = tuple(sorted({(e, o) for e, o in node} ^ {node[0]}
                       | {(node[0][0], 'skip_connect'
                          if node[0][1] != 'skip_connect' else 'max_pool_3x3')}))
  moved = {**support, 'normal': (other,) + support['normal'][1:]}
  assert ss.changed_pairs(support, moved) == 1
  draws = [ss.random_genotype(np.random.default_rng((0, k))) for k in range(5)]
  assert len(set(draws)) == 5
  for genotype in draws:
    assert ss.Genotype.from_json(genotype.to_json()) == genotype
  assert draws[0] == ss.random_genotype(np.random.default_rng((0, 0)))


# ----------------------------------------------------------------------------
# The MobileNet space: one problem per layer, one edge, 6 or 7 candidates.

TINY_STAGES = (2, 2, 0, 0, 0, 0)
LAYER_CODE_DIMS = 4


def _mobilenet_config(ops_per_layer=1):
  nas = nas_component.default_config()
  nas.proj_dims = LAYER_CODE_DIMS
  nas.max_iters = 20_000
  return nas_component.ista_config(
      nas, spaces.mobilenet(ms.network_plan(TINY_STAGES), ops_per_layer))


def test_lam_is_the_reference_weight_for_the_code_length():
  # sklearn's Lasso(alpha) divides the residual by m: λ = m·alpha.
  assert _mobilenet_config().lam == pytest.approx(
      LAYER_CODE_DIMS * ista.REFERENCE_LASSO_ALPHA)
  assert ista.IstaConfig().lam == pytest.approx(
      ista.DEFAULT_PROJ_DIMS * ista.REFERENCE_LASSO_ALPHA)
  assert ista.IstaConfig(proj_dims=4, lam=0.5).lam == 0.5


@pytest.fixture(scope='module')
def layer_state():
  return ista.init_ista(jax.random.key(0), _mobilenet_config())


def test_mobilenet_problems_are_per_layer(layer_state, solve):
  state, config = layer_state, layer_state.config
  (group, shapes), = config.groups
  assert group == ms.GROUP and set(state.A) == {ms.GROUP}
  for i, shape in enumerate(shapes):
    A, b, x = state.A[group][i], state.b[group][i], state.x[group][i]
    assert A.shape == (LAYER_CODE_DIMS, len(shape.ops)) == (
        LAYER_CODE_DIMS, 6 if i % 2 == 0 else 7)
    assert b.shape == (LAYER_CODE_DIMS,) and x.shape == (shape.size,)
    np.testing.assert_allclose(
        x, solve(A, b, config.lam, max_iters=config.max_iters,
                 accelerated=True).x, atol=1e-9)
    node = state.support_dict[group][i]
    assert len(node) == 1 and node[0][0] == 0 and node[0][1] in shape.ops
  # Eq. 7 per layer: α = x̂_o + A_oᵀ(b − A_o x̂_o), ∂α/∂b = A_o.
  arch = jax.jit(ista.architecture_from_codes)(state, state.b)
  grads = jax.grad(lambda b: sum(jnp.sum(w) for w in jax.tree.leaves(
      ista.architecture_from_codes(state, b))))(state.b)
  for i, ((_, op),) in enumerate(state.support_dict[group]):
    j = shapes[i].ops.index(op)
    A, b, x = state.A[group][i], state.b[group][i], state.x[group][i]
    np.testing.assert_allclose(arch.weights[group][i],
                               [x[j] + A[:, j] @ (b - A[:, j] * x[j])],
                               rtol=1e-5)
    np.testing.assert_allclose(grads[group][i], A[:, j], rtol=1e-5)


def test_mobilenet_recovery_finds_a_planted_op_in_every_layer(layer_state):
  """b = A·(c·e_op) in every layer: the recovered support is that op (m = 4
  measurements of 6-7 candidates; with this A every op is recovered)."""
  (group, shapes), = layer_state.config.groups
  for j, op in enumerate(ms.OPS):
    planted = {group: tuple(
        A @ (0.01 * jax.nn.one_hot(min(j, len(shape.ops) - 1), shape.size))
        for A, shape in zip(layer_state.A[group], shapes))}
    recovered, report = ista.recover(layer_state, planted, epoch=1,
                                     dist_limit=-1.0)
    assert not report['unconverged']
    expected = tuple(((0, shape.ops[min(j, len(shape.ops) - 1)]),)
                     for shape in shapes)
    assert recovered.support_dict[group] == expected, op


def test_mobilenet_layers_freeze_one_by_one(layer_state):
  moved = _perturb(layer_state.b, ms.GROUP, 1, 0.1, seed=5)
  state, report = ista.recover(layer_state, moved, epoch=1)
  assert report['frozen'][ms.GROUP] == [True, False, True, True]
  assert not ista.all_frozen(state)
  jax.tree.map(np.testing.assert_array_equal, state.x[ms.GROUP][0],
               layer_state.x[ms.GROUP][0])


def test_mobilenet_sparsity_keeps_k_ops_per_layer():
  state = ista.init_ista(jax.random.key(0), _mobilenet_config(2))
  arch = ista.architecture_from_codes(state, state.b)
  for i, node in enumerate(state.support_dict[ms.GROUP]):
    assert len(node) == 2 and {e for e, _ in node} == {0}
    ops = state.config.groups[0][1][i].ops
    order = np.argsort(-np.asarray(state.x[ms.GROUP][i]), kind='stable')
    assert {op for _, op in node} == {ops[k] for k in order[:2]}
    assert arch.weights[ms.GROUP][i].shape == (2,)


def test_select_support_top_ops_per_edge():
  ops = ms.OPS
  x = np.array([0.1, 0.5, 0.5, -1.0, 0.0, 0.2, 0.3])
  # Ties go to the earlier op; the support is sorted by op name.
  assert ista.select_support(x, ops, k_edges=1, excluded_ops=(),
                             ops_per_edge=1) == ((0, 'mbconv_3x3_e6'),)
  assert ista.select_support(x, ops, k_edges=1, excluded_ops=(),
                             ops_per_edge=3) == (
                                 (0, 'mbconv_3x3_e6'), (0, 'mbconv_5x5_e3'),
                                 (0, 'zero'))
  # With one op per edge, the cell rule is unchanged.
  cell_x = _node_code({(0, 'sep_conv_3x3'): 0.3, (1, 'dil_conv_5x5'): 0.9},
                      ss.ISTA_PRIMITIVES)
  assert ista.select_support(cell_x, ss.ISTA_PRIMITIVES, ops_per_edge=1) == (
      ista.select_support(cell_x, ss.ISTA_PRIMITIVES))
  with pytest.raises(ValueError, match='ops_per_edge'):
    ista.select_support(x, ops, k_edges=1, excluded_ops=('zero',),
                        ops_per_edge=7)


def test_layout_config_errors():
  layout = ms.layout(ms.network_plan(TINY_STAGES))
  with pytest.raises(ValueError, match='ops_per_edge'):
    ista.IstaConfig(ops=ms.OPS, layout=layout, k_edges=1, excluded_ops=(),
                    ops_per_edge=7)
  with pytest.raises(ValueError, match='k_edges'):
    ista.IstaConfig(ops=ms.OPS, layout=layout, excluded_ops=())
  with pytest.raises(ValueError, match='not all in ops'):
    ista.IstaConfig(layout=layout, k_edges=1)


def test_group_mean_abs_trains_the_codes_of_one_op_layers(layer_state):
  """Per-layer 'mean_abs' of one α is sign(α): no gradient for b (refused).
  'group_mean_abs' divides by the mean |α| over the layers: the network
  does not depend on b's scale, and each layer's b still gets a gradient."""
  with pytest.raises(ValueError, match="'group_mean_abs'"):
    dataclasses.replace(layer_state.config, alpha_norm='mean_abs')
  state = layer_state.replace(config=dataclasses.replace(
      layer_state.config, alpha_norm='group_mean_abs'))
  plain = jax.tree.leaves(
      ista.architecture_from_codes(layer_state, layer_state.b).weights)
  normed = jax.tree.leaves(
      ista.architecture_from_codes(state, state.b).weights)
  scale = np.mean(np.abs(np.concatenate(plain)))
  for got, ref in zip(normed, plain):
    np.testing.assert_allclose(got, ref / scale, rtol=1e-5)
  scaled = state.replace(b=jax.tree.map(lambda v: 1000.0 * v, state.b),
                         x=jax.tree.map(lambda v: 1000.0 * v, state.x))
  for got, ref in zip(jax.tree.leaves(ista.architecture_from_codes(
      scaled, scaled.b).weights), normed):
    np.testing.assert_allclose(got, ref, rtol=1e-4)
  # A loss that wants layer 0's α larger: b_0 moves along A_0's column (up
  # to the shared scale), every layer's b gets a non-zero gradient.
  def loss(b):
    return -ista.architecture_from_codes(state, b).weights[ms.GROUP][0][0]
  grads = jax.grad(loss)(state.b)[ms.GROUP]
  assert all(np.linalg.norm(g) > 1e-3 for g in grads)
  step = jax.tree.map(lambda b, g: b - 1e-3 * g, state.b, {ms.GROUP: grads})
  assert loss(step) < loss(state.b)
