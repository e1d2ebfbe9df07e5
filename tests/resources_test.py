"""Multiply-adds counted from the jaxpr, against hand counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dha_jax import train
from dha_jax.nas import cpu_kernels
from dha_jax.nas import network
from dha_jax.nas import resources
from dha_jax.nas import search_space

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('resources_test')


class _Net(nn.Module):
  """A 3×3 conv (stride 2, SAME), a grouped 3×3 conv, a pooled dense layer."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3), strides=2, padding='SAME')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True)(x))
    x = nn.Conv(16, (3, 3), feature_group_count=4, padding='SAME')(x)
    x = jax.jit(lambda y: jnp.mean(y, axis=(1, 2)))(x)
    return nn.Dense(10)(x)


def test_multiply_adds_of_convs_and_dense_layers_by_hand():
  model = _Net()
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros(x.shape)))
  # Per image: conv 4·4·16 outputs × 3·3·3 taps; grouped conv 4·4·16 ×
  # 3·3·(16/4); dense 10 × 16. Padding and elementwise ops are not counted.
  per_image = 4 * 4 * 16 * 27 + 4 * 4 * 16 * 36 + 10 * 16
  assert resources.multiply_adds(model.apply, variables, x) == 2 * per_image


def test_nested_jaxprs_are_counted():
  def matmul(a, b):
    return jax.jit(jax.checkpoint(jnp.matmul))(a, b)

  a = jax.ShapeDtypeStruct((3, 5), jnp.float32)
  b = jax.ShapeDtypeStruct((5, 7), jnp.float32)
  assert resources.multiply_adds(matmul, a, b) == 3 * 5 * 7


def test_a_scan_body_is_counted_once_per_iteration():
  def chain(x, kernels):
    return jax.lax.scan(lambda y, k: (y @ k, None), x, kernels)[0]

  x = jax.ShapeDtypeStruct((3, 5), jnp.float32)
  kernels = jax.ShapeDtypeStruct((4, 5, 5), jnp.float32)
  assert resources.multiply_adds(chain, x, kernels) == 4 * 3 * 5 * 5


@pytest.mark.parametrize('loop', ['while', 'cond'])
def test_work_of_unknown_repetition_is_refused(loop):
  def f(a):
    if loop == 'while':
      return jax.lax.while_loop(lambda y: y[0, 0] < 1, lambda y: y @ y, a)
    return jax.lax.cond(a[0, 0] > 0, lambda: a @ a, lambda: a)

  a = jax.ShapeDtypeStruct((3, 3), jnp.float32)
  with pytest.raises(resources.UncountableError, match=loop):
    resources.multiply_adds(f, a)


def test_an_ffi_call_is_refused():
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
  kernel = jax.ShapeDtypeStruct((3, 2), jnp.float32)
  jaxpr = jax.make_jaxpr(cpu_kernels.relu_pointwise_forward)(x, kernel)
  with pytest.raises(resources.UncountableError, match='ffi_call'):
    resources.jaxpr_multiply_adds(jaxpr.jaxpr)


def _primitives(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for nested in resources._nested_jaxprs(eqn.params):
      yield from _primitives(nested)


def test_a_darts_network_is_counted_as_xla_computes_it(kernels_preferred):
  # Where the kernels are preferred (one CPU device) the network's ReLU-led
  # 1×1 convs are FFI calls; they are counted as their XLA form is.
  arch = search_space.genotype_architecture(search_space.DARTS_V2)
  model = network.DARTSNetwork(num_classes=10, channels=4, layers=3)
  shape = (1, 8, 8, 3)
  variables = train.variable_shapes(model, arch, shape, train=False)
  traced = jax.make_jaxpr(
      lambda v, x: model.clone(depthwise='grouped').apply(
          v, x, arch, train=False))(
              variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  assert 'ffi_call' in set(_primitives(traced.jaxpr))
  # The count of the pure-XLA network (two devices, no kernels).
  assert train.multiply_adds(model, arch, shape) == 90_752
