"""The house rules that a reader relies on, checked on the source.

The loop and the step know components only through their hooks: no module
outside a component package names one (its name as a string, its module as
an import), except `dha_jax/modes.py`, the composition root.
"""

import ast
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


def _imports(tree: ast.AST) -> set[str]:
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      out.update(f'{node.module}.{a.name}' for a in node.names)
  return out


@pytest.mark.parametrize('module', OUTSIDE)
def test_no_component_is_named_outside_itself(module):
  with open(os.path.join(PACKAGE, module)) as f:
    tree = ast.parse(f.read())
  strings = {node.value for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)}
  assert not strings & COMPONENT_NAMES, (module, strings & COMPONENT_NAMES)
  imported = _imports(tree)
  # A whole component package, or one of its component modules.
  for name in COMPONENT_MODULES + ('dha_jax.hpo', 'dha_jax.augment'):
    assert name not in imported, (module, name)


def test_the_modes_name_only_registered_components():
  for spec in modes.MODES.values():
    for phase in spec.phases():
      assert set(phase.components) <= COMPONENT_NAMES, phase
