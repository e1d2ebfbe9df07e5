"""Multiply-adds counted from the jaxpr, against hand counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dha_jax.nas import resources

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
