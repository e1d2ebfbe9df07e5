"""Multiply-adds of a network: the compute resource of Eq. 1's constraint.

The MobileNet and ProxylessNAS papers measure a network's compute as the
multiply-adds of its convolutions and dense layers for one image (their
"FLOPs"); elementwise ops (BatchNorm, activations, additions) are not
counted and a convolution is charged for every output element and every tap,
padding included:

  conv:  prod(output shape) · kh · kw · C_in / groups
  dense: prod(output shape) · contracted size

`multiply_adds` traces the function to a jaxpr (no compilation, no FLOP is
run) with the CPU kernels off (`cpu_kernels.preference(False)`: their FFI
calls hide their work, and the XLA forms compute the same function), and
sums these over its `conv_general_dilated` and `dot_general` equations,
nested jaxprs (jit, checkpointing, custom derivatives) included, a scan's
body once per iteration. What the jaxpr cannot weigh raises
`UncountableError` instead of being left out: an FFI call or a host
callback (its work is opaque; an explicit depthwise implementation 'ffi' is
one: count the XLA form), a while loop (its trip count is a value) and a
cond (which branch runs is a value).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.extend import core as jax_core

from dha_jax.nas import cpu_kernels

# Primitives whose multiply-adds run outside the jaxpr.
_OPAQUE = ('ffi_call', 'pure_callback', 'io_callback')
# Primitives whose nested jaxprs run a number of times known only at run time.
_DATA_DEPENDENT = ('while', 'cond')


class UncountableError(ValueError):
  """The jaxpr holds work whose multiply-adds it cannot tell."""


def _nested_jaxprs(params: dict[str, Any]) -> Iterator[jax_core.Jaxpr]:
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def jaxpr_multiply_adds(jaxpr: jax_core.Jaxpr) -> int:
  """Multiply-adds of the convolutions and dot products of `jaxpr`.

  Raises:
    UncountableError: `jaxpr` holds an FFI call, a callback, a while loop or
      a cond (see the module docstring).
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in _OPAQUE:
      raise UncountableError(
          f'cannot count the multiply-adds of a {name} (its work is not in the '
          f'jaxpr): trace the pure-XLA form of the function instead')
    if name in _DATA_DEPENDENT:
      raise UncountableError(
          f'cannot count the multiply-adds of a {name}: how often its body '
          f'runs is known only at run time')
    out_size = int(np.prod(eqn.outvars[0].aval.shape)) if eqn.outvars else 0
    if name == 'conv_general_dilated':
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params['dimension_numbers'].rhs_spec[0]]
      # The kernel holds kh · kw · C_in/groups taps per output feature.
      total += out_size * int(np.prod(kernel)) // out_features
    elif name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += out_size * int(np.prod([lhs[d] for d in contracting]))
    repeats = eqn.params['length'] if name == 'scan' else 1
    for nested in _nested_jaxprs(eqn.params):
      total += repeats * jaxpr_multiply_adds(nested)
  return total


def multiply_adds(fn: Callable[..., Any], *args: Any) -> int:
  """Multiply-adds of `fn(*args)`; `args` may be `jax.ShapeDtypeStruct`s.
  Traced with the CPU kernels off (module docstring); raises
  `UncountableError` as `jaxpr_multiply_adds` does."""
  with cpu_kernels.preference(False):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return jaxpr_multiply_adds(jaxpr)
