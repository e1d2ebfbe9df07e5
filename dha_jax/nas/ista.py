"""One-stage ISTA-NAS: sparse codes, recovery (Eq. 5-6), projection (Eq. 7).

ISTA-NAS (Yang et al., 2020) as used by DHA (docs/fidelity.md, 'NAS'). Per
searchable node of the space's layout (`search_space.NodeShape`: a DARTS
cell's intermediate node i, or one layer of the MobileNet space) there is
one compressed-sensing problem: the node's architecture vector
x_i ∈ R^{n_i}, n_i = |ops_i|·num_edges_i (cells: |ops|·(i + 2); a MobileNet
layer: its 6 or 7 candidates on one edge), laid out edge-major
(`x_i.reshape(num_edges_i, |ops_i|)[edge, op]`), is encoded by a fixed
random matrix A_i ∈ R^{m×n_i} as the code b_i = A_i x_i ∈ R^m, m < n_i. The
network trains b by gradient descent; the sparse x is recovered from b by the
Lasso (Eq. 5)

    x̂ = argmin_x ½‖A x − b‖² + λ‖x‖₁,

solved here by ISTA or FISTA (Eq. 6). Every step the child network uses the
architecture weights of one ISTA step from x̂ on the fixed support S (Eq. 7)

    α_S = x̂_S + A_Sᵀ (b − A_S x̂_S),   α_{∉S} = 0,

which is linear in b, so ∂α_S/∂b = A_Sᵀ is what trains b. Optionally
(`IstaConfig.alpha_norm='mean_abs'`, a deviation) each node's α is divided by
its mean absolute value (Eq. 7'), which makes the network's output independent
of b's scale: b can then start at the reference's scale 1e-3, where b's Adam
steps move it as much relative to itself as in the reference, without the
near-zero α that a short run cannot grow out of.

Once per epoch (`recover`, host side) x̂ is recovered for the nodes still
searching, a node whose x̂ moved by at most `dist_limit` freezes (absolutely,
as the reference, or relative to ‖x̂‖; `FREEZE_RULES`), and the new support
(cells: top-2 edges per node; MobileNet: the best op per layer) must satisfy
the resource constraint (Eq. 1).

Deviations from the reference code (docs/fidelity.md, 'NAS' and 'Known bugs
of the official code'):
* Recovery solves Eq. 5 by FISTA in JAX (default) instead of sklearn's
  coordinate-descent `Lasso`, and without the free intercept the reference
  fits (`fit_intercept=True`); λ = m·1e-5 is the reference's `alpha=1e-5` in
  this unscaled objective (sklearn divides the residual term by m). Both are
  so weakly regularised that convergence is slow: on problems of the sizes
  used the reference's 1000 coordinate-descent sweeps can stop far from the
  optimum (up to 100% relative error in x), ISTA often has not converged
  after 10⁵ iterations and FISTA needs ~10⁴ (hence the defaults).
* The support may pick dil_conv_5x5: the reference drops the last op column
  when ranking edges (a leftover of DARTS' "drop `none`"), so it never can.
  `none`, when it is in the op list, is never chosen (as in DARTS).
* A refused update (Eq. 1 violated) leaves the whole search state unchanged,
  freeze flags included; the reference still records new freeze flags. The
  limit is inclusive (params ≤ limit passes, the reference refuses at =).
* A frozen node's b stays exactly fixed when the caller zeroes its optimizer
  *updates* with `zero_frozen`; under the reference's torch 1.1 Adam it keeps
  drifting through momentum and weight decay.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dha_jax.nas import search_space
from dha_jax.nas.search_space import (Architecture, CellSupport, Layout,
                                      NodeSupport, SupportItems)

# ISTA-NAS defaults (docs/fidelity.md, 'NAS').
DEFAULT_PROJ_DIMS = 7
DEFAULT_B_INIT_SCALE = 1e-3
DEFAULT_K_EDGES = 2
DEFAULT_DIST_LIMIT = 1e-3
# The reference's sklearn `Lasso(alpha=1e-5)` minimises
# (1/2m)‖Ax − b‖² + alpha‖x‖₁, i.e. Eq. 5 with λ = m·alpha (`IstaConfig.lam`).
REFERENCE_LASSO_ALPHA = 1e-5
# Measured on reference-scale problems (m = 7, n = 14..35, λ = 7e-5, b of
# scale 1e-3 to 1e-1, 5 draws each, float32) against sklearn's exact Lasso
# solution: with these defaults FISTA stopped after 1.6·10³ to 4·10⁴
# iterations, within 2e-4 relative error; 3 of the 60 (n = 35, scale 1e-1)
# hit the cap and are reported unconverged, two of them 8e-5 away, one 0.27.
# tol = 1e-6 stopped after 5·10² to 2·10⁴ iterations, up to 2e-2 away. An
# iteration takes a few µs on a CPU (10⁵: 0.4-0.6 s on a busy 2-core
# machine), so an epoch's recovery of 8 cell nodes takes 0.1 s to a few s.
DEFAULT_MAX_ITERS = 100_000
# Relative: stop when ‖x_{k+1} − x_k‖ ≤ tol·‖x_{k+1}‖. Below float32's
# resolution (ε ≈ 1.2e-7) on purpose: the loop runs until the iterate stops
# changing but for rounding (its largest entries exactly), since on these
# weakly regularised problems a small step is no sign of being near the
# optimum (tol = 1e-6 above).
DEFAULT_TOL = 1e-8
# How α is scaled for the forward pass (`architecture_from_codes`): 'none'
# is Eq. 7 as the reference; 'mean_abs' divides each node's α by its mean
# |α|; 'group_mean_abs' divides every α of a group (a cell type, the
# MobileNet layers) by the group's mean |α|.
ALPHA_NORMS = ('none', 'mean_abs', 'group_mean_abs')
# The freezing test of `recover`: 'absolute' ‖x_new − x_last‖ ≤ dist_limit
# (the reference) or 'relative' ‖x_new − x_last‖ ≤ dist_limit·‖x_new‖.
FREEZE_RULES = ('absolute', 'relative')

PerNode = tuple[jax.Array, ...]  # one entry per intermediate node


# ----------------------------------------------------------------------------
# Eq. 5-6: the Lasso by (F)ISTA.


def soft_threshold(z: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """The prox of threshold·‖·‖₁: sign(z)·max(|z| − threshold, 0)."""
  return jnp.sign(z) * jnp.maximum(jnp.abs(z) - threshold, 0.0)


class IstaResult(NamedTuple):
  """What `ista` returns.

  Attributes:
    x: the solution [n].
    num_iters: iterations run (int32 scalar).
    converged: whether the stopping test passed before `max_iters` (bool).
  """
  x: jax.Array
  num_iters: jax.Array
  converged: jax.Array


def ista(A: jax.Array, b: jax.Array, lam: jax.Array | float, *,
         x0: jax.Array | None = None,
         step: jax.Array | float | None = None,
         max_iters: int = DEFAULT_MAX_ITERS,
         tol: float = DEFAULT_TOL,
         accelerated: bool = False) -> IstaResult:
  """Solves min_x ½‖A x − b‖² + λ‖x‖₁ (Eq. 5) by ISTA or FISTA (Eq. 6).

  ISTA iterates x_{k+1} = soft_threshold(y_k − t·Aᵀ(A y_k − b), λt) with
  y_k = x_k; FISTA (Beck & Teboulle, 2009) extrapolates
  y_{k+1} = x_{k+1} + ((s_k − 1)/s_{k+1})(x_{k+1} − x_k),
  s_{k+1} = (1 + √(1 + 4 s_k²))/2. Pure and jittable (`accelerated` must be
  static); runs in one `lax.while_loop`.

  Args:
    A: the measurement matrix [m, n].
    b: the code [m].
    lam: λ ≥ 0, the ℓ1 weight.
    x0: warm start [n]; zeros when None.
    step: step size t; None gives 1/‖A‖₂² (1/Lipschitz constant of the
      smooth part), the largest step with guaranteed convergence.
    max_iters: iteration cap.
    tol: relative tolerance; stops once ‖x_{k+1} − x_k‖₂ ≤ tol·‖x_{k+1}‖₂.
    accelerated: FISTA when True, ISTA when False.

  Returns:
    An `IstaResult` (x [n], num_iters, converged).
  """
  chex.assert_rank(A, 2)
  chex.assert_shape(b, (A.shape[0],))
  if x0 is None:
    x0 = jnp.zeros((A.shape[1],), A.dtype)
  chex.assert_shape(x0, (A.shape[1],))
  if step is None:
    lipschitz = jnp.linalg.norm(A, ord=2) ** 2
    # An all-zero A has no smooth part; any step then returns soft(x0).
    step = jnp.where(lipschitz > 0, 1.0 / lipschitz, 1.0)
  step = jnp.asarray(step, A.dtype)
  threshold = lam * step

  def not_done(carry):
    k, x, _, _, delta = carry
    return (k < max_iters) & (delta > tol * jnp.linalg.norm(x))

  def body(carry):
    k, x, y, s, _ = carry
    x_next = soft_threshold(y - step * (A.T @ (A @ y - b)), threshold)
    if accelerated:
      s_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * s * s))
      y_next = x_next + ((s - 1.0) / s_next) * (x_next - x)
    else:
      s_next, y_next = s, x_next
    return k + 1, x_next, y_next, s_next, jnp.linalg.norm(x_next - x)

  init = (jnp.asarray(0, jnp.int32), x0, x0, jnp.asarray(1.0, A.dtype),
          jnp.asarray(jnp.inf, A.dtype))
  k, x, _, _, delta = jax.lax.while_loop(not_done, body, init)
  return IstaResult(x=x, num_iters=k,
                    converged=delta <= tol * jnp.linalg.norm(x))


_ista_jit = jax.jit(ista, static_argnames=('accelerated',))


# ----------------------------------------------------------------------------
# Eq. 7: the architecture weights of a support.


def project_alpha(A: jax.Array, b: jax.Array, x: jax.Array,
                  support_mask: jax.Array) -> jax.Array:
  """α = x_S + A_Sᵀ(b − A_S x_S) on the support S, 0 off it (Eq. 7).

  One unit-step ISTA gradient step from x restricted to S; the reference
  writes it α_S = A_Sᵀ b − E_S x̃_S with E = AᵀA − I. Linear in b with
  ∂α_S/∂b = A_Sᵀ: this is what the train step differentiates to train b.

  Args:
    A: the measurement matrix [m, n].
    b: the code [m].
    x: the recovered code [n]; its values off S are ignored.
    support_mask: bool [n], True on S.

  Returns:
    α [n], exactly zero off S.
  """
  chex.assert_rank(A, 2)
  chex.assert_shape(b, (A.shape[0],))
  chex.assert_shape([x, support_mask], (A.shape[1],))
  x_s = jnp.where(support_mask, x, 0.0)
  a_s = jnp.where(support_mask[None, :], A, 0.0)
  return jnp.where(support_mask, x_s + a_s.T @ (b - a_s @ x_s), 0.0)


# ----------------------------------------------------------------------------
# The support: top-k edges per node, top ops per edge (host side).


def select_support(x: np.ndarray | jax.Array, ops: Sequence[str], *,
                   k_edges: int = DEFAULT_K_EDGES,
                   excluded_ops: Sequence[str] = (search_space.NONE_OP,),
                   ops_per_edge: int = 1,
                   ) -> NodeSupport:
  """One node's support: the top-`k_edges` edges, each with its best ops.

  An edge's score is the signed max of x over its allowed ops (as the
  reference's `picking_optimal`); the `k_edges` best edges are kept, each
  with its `ops_per_edge` largest ops (cells: 2 edges, 1 op each; a
  MobileNet layer: its one edge, with as many ops as the sparsity asks).
  Every op in `ops` may be chosen except `excluded_ops` (the reference also
  excludes the last op, dil_conv_5x5, by a bug). Ties go to the lower edge
  index, then the earlier op in `ops`.

  Args:
    x: the node's code [|ops|·num_edges], edge-major.
    ops: the op names, in the order of x's op axis.
    k_edges: how many distinct input edges the node keeps.
    excluded_ops: ops never chosen (DARTS' `none`).
    ops_per_edge: how many ops each kept edge carries.

  Returns:
    The node's support: (edge, op_name) pairs sorted by edge, then op name.
  """
  ops = tuple(ops)
  x = np.asarray(x, np.float64)
  if x.ndim != 1 or x.size % len(ops):
    raise ValueError(f'x must be a vector of |ops|·num_edges entries for the '
                     f'{len(ops)} ops {ops}; got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'x has non-finite entries ({x}); check b and λ')
  allowed = np.array([op not in excluded_ops for op in ops])
  if not allowed.any():
    raise ValueError(f'excluded_ops={tuple(excluded_ops)} removes every op '
                     f'of {ops}; exclude fewer ops')
  per_edge = np.where(allowed, x.reshape(-1, len(ops)), -np.inf)
  n_edges = per_edge.shape[0]
  if not 0 < k_edges <= n_edges:
    raise ValueError(f'k_edges={k_edges} must be in [1, {n_edges}], the '
                     f'number of edges of this node')
  if not 0 < ops_per_edge <= int(allowed.sum()):
    raise ValueError(f'ops_per_edge={ops_per_edge} must be in [1, '
                     f'{int(allowed.sum())}], the selectable ops of {ops}')
  # A stable sort of −x: the first maximum (the earlier op) wins ties.
  best_ops = np.argsort(-per_edge, axis=1, kind='stable')[:, :ops_per_edge]
  score = per_edge[np.arange(n_edges), best_ops[:, 0]]
  # lexsort's last key is the primary one: descending score, then edge.
  edges = np.lexsort((np.arange(n_edges), -score))[:k_edges]
  return tuple(sorted((int(e), ops[o]) for e in edges for o in best_ops[e]))


def _flat_indices(node_support: NodeSupport, ops: Sequence[str]) -> np.ndarray:
  """Positions of (edge, op) pairs in the edge-major code vector."""
  ops = tuple(ops)
  return np.array([edge * len(ops) + ops.index(op)
                   for edge, op in node_support], np.int32)


# ----------------------------------------------------------------------------
# The search state.


@dataclasses.dataclass(frozen=True)
class IstaConfig:
  """Static settings of the ISTA-NAS search (hashable: jit metadata).

  Attributes:
    ops: the space's candidate op names; without a `layout`, the op axis of
      every x_i.
    layout: the searchable nodes by group (`search_space.Layout`), each
      with its input edges and its ops (drawn from `ops`); None: the DARTS
      cells over `ops` (`search_space.cell_layout`). See `groups`.
    proj_dims: m, the code length of every node.
    b_init_scale: b_i is initialised as b_init_scale·N(0, 1).
    lam: λ of Eq. 5 (unscaled residual term); None: proj_dims ·
      `REFERENCE_LASSO_ALPHA`, the reference's weight for this code length.
    max_iters: (F)ISTA iteration cap per recovery.
    tol: (F)ISTA relative stopping tolerance.
    accelerated: FISTA (True) or ISTA (False).
    k_edges: input edges each node keeps.
    ops_per_edge: ops each kept edge carries (the sparsity of a
      single-edge node, e.g. a MobileNet layer).
    excluded_ops: ops never put on the support.
    alpha_norm: one of `ALPHA_NORMS` (see `architecture_from_codes`).
  """
  ops: tuple[str, ...] = search_space.ISTA_PRIMITIVES
  layout: Layout | None = None
  proj_dims: int = DEFAULT_PROJ_DIMS
  b_init_scale: float = DEFAULT_B_INIT_SCALE
  lam: float | None = None
  max_iters: int = DEFAULT_MAX_ITERS
  tol: float = DEFAULT_TOL
  accelerated: bool = True
  k_edges: int = DEFAULT_K_EDGES
  ops_per_edge: int = 1
  excluded_ops: tuple[str, ...] = (search_space.NONE_OP,)
  alpha_norm: str = 'none'

  def __post_init__(self):
    if self.alpha_norm not in ALPHA_NORMS:
      raise ValueError(f'IstaConfig: alpha_norm must be one of {ALPHA_NORMS}, '
                       f'got {self.alpha_norm!r}')
    object.__setattr__(self, 'ops', tuple(self.ops))
    object.__setattr__(self, 'excluded_ops', tuple(self.excluded_ops))
    if self.lam is None:
      object.__setattr__(self, 'lam', self.proj_dims * REFERENCE_LASSO_ALPHA)
    shapes = [shape for _, nodes in self.groups for shape in nodes]
    for shape in shapes:
      if not set(shape.ops) <= set(self.ops):
        raise ValueError(f'IstaConfig: layout ops {shape.ops} are not all '
                         f'in ops={self.ops}')
      if not set(shape.ops) - set(self.excluded_ops):
        raise ValueError(f'IstaConfig: ops={shape.ops} has no op outside '
                         f'excluded_ops={self.excluded_ops}')
    if self.proj_dims < 1 or self.max_iters < 1:
      raise ValueError(f'IstaConfig: proj_dims ({self.proj_dims}) and '
                       f'max_iters ({self.max_iters}) must be positive')
    if self.lam < 0 or self.tol < 0:
      raise ValueError(f'IstaConfig: lam ({self.lam}) and tol ({self.tol}) '
                       f'must be non-negative')
    min_edges = min(shape.num_edges for shape in shapes)
    if not 0 < self.k_edges <= min_edges:
      raise ValueError(f'IstaConfig: k_edges={self.k_edges} must be in '
                       f'[1, {min_edges}] (a node has {min_edges} inputs)')
    min_ops = min(len(set(shape.ops) - set(self.excluded_ops))
                  for shape in shapes)
    if not 0 < self.ops_per_edge <= min_ops:
      raise ValueError(f'IstaConfig: ops_per_edge={self.ops_per_edge} must '
                       f'be in [1, {min_ops}] (a node has {min_ops} '
                       'selectable ops)')
    if self.alpha_norm == 'mean_abs' and self.k_edges * self.ops_per_edge == 1:
      # α_S / mean|α_S| of a single pair is sign(α_S): its derivative in b
      # is zero, so b would follow noise, not the loss.
      raise ValueError(
          "IstaConfig: alpha_norm='mean_abs' with one (edge, op) pair per "
          'node makes every α ±1 and gives b no gradient; use '
          "'group_mean_abs' (config field nas.alpha_norm) or keep more ops "
          'per node (nas.ops_per_layer)')

  @property
  def groups(self) -> Layout:
    """The searchable nodes: `layout`, or the DARTS cells over `ops`."""
    return (search_space.cell_layout(self.ops) if self.layout is None
            else self.layout)


@flax.struct.dataclass
class IstaState:
  """The ISTA-NAS search state; every per-node entry is a tuple over nodes.

  Array leaves (all that a checkpoint needs), per group of
  `config.groups` (cells: 'normal', 'reduce'; MobileNet: 'layers'): `A`
  {group: ([m, n_i], ...)}, `b` {group: ([m], ...)} (the learned codes), `x`
  {group: ([n_i], ...)} (x_last, the last accepted recovery), `frozen`
  {group: (bool[], ...)} (same tree structure as `b`).

  Static metadata: `support`, a tuple of (group, CellSupport) items as in
  `Architecture.support`, and `config`. The support is always
  `select_support` of `x`; a checkpoint restored into a template state keeps
  the template's metadata, so call `sync_support` after restoring.
  """
  A: dict[str, PerNode]
  b: dict[str, PerNode]
  x: dict[str, PerNode]
  frozen: dict[str, PerNode]
  support: SupportItems = flax.struct.field(pytree_node=False)
  config: IstaConfig = flax.struct.field(pytree_node=False)

  @property
  def support_dict(self) -> dict[str, CellSupport]:
    return dict(self.support)


def support_from_codes(x: dict[str, Sequence[np.ndarray | jax.Array]],
                       config: IstaConfig) -> dict[str, CellSupport]:
  """`select_support` of every node: {group: CellSupport}."""
  return {group: tuple(select_support(x_i, shape.ops, k_edges=config.k_edges,
                                      excluded_ops=config.excluded_ops,
                                      ops_per_edge=config.ops_per_edge)
                       for x_i, shape in zip(x[group], nodes))
          for group, nodes in config.groups}


def _solve(A: jax.Array, b: jax.Array, config: IstaConfig) -> IstaResult:
  """Cold-started recovery of one node on the host CPU, as numpy arrays.

  (F)ISTA is a long sequential loop of tiny matrix-vector products: on the
  CPU an iteration costs about a microsecond, on an accelerator at least a
  kernel launch per iteration (not measured). One compile per node shape.
  """
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    result = _ista_jit(np.asarray(A), np.asarray(b), config.lam,
                       max_iters=config.max_iters, tol=config.tol,
                       accelerated=config.accelerated)
  return IstaResult(*(np.asarray(v) for v in result))


def init_ista(key: jax.Array, config: IstaConfig = IstaConfig()) -> IstaState:
  """Draws A ~ U[0,1) and b₀ ~ b_init_scale·N(0,1); x₀ = Lasso(A, b₀).

  A is not normalised (as the reference). The initial support is
  `select_support` of x₀ and no node is frozen.

  Args:
    key: PRNG key.
    config: the search settings.

  Returns:
    The initial `IstaState`.
  """
  A, b, x, frozen = {}, {}, {}, {}
  groups = config.groups
  for (group, nodes), group_key in zip(groups,
                                       jax.random.split(key, len(groups))):
    a_keys, b_keys = jax.random.split(group_key, (2, len(nodes)))
    A[group] = tuple(jax.random.uniform(a_keys[i], (config.proj_dims,
                                                    shape.size))
                     for i, shape in enumerate(nodes))
    b[group] = tuple(config.b_init_scale *
                     jax.random.normal(b_keys[i], (config.proj_dims,))
                     for i in range(len(nodes)))
    x[group] = tuple(jnp.asarray(_solve(a, b_i, config).x)
                     for a, b_i in zip(A[group], b[group]))
    frozen[group] = tuple(jnp.asarray(False) for _ in nodes)
  return IstaState(A=A, b=b, x=x, frozen=frozen,
                   support=search_space.support_items(
                       support_from_codes(x, config)),
                   config=config)


def sync_support(state: IstaState) -> IstaState:
  """Recomputes the static support from x_last (e.g. after a restore)."""
  support = search_space.support_items(
      support_from_codes(state.x, state.config))
  return state.replace(support=support)


def architecture_from_codes(state: IstaState, b: dict[str, PerNode]
                            ) -> Architecture:
  """The child network's architecture: α of every node by Eq. 7.

  With `config.alpha_norm='mean_abs'` each node's α on its support is
  divided by its mean absolute value (Eq. 7'): α_S / mean|α_S|, so that the
  α of b and of c·b (c > 0) are nearly equal (exactly when x̂ scales with b)
  and the network's output does not shrink with b's scale. With
  'group_mean_abs' the divisor is the mean |α| over the supports of all the
  group's nodes: the same scale freedom, and a node of one pair (a MobileNet
  layer) keeps the magnitude of its α relative to the other layers, which
  trains its b (per node, its α would be ±1 with zero gradient).

  Jittable; differentiable in `b`. The output's tree structure holds the
  state's support, so a jitted step taking the result retraces exactly when
  the support changes. Frozen nodes use the same formula: keeping their b
  fixed is the caller's business (see `zero_frozen`).

  Args:
    state: supplies A, x_last and the static support.
    b: the codes {group: ([m], ...)}, usually `state.b` as a traced argument.

  Returns:
    An `Architecture` whose α for each node is aligned with its support pairs.
  """
  weights = {}
  norm = state.config.alpha_norm
  for group, nodes in state.config.groups:
    alphas = []
    for i, (shape, node_support) in enumerate(
        zip(nodes, state.support_dict[group])):
      idx = _flat_indices(node_support, shape.ops)
      mask = np.zeros((shape.size,), bool)
      mask[idx] = True
      alpha = project_alpha(state.A[group][i], b[group][i],
                            state.x[group][i], mask)[idx]
      alphas.append(_normalise(alpha) if norm == 'mean_abs' else alpha)
    if norm == 'group_mean_abs':
      alphas = _normalise(jnp.concatenate(alphas))
      splits = np.cumsum([len(pairs) for pairs in state.support_dict[group]])
      alphas = jnp.split(alphas, splits[:-1])
    weights[group] = alphas
  return search_space.make_architecture(state.support_dict, weights)


def _normalise(alpha: jax.Array) -> jax.Array:
  """α / mean|α|; an all-zero α (b = 0 and x̂ = 0) stays zero, not NaN."""
  scale = jnp.mean(jnp.abs(alpha))
  return alpha / jnp.where(scale > 0, scale, 1.0)


def zero_frozen(state: IstaState, tree: dict[str, PerNode]
                ) -> dict[str, PerNode]:
  """Zeroes the entries of frozen nodes in a tree shaped like `state.b`.

  Apply it to the optimizer's *updates* of b (not only to the gradients):
  then a frozen b stays exactly fixed, whereas Adam's momentum and weight
  decay would still move it after its gradient is zeroed. Jittable.
  """
  return jax.tree.map(lambda f, t: jnp.where(f, jnp.zeros_like(t), t),
                      state.frozen, tree)


def all_frozen(state: IstaState) -> bool:
  """Whether every node of every group is frozen (the search is over)."""
  return bool(all(np.asarray(f) for f in jax.tree.leaves(state.frozen)))


class Budget(NamedTuple):
  """One resource of Eq. 1's constraint.

  Attributes:
    measure: maps a support {group: CellSupport} to the amount of the
      resource its network needs (e.g. parameters in MB).
    limit: the most a support may need.
  """
  measure: Callable[[dict[str, CellSupport]], float]
  limit: float


def recover(state: IstaState, b: dict[str, PerNode] | None = None, *,
            epoch: int,
            dist_limit: float = DEFAULT_DIST_LIMIT,
            freeze_rule: str = 'absolute',
            may_freeze: bool = True,
            budgets: Mapping[str, Budget] | None = None,
            ) -> tuple[IstaState, dict[str, Any]]:
  """The per-epoch update: recovery, freezing and the constraint (Eq. 1).

  Host side. For each node not yet frozen, x_new = Lasso(A, b) (Eq. 5-6,
  cold start, so x_new depends on b only); the node freezes when
  ‖x_new − x_last‖₂ ≤ dist_limit, from the first call on (the reference's
  postrain after epoch 0; its "never at epoch 0" is its initial recovery,
  here `init_ista`). The candidate support is
  `select_support` of x_new (frozen nodes keep x_last). When the candidate
  exceeds any of `budgets` (Eq. 1's resource constraint) the update is
  refused and the state is returned unchanged but for b; otherwise x_last,
  the freeze flags and the support are updated.

  Args:
    state: the current state.
    b: the current codes; `state.b` when None. The returned state holds it.
    epoch: the epoch that just ended (0-based), for the report.
    dist_limit: the freezing threshold on ‖x_new − x_last‖₂ (absolute) or
      on ‖x_new − x_last‖₂ / ‖x_new‖₂ (relative).
    freeze_rule: one of `FREEZE_RULES`.
    may_freeze: False forbids freezing in this call (e.g. before b has
      trained for a minimum number of steps).
    budgets: {resource name: Budget} (e.g. parameters in MB, multiply-adds);
      None or empty: no constraint.

  Returns:
    (new_state, report). The report holds `distances` {group: [float |
    None]} (None for nodes frozen before this call), `ista_iters`
    {group: [int | None]}, `relative_distances` {group: [float | None]}
    (over ‖x_new‖₂), `unconverged` [[group, node]] (recoveries that hit
    max_iters), `newly_frozen` [[group, node]], `frozen` {group: [bool]},
    `all_frozen`, `resources` {name: the candidate's amount}, `over_budget`
    (the names whose limit it exceeds), `refused`,
    `support_changed` and `candidate_support` {group: CellSupport}.
  """
  if freeze_rule not in FREEZE_RULES:
    raise ValueError(f'recover: freeze_rule must be one of {FREEZE_RULES}, '
                     f'got {freeze_rule!r}')
  b = state.b if b is None else b
  chex.assert_trees_all_equal_shapes(b, state.b)
  config = state.config
  x_new, distances, relative, iters, unconverged, frozen, newly_frozen = (
      {}, {}, {}, {}, [], {}, [])
  for cell, nodes in config.groups:
    x_new[cell], distances[cell], relative[cell] = [], [], []
    iters[cell], frozen[cell] = [], []
    for i in range(len(nodes)):
      x_last = state.x[cell][i]
      if bool(state.frozen[cell][i]):
        x_new[cell].append(x_last)
        distances[cell].append(None)
        relative[cell].append(None)
        iters[cell].append(None)
        frozen[cell].append(True)
        continue
      result = _solve(state.A[cell][i], b[cell][i], config)
      x_i = result.x.astype(np.float64)
      dist = float(np.linalg.norm(x_i - np.asarray(x_last, np.float64)))
      rel = dist / max(float(np.linalg.norm(x_i)), np.finfo(np.float64).tiny)
      measured = rel if freeze_rule == 'relative' else dist
      freeze = may_freeze and measured <= dist_limit
      x_new[cell].append(jnp.asarray(result.x))
      distances[cell].append(dist)
      relative[cell].append(rel)
      iters[cell].append(int(result.num_iters))
      if not bool(result.converged):
        unconverged.append([cell, i])
      frozen[cell].append(freeze)
      if freeze:
        newly_frozen.append([cell, i])

  candidate = support_from_codes(x_new, config)
  budgets = budgets or {}
  resources = {name: float(b.measure(candidate))
               for name, b in budgets.items()}
  over_budget = [name for name, b in budgets.items()
                 if resources[name] > b.limit]
  refused = bool(over_budget)
  if refused:
    new_state = state.replace(b=b)
  else:
    new_state = state.replace(
        b=b, x={c: tuple(v) for c, v in x_new.items()},
        frozen={c: tuple(jnp.asarray(f) for f in v) for c, v in frozen.items()},
        support=search_space.support_items(candidate))
  kept_frozen = {c: [bool(f) for f in new_state.frozen[c]] for c in frozen}
  report = {
      'epoch': epoch,
      'distances': distances,
      'relative_distances': relative,
      'ista_iters': iters,
      'unconverged': unconverged,
      'newly_frozen': [] if refused else newly_frozen,
      'frozen': kept_frozen,
      'all_frozen': all_frozen(new_state),
      'resources': resources,
      'over_budget': over_budget,
      'refused': refused,
      'support_changed': new_state.support != state.support,
      'candidate_support': candidate,
  }
  return new_state, report
