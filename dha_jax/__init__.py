"""dha_jax: DHA (joint DA, HPO and NAS) in JAX/Flax/Optax.

The functional API: a `Component` is a few pure functions over its own state
(`dha_jax.components`); the train step (`dha_jax.step`) is composed from a
list of them. The built-in ones are DA (`dha_jax.augment.component`), HPO
(`dha_jax.hpo.make_component`) and NAS (`dha_jax.nas.component`).
"""

from dha_jax.components import Component
from dha_jax.components import StepContext

__all__ = ['Component', 'StepContext']
