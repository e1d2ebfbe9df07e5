"""The hypergradient of η = {learning rate, weight decay} (Eq. 4).

DHA (Zhou et al., §3.2) tunes θ's learning rate and weight decay while the
network trains. With θ⁺(η) one real optax step of θ (Eq. 3,
`dha_jax.hpo.inner.inner_step`), η moves down the gradient of a loss
measured at θ⁺:

  η ← η − β ∇η L(θ⁺(η))                                              # Eq. 4

Only this one step is differentiated: θ and the momentum buffer are taken as
independent of η (the paper and the reference code both do so). The
hypergradient is autodiff through the update function the caller passes
(`update_fn: hparams -> (θ⁺, aux)`); there is no hand-derived formula. (For
the record, the plain-momentum case reproduces the reference's
∂L/∂lr = −⟨∇L(θ⁺), buf⟩ and ∂L/∂wd = −lr·⟨∇L(θ⁺), θ⟩.) The train step passes
its own `inner_step` (`dha_jax.components.StepContext.inner_update`), so the
component and `hpo_step` run the same `hpo_update`.

**Parameterisation.** η is held as raw values, `log` (default) or `linear`,
each clipped to its bounds after every update. In log space a step changes η
by a relative amount and η can never turn negative; `linear` reproduces the
reference (docs/fidelity.md, 'HPO'), which clips linear values. The initial
value is the midpoint of the bounds (geometric in log space, arithmetic in
linear space, the reference's choice) unless `init_lr` / `init_wd` are given.

**The η optimizer** (β = `meta_lr`) is an optax transformation; the default is
Adam on log η. ∂L/∂log lr = lr·∂L/∂lr is proportional to ⟨∇L_hpo, update⟩,
whose scale changes by orders of magnitude across models, datasets and
training phases, so plain SGD needs β retuned for each of them; Adam divides
by the running RMS, so β is about the change of log η per step (0.01: about
1 % of η) whatever the scale. 'sgd' (with `meta_momentum`) on linear η is
the reference's setting. With `update_every = k > 1` the finite
hypergradients of k consecutive calls are averaged and η moves once, when
the call counter reaches a multiple of k; in between the state only
accumulates (masking, no Python control flow, so it jits).

**Two hypergradient modes.**

* `exact` (Eq. 4): L is the mean loss on a separate, un-augmented HPO batch,
  forwarded at θ⁺ (`loss_fn`, closed over that batch). Cost: one extra
  forward and backward pass of the network per step (about 2× a plain step).
  Memory: that pass's activations, nothing persistent.
* `online`: L is the training loss at θ⁺ on the *next training batch*, whose
  gradient the next step computes anyway (hypergradient descent, Baydin et
  al. 2018). At step t the state keeps the tangents dθ_{t+1}/d raw η,
  obtained by `jax.linearize` through the same real optax update; at step
  t+1 the hypergradient is ⟨∇θ L_train(θ_{t+1}), dθ_{t+1}/d raw η⟩. Cost: no
  extra network pass, only the linearised optimizer update (a few elementwise
  parameter-sized operations) and two dot products. Memory: two
  parameter-sized tangent trees in the state (also checkpointed). Bias: the
  signal is the training loss on an augmented training batch, not a held-out
  loss, so nothing pushes weight decay toward generalisation; the
  hypergradient is one step stale (taken w.r.t. η_{t−1}, applied to η_t);
  BatchNorm statistics come from the training batch. At the first step there
  are no tangents yet: that call moves nothing and is left out of its
  `update_every` window's mean (and of `nonfinite_count`), so η's first real
  update is the η optimizer's first step (Adam's full size); the window's
  boundaries stay where the call count puts them.

In both modes the η used for θ_{t+1} is the one before this step's η update.

**Guards.** A hypergradient with a NaN or inf entry leaves η and the η
optimizer's state unchanged and increments `nonfinite_count`. The window and
the guard are written here rather than composed from `optax.MultiSteps` and
`optax.apply_if_finite`: inside `MultiSteps` a NaN would enter the window's
mean, and around it the window would count only finite calls, so η would no
longer move on every `update_every`-th step. The clipping to the bounds is
`optax.projections.projection_box`.

Everything the component learns lives in `HPOState` (a PyTree, checkpointed
with the rest); the configuration (`default_config`) is static.

Departures from the reference code (docs/fidelity.md, 'HPO'):
* log parameterisation and Adam are the defaults (the reference: linear, SGD);
  `parameterization='linear', meta_optimizer='sgd'` restores its behaviour.
* the reference applies SGD's own weight decay (`h_weight_decay`) to η; that
  is not offered.
* the optional `update_every` window is an addition (the reference steps η
  every iteration, i.e. k = 1).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from dha_jax import flat_tree
from dha_jax.hpo.inner import HPARAM_DTYPE, HPARAM_NAMES, inner_step

PyTree = Any
HParams = dict[str, jax.Array]
# hparams -> (θ⁺, aux): one optimizer step of θ as a function of η (Eq. 3).
UpdateFn = Callable[[HParams], tuple[PyTree, Any]]
# Loss at θ⁺ on the HPO batch: params -> (scalar loss, aux such as BN stats).
LossFn = Callable[[PyTree], tuple[jax.Array, Any]]

PARAMETERIZATIONS = ('log', 'linear')
MODES = ('exact', 'online')
META_OPTIMIZERS = ('sgd', 'adam')
# Config fields of the bounds and initial values of each hyper-parameter.
_FIELDS = {'learning_rate': ('lr_bounds', 'init_lr'),
           'weight_decay': ('wd_bounds', 'init_wd')}


def default_config() -> ml_collections.ConfigDict:
  """The HPO settings with their defaults (every field documented).

  θ's momentum, Nesterov flag and clipping threshold are not here: they
  belong to the inner optimizer's config (`make_inner_optimizer`).

  Returns:
    A ConfigDict; set it as `config.hpo` and override fields as needed.
  """
  config = ml_collections.ConfigDict()
  # Bounds (lo, hi) of θ's learning rate and weight decay; η is clipped to
  # them after every update. Log parameterisation needs lo > 0. The defaults'
  # geometric midpoints, 0.022 and 3.2e-4, are close to DARTS' 0.025 / 3e-4.
  config.lr_bounds = (1e-3, 0.5)
  config.wd_bounds = (1e-5, 1e-2)
  # Initial values (None: the midpoint of the bounds). Placeholders keep the
  # float type, so `--config.hpo.init_lr=0.1` parses.
  config.init_lr = ml_collections.config_dict.placeholder(float)
  config.init_wd = ml_collections.config_dict.placeholder(float)
  # 'log' (η = exp(raw)) or 'linear' (η = raw, the reference code).
  config.parameterization = 'log'
  # β and the η optimizer: 'adam' or 'sgd' (with meta_momentum, 0 = none).
  config.meta_optimizer = 'adam'
  config.meta_lr = 0.01
  config.meta_momentum = 0.0
  # η moves once per update_every hypergradients (their mean).
  config.update_every = 1
  # 'exact': Eq. 4 on a separate HPO batch; 'online': the next training
  # batch's gradient (no extra forward/backward). See the module docstring.
  config.mode = 'exact'
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field and the fix."""
  if config.parameterization not in PARAMETERIZATIONS:
    raise ValueError(f'hpo.parameterization must be one of '
                     f'{PARAMETERIZATIONS}, got {config.parameterization!r}')
  if config.mode not in MODES:
    raise ValueError(f'hpo.mode must be one of {MODES}, got {config.mode!r}')
  if config.meta_optimizer not in META_OPTIMIZERS:
    raise ValueError(f'hpo.meta_optimizer must be one of {META_OPTIMIZERS}, '
                     f'got {config.meta_optimizer!r}')
  if int(config.update_every) < 1:
    raise ValueError(f'hpo.update_every must be a positive integer, got '
                     f'{config.update_every!r}')
  for name, (bounds_field, init_field) in _FIELDS.items():
    lo, hi = map(float, config[bounds_field])
    if config.parameterization == 'log' and lo <= 0.0:
      raise ValueError(f'hpo.{bounds_field}={config[bounds_field]!r}: the log '
                       f'parameterisation of {name} needs a lower bound > 0; '
                       "raise it or use parameterization='linear'")
    if not 0.0 <= lo <= hi:
      raise ValueError(f'hpo.{bounds_field}={config[bounds_field]!r} must be '
                       f'(lo, hi) with 0 <= lo <= hi')
    init = config[init_field]
    if init is not None and not lo <= float(init) <= hi:
      raise ValueError(f'hpo.{init_field}={init!r} lies outside '
                       f'hpo.{bounds_field}={config[bounds_field]!r}; move it '
                       'inside the bounds or set it to None (the midpoint)')


def _to_raw(value: float, config: ml_collections.ConfigDict) -> float:
  return math.log(value) if config.parameterization == 'log' else value


def raw_bounds(config: ml_collections.ConfigDict
               ) -> dict[str, tuple[float, float]]:
  """The bounds of each raw η value (log or linear), as Python floats."""
  return {name: tuple(_to_raw(float(v), config) for v in config[bounds])
          for name, (bounds, _) in _FIELDS.items()}


def _initial_raw(config: ml_collections.ConfigDict, dtype: Any) -> HParams:
  """Raw initial η: the explicit value, else the midpoint of the raw bounds."""
  bounds = raw_bounds(config)
  out = {}
  for name, (_, init_field) in _FIELDS.items():
    init = config[init_field]
    value = (_to_raw(float(init), config) if init is not None
             else 0.5 * (bounds[name][0] + bounds[name][1]))
    out[name] = jnp.asarray(value, dtype)
  return out


def initial_hparams(config: ml_collections.ConfigDict) -> HParams:
  """η at initialisation: {'learning_rate', 'weight_decay'} scalars."""
  return to_hparams(_initial_raw(config, HPARAM_DTYPE), config)


def to_hparams(raw: HParams, config: ml_collections.ConfigDict) -> HParams:
  """Maps raw η to {'learning_rate', 'weight_decay'} (exp in log space)."""
  if config.parameterization == 'log':
    return {name: jnp.exp(raw[name]) for name in HPARAM_NAMES}
  return {name: raw[name] for name in HPARAM_NAMES}


def make_meta_optimizer(config: ml_collections.ConfigDict
                        ) -> optax.GradientTransformation:
  """The optimizer of raw η with learning rate β = `config.meta_lr`."""
  check_config(config)
  if config.meta_optimizer == 'adam':
    return optax.adam(config.meta_lr)
  momentum = float(config.meta_momentum)
  return optax.sgd(config.meta_lr, momentum=momentum if momentum > 0 else None)


@flax.struct.dataclass
class HPOState:
  """What the HPO component learns; a PyTree of arrays (checkpointable).

  Attributes:
    step: int32 scalar, hypergradients received (calls of `update_hpo`).
    raw: {'learning_rate', 'weight_decay'}: raw η scalars (log or linear).
    meta_opt_state: the η optimizer's state.
    accum: sum of this window's finite hypergradients (update_every > 1).
    accum_count: int32 scalar, how many were summed.
    nonfinite_count: int32 scalar, NaN/inf hypergradients skipped so far.
    tangents: online mode: {name: dθ⁺/d raw η} (two trees shaped like θ)
      from the last update; None in exact mode.
  """
  step: jax.Array
  raw: HParams
  meta_opt_state: optax.OptState
  accum: HParams
  accum_count: jax.Array
  nonfinite_count: jax.Array
  tangents: dict[str, PyTree] | None


def init_hpo(config: ml_collections.ConfigDict, params: PyTree | None = None,
             dtype: Any = HPARAM_DTYPE) -> HPOState:
  """The initial state: η at its initial values, no tangents yet.

  Args:
    config: the HPO config (`default_config`).
    params: θ (arrays or `jax.ShapeDtypeStruct`s); needed in online mode for
      the shapes of the tangents, ignored in exact mode.
    dtype: dtype of raw η (float64 for x64 tests).

  Returns:
    The HPOState.
  """
  check_config(config)
  raw = _initial_raw(config, dtype)
  tangents = None
  if config.mode == 'online':
    if params is None:
      raise ValueError("hpo.mode='online' keeps tangents shaped like θ: pass "
                       'params (or their jax.eval_shape) to init_hpo')
    # One fresh tree per name: shared buffers could not both be donated.
    tangents = {name: jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype),
                                   params)
                for name in HPARAM_NAMES}
  return HPOState(
      step=jnp.zeros((), jnp.int32), raw=raw,
      meta_opt_state=make_meta_optimizer(config).init(raw),
      accum=jax.tree.map(jnp.zeros_like, raw),
      accum_count=jnp.zeros((), jnp.int32),
      nonfinite_count=jnp.zeros((), jnp.int32), tangents=tangents)


def current_hparams(state: HPOState, config: ml_collections.ConfigDict
                    ) -> HParams:
  """{'learning_rate', 'weight_decay'} scalars to inject into θ's optimizer."""
  return to_hparams(state.raw, config)


def exact_hypergradient(update_fn: UpdateFn, loss_fn: LossFn,
                        state: HPOState, config: ml_collections.ConfigDict,
                        ) -> tuple[PyTree, Any, HParams, jax.Array, Any]:
  """θ⁺ and the hypergradient of Eq. 4 through one real optax update.

  Args:
    update_fn: hparams -> (θ⁺, aux): θ's update with η injected, e.g.
      `functools.partial(inner_step, tx, params, grads, opt_state)` (θ_t,
      ∂L_train(θ_t)/∂θ and the optimizer state held constant) or the train
      step's `StepContext.inner_update`.
    loss_fn: θ -> (mean loss on the HPO batch, aux); aux may carry updated
      BatchNorm statistics and is returned as it is.
    state: the HPO state (its η is injected).
    config: the HPO config.

  Returns:
    (θ⁺, update_fn's aux (e.g. tx's new state), ∂L_hpo(θ⁺)/∂ raw η as
    {name: scalar}, L_hpo(θ⁺), loss_fn's aux).
  """
  def outer(raw):
    new_params, update_aux = update_fn(to_hparams(raw, config))
    loss, aux = loss_fn(new_params)
    return loss, (new_params, update_aux, aux)

  (loss, (new_params, update_aux, aux)), hypergrad = jax.value_and_grad(
      outer, has_aux=True)(state.raw)
  return new_params, update_aux, hypergrad, loss, aux


def online_tangents(update_fn: UpdateFn, state: HPOState,
                    config: ml_collections.ConfigDict,
                    ) -> tuple[PyTree, Any, dict[str, PyTree]]:
  """θ⁺ and its tangents w.r.t. raw η by one `jax.linearize` of `update_fn`.

  Args:
    update_fn, state, config: as `exact_hypergradient`.

  Returns:
    (θ⁺, update_fn's aux, {name: dθ⁺/d raw η[name], shaped like θ}); store
    the tangents with `state.replace(tangents=...)` for the next step's
    `online_hypergradient`.
  """
  new_params, jvp, update_aux = jax.linearize(
      lambda r: update_fn(to_hparams(r, config)), state.raw, has_aux=True)
  basis = {name: {n: (jnp.ones_like if n == name else jnp.zeros_like)(v)
                  for n, v in state.raw.items()} for name in HPARAM_NAMES}
  return new_params, update_aux, {name: jvp(basis[name])
                                  for name in HPARAM_NAMES}


def online_hypergradient(state: HPOState, grads: PyTree) -> HParams:
  """⟨∇θ L_train(θ_t), dθ_t/d raw η⟩ from the tangents of the previous step.

  Args:
    state: an online-mode HPO state whose tangents are dθ_t/d raw η.
    grads: the training-loss gradient at θ_t that step t computes anyway.

  Returns:
    {name: scalar} in raw η's dtype (zero before the first tangents exist).
  """
  if state.tangents is None:
    raise ValueError("online_hypergradient needs the tangents of an online "
                     "HPO state: init_hpo with hpo.mode='online'")
  return {name: flat_tree.vdot(grads, state.tangents[name]).astype(
      state.raw[name].dtype) for name in HPARAM_NAMES}


def update_hpo(state: HPOState, hypergrad: HParams,
               config: ml_collections.ConfigDict,
               has_signal: bool | jax.Array = True,
               ) -> tuple[HPOState, dict[str, jax.Array]]:
  """η ← clip(η − β·meta_update(mean window hypergradient)) (Eq. 4).

  Pure and jittable. A hypergradient with any NaN/inf entry is skipped and
  counted; one without a signal (`has_signal` False: online mode's first
  step) is skipped and not counted. η moves only when the incremented call
  counter is a multiple of `update_every` and the window holds at least one
  used hypergradient; otherwise η and the η optimizer's state are left as
  they are.

  Args:
    state: the HPO state.
    hypergrad: {name: scalar} ∂L/∂ raw η.
    config: the HPO config.
    has_signal: False (a bool or a traced bool scalar) when `hypergrad` is
      not a measurement (no tangents yet), so it must not reach η's
      optimizer.

  Returns:
    (new state, metrics): η after the update ('learning_rate',
    'weight_decay'), this call's hypergradient ('hypergrad_lr',
    'hypergrad_wd'; 0 where skipped), 'nonfinite_count', and 'updated'
    (1.0 when η moved this call).
  """
  chex.assert_rank([hypergrad[name] for name in HPARAM_NAMES], 0)
  raw = state.raw
  hypergrad = {name: jnp.asarray(hypergrad[name], raw[name].dtype)
               for name in HPARAM_NAMES}
  finite = jnp.all(jnp.stack(
      [jnp.isfinite(hypergrad[name]) for name in HPARAM_NAMES]))
  has_signal = jnp.asarray(has_signal, jnp.bool_)
  chex.assert_rank(has_signal, 0)
  used = finite & has_signal
  safe = {name: jnp.where(used, g, 0.0) for name, g in hypergrad.items()}
  accum = {name: state.accum[name] + safe[name] for name in HPARAM_NAMES}
  accum_count = state.accum_count + used.astype(jnp.int32)
  step = state.step + 1
  at_boundary = step % int(config.update_every) == 0
  apply = at_boundary & (accum_count > 0)

  mean = {name: accum[name] / jnp.maximum(accum_count, 1).astype(
      accum[name].dtype) for name in HPARAM_NAMES}
  updates, meta_state = make_meta_optimizer(config).update(
      mean, state.meta_opt_state, raw)
  moved = optax.apply_updates(raw, updates)
  bounds = raw_bounds(config)
  moved = optax.projections.projection_box(
      moved, {name: bounds[name][0] for name in HPARAM_NAMES},
      {name: bounds[name][1] for name in HPARAM_NAMES})
  moved = {name: moved[name].astype(raw[name].dtype) for name in HPARAM_NAMES}
  keep_if_not = lambda new, old: jnp.where(apply, new, old)
  new_state = state.replace(
      step=step,
      raw=jax.tree.map(keep_if_not, moved, raw),
      meta_opt_state=jax.tree.map(keep_if_not, meta_state,
                                  state.meta_opt_state),
      accum=jax.tree.map(lambda a: jnp.where(at_boundary, 0.0, a).astype(
          a.dtype), accum),
      accum_count=jnp.where(at_boundary, 0, accum_count),
      nonfinite_count=state.nonfinite_count
      + (has_signal & ~finite).astype(jnp.int32))
  hparams = current_hparams(new_state, config)
  metrics = {'learning_rate': hparams['learning_rate'],
             'weight_decay': hparams['weight_decay'],
             'hypergrad_lr': safe['learning_rate'],
             'hypergrad_wd': safe['weight_decay'],
             'nonfinite_count': new_state.nonfinite_count,
             'updated': apply.astype(jnp.float32)}
  return new_state, metrics


def hpo_update(update_fn: UpdateFn, state: HPOState,
               config: ml_collections.ConfigDict, *,
               grads: PyTree | None = None, loss_fn: LossFn | None = None,
               ) -> tuple[PyTree, Any, HPOState, dict[str, jax.Array], Any]:
  """θ⁺ and η's update of one train step, in either mode.

  The one place that dispatches on `config.mode`: `hpo_step` and the HPO
  component (`dha_jax.hpo.component`) both call it. θ⁺ uses the current η;
  then η is updated (see the module docstring).

  Args:
    update_fn: hparams -> (θ⁺, aux), θ's update with η injected (as
      `exact_hypergradient`).
    state: the HPO state.
    config: the HPO config.
    grads: online mode: ∂L_train(θ_t)/∂θ on this step's training batch.
    loss_fn: exact mode: θ -> (mean loss on the HPO batch, aux).

  Returns:
    (θ⁺, update_fn's aux, new HPO state, metrics, aux of loss_fn or None);
    exact mode adds 'hpo_loss' (L_hpo(θ⁺)) to the metrics.
  """
  if config.mode == 'exact':
    if loss_fn is None:
      raise ValueError("hpo.mode='exact' needs loss_fn (θ -> (loss, aux) on "
                       "the HPO batch); or set hpo.mode='online'")
    new_params, update_aux, hypergrad, hpo_loss, aux = (
        exact_hypergradient(update_fn, loss_fn, state, config))
    state, metrics = update_hpo(state, hypergrad, config)
    return new_params, update_aux, state, {**metrics,
                                           'hpo_loss': hpo_loss}, aux
  if grads is None:
    raise ValueError("hpo.mode='online' needs grads (the training-loss "
                     "gradient at θ_t); or set hpo.mode='exact'")
  hypergrad = online_hypergradient(state, grads)
  new_params, update_aux, tangents = online_tangents(update_fn, state, config)
  # Every call stores tangents, so only the first has none to use.
  state, metrics = update_hpo(state.replace(tangents=tangents), hypergrad,
                              config, has_signal=state.step > 0)
  return new_params, update_aux, state, metrics, None


def hpo_step(tx: optax.GradientTransformation, params: PyTree, grads: PyTree,
             opt_state: optax.OptState, state: HPOState,
             config: ml_collections.ConfigDict,
             loss_fn: LossFn | None = None,
             ) -> tuple[PyTree, optax.OptState, HPOState, dict[str, jax.Array],
                        Any]:
  """`hpo_update` through θ's own optimizer step (`inner_step`).

  Args:
    tx: θ's optimizer (`make_inner_optimizer`).
    params: θ_t.
    grads: ∂L_train(θ_t)/∂θ on this step's training batch.
    opt_state: `tx`'s state.
    state: the HPO state.
    config: the HPO config.
    loss_fn: exact mode: θ -> (mean loss on the HPO batch, aux). Unused
      in online mode.

  Returns:
    (θ⁺, tx's new state, new HPO state, metrics, aux of loss_fn or None);
    exact mode adds 'hpo_loss' (L_hpo(θ⁺)) to the metrics.
  """
  return hpo_update(functools.partial(inner_step, tx, params, grads,
                                      opt_state),
                    state, config, grads=grads, loss_fn=loss_fn)
