"""The house rules that a reader relies on, checked on the source.

The loop and the step know components only through their hooks: no module
outside a component package names one (its name as a string, its module as
an import), except `dha_jax/modes.py`, the composition root.
"""

import ast
import importlib.util
import os

import pytest

from dha_jax import modes

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'dha_jax')
COMPONENT_NAMES = set(modes.FACTORIES)
# Modules that may import a component package: the package itself and the
# composition root.
COMPONENT_MODULES = ('dha_jax.augment.component', 'dha_jax.nas.component',
                     'dha_jax.hpo.component', 'dha_jax.hpo.hypergradient')
OUTSIDE = ('main.py', 'train.py', 'step.py', 'components.py', 'data.py',
           'parallel.py', 'plots.py')


# Packages whose namespace holds their components: a module may import one
# of their submodules (shared math), not the package or a name from it.
COMPONENT_PACKAGES = ('dha_jax.hpo', 'dha_jax.augment')


def _is_submodule(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def _forbidden_imports(source: str) -> set[str]:
  """The component modules that `source` imports (the module, or a name
  from it, however spelt) and the component packages it takes as a whole
  or takes a non-module name from."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      bound = [a.name for a in node.names]
      reached = bound
    elif isinstance(node, ast.ImportFrom) and node.module:
      bound = [f'{node.module}.{a.name}' for a in node.names]
      reached = [node.module] + bound
    else:
      continue
    found.update(m for m in COMPONENT_MODULES for name in reached
                 if name == m or name.startswith(m + '.'))
    found.update(p for p in COMPONENT_PACKAGES for name in bound
                 if name == p or (name.rpartition('.')[0] == p
                                  and not _is_submodule(name)))
  return found


def test_the_import_check_sees_every_form():
  for source in ('import dha_jax.nas.component',
                 'from dha_jax.nas import component',
                 'from dha_jax.nas.component import make_component',
                 'from dha_jax.nas.component import make_component as m',
                 'import dha_jax.hpo',
                 'from dha_jax import augment',
                 'from dha_jax.hpo import make_anything'):
    assert _forbidden_imports(source), source
  for source in ('from dha_jax.nas import network',
                 'from dha_jax.hpo import inner',
                 'from dha_jax.augment import base as augment_base',
                 'from dha_jax import components'):
    assert not _forbidden_imports(source), source


@pytest.mark.parametrize('module', OUTSIDE)
def test_no_component_is_named_outside_itself(module):
  with open(os.path.join(PACKAGE, module)) as f:
    source = f.read()
  strings = {node.value for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)}
  assert not strings & COMPONENT_NAMES, (module, strings & COMPONENT_NAMES)
  # A whole component package, or one of its component modules.
  assert not _forbidden_imports(source), module


def test_the_modes_name_only_registered_components():
  for spec in modes.MODES.values():
    for phase in spec.phases():
      assert set(phase.components) <= COMPONENT_NAMES, phase
