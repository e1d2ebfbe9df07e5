"""Test session set-up: 2 fake CPU devices, cheap compiles, a compile cache.

XLA_FLAGS must be set before JAX initialises its backend, hence here.
"""

import os

os.environ.setdefault('XLA_FLAGS',
                      '--xla_force_host_platform_device_count=2')
_CACHE = os.path.join(os.path.dirname(os.path.dirname(__file__)), '.jax_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # pylint: disable=g-import-not-at-top

# Compile time dominates these tests; the flax examples' tests do the same.
jax.config.update('jax_disable_most_optimizations', True)
