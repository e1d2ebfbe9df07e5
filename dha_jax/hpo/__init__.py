"""Hyper-parameter optimisation of η = {learning rate, weight decay}.

* `inner`: θ's optimizer with η injected (Eq. 3), used by every mode, and the
  fixed schedule that stands in for η when no HPO component runs.
* `hypergradient`: η's parameterisation, state and optimizer, the exact
  (Eq. 4) and online hypergradients, `hpo_update` (both modes' dispatch) and
  `hpo_step`.
* `component`: HPO as a `dha_jax.Component`.
"""

from dha_jax.hpo.component import make_component
from dha_jax.hpo.hypergradient import check_config
from dha_jax.hpo.hypergradient import current_hparams
from dha_jax.hpo.hypergradient import default_config
from dha_jax.hpo.hypergradient import exact_hypergradient
from dha_jax.hpo.hypergradient import hpo_step
from dha_jax.hpo.hypergradient import hpo_update
from dha_jax.hpo.hypergradient import HPOState
from dha_jax.hpo.hypergradient import init_hpo
from dha_jax.hpo.hypergradient import initial_hparams
from dha_jax.hpo.hypergradient import make_meta_optimizer
from dha_jax.hpo.hypergradient import online_hypergradient
from dha_jax.hpo.hypergradient import online_tangents
from dha_jax.hpo.hypergradient import raw_bounds
from dha_jax.hpo.hypergradient import to_hparams
from dha_jax.hpo.hypergradient import update_hpo
from dha_jax.hpo.inner import HPARAM_DTYPE
from dha_jax.hpo.inner import HPARAM_NAMES
from dha_jax.hpo.inner import inner_step
from dha_jax.hpo.inner import learning_rate_schedule
from dha_jax.hpo.inner import make_inner_optimizer
from dha_jax.hpo.inner import optimizer_from_config

__all__ = (
    'HPARAM_DTYPE',
    'HPARAM_NAMES',
    'HPOState',
    'check_config',
    'current_hparams',
    'default_config',
    'exact_hypergradient',
    'hpo_step',
    'hpo_update',
    'init_hpo',
    'initial_hparams',
    'inner_step',
    'learning_rate_schedule',
    'make_component',
    'make_inner_optimizer',
    'make_meta_optimizer',
    'online_hypergradient',
    'online_tangents',
    'optimizer_from_config',
    'raw_bounds',
    'to_hparams',
    'update_hpo',
)
