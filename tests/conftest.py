"""Test session set-up: 2 fake CPU devices, cheap compiles, a compile cache.

XLA_FLAGS must be set before JAX initialises its backend, hence here.
"""

import os

import pytest

os.environ.setdefault('XLA_FLAGS',
                      '--xla_force_host_platform_device_count=2')
_CACHE = os.path.join(os.path.dirname(os.path.dirname(__file__)), '.jax_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# Compile time dominates these tests (the flax examples' tests do the same).
# Through the environment, so that the runs the tests start as subprocesses
# (the CLI, two processes of a multi-host run) compile cheaply too.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')


def pytest_collection_modifyitems(items):
  """Slow tests first: a worker that draws a long test group late would
  otherwise finish alone, long after the other (pytest -n 2)."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.fixture
def kernels_preferred():
  """The CPU kernels in use by default, as in a process with one device
  (the tests run with two, where the networks use XLA's forms)."""
  from dha_jax.nas import cpu_kernels
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  with cpu_kernels.preference(True):
    yield
