"""Tests of the depthwise conv implementations: one function, four forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax import train
from dha_jax.nas import batch_chunks
from dha_jax.nas import cpu_kernels
from dha_jax.nas import depthwise
from dha_jax.nas import network
from dha_jax.nas import search_space as ss
from tests.tiny import assert_same_network_function
from tests.tiny import tiny_config

# (kernel, stride, dilation, size): every (k, s, d) that DARTS' sep/dil convs
# use, on even and odd sizes (odd strided sizes test the last window); k = 7
# (MobileNet) and an even k, which the 'ffi' kernels compute with their
# loops for any k.
CASES = [(3, 1, 1, 8), (5, 1, 1, 8), (3, 2, 1, 8), (5, 2, 1, 7),
         (3, 1, 2, 8), (5, 1, 2, 9), (3, 2, 2, 7), (5, 2, 2, 8),
         (7, 2, 1, 9), (4, 1, 1, 8)]
OTHER_IMPLS = ('shifted', 'block_diagonal', 'ffi')


def _loss(impl, stride, dilation, padding):
  def loss(x, kernel):
    y = depthwise.depthwise_conv(x, kernel, stride=stride, dilation=dilation,
                                 padding=padding, impl=impl)
    return jnp.sum(jnp.sin(y)), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize('impl', OTHER_IMPLS)
@pytest.mark.parametrize('k,stride,dilation,size', CASES)
def test_value_and_gradient_equal_the_grouped_conv(impl, k, stride, dilation,
                                                   size):
  channels = 11    # 'ffi': one block of 8 channels as a vector, 3 alone
  rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
  x = jnp.asarray(rng.normal(size=(2, size, size, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, channels)), jnp.float32)
  padding = dilation * (k - 1) // 2
  (_, y_ref), g_ref = _loss('grouped', stride, dilation, padding)(x, kernel)
  (_, y), g = _loss(impl, stride, dilation, padding)(x, kernel)
  expected = depthwise.output_size(size, k, stride, dilation, padding)
  assert y.shape == y_ref.shape == (2, expected, expected, channels)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('chunk_images,batch', [(1, 3), (4, 6), (2, 5)])
def test_kernel_gradient_summed_over_chunks_of_images(monkeypatch,
                                                       chunk_images, batch):
  """'shifted''s ∂kernel sums over chunks of the batch: with chunks of at
  most `chunk_images` images (the largest divisor of the batch not above
  it: 1, 3 and 1 images here) it equals the grouped conv's."""
  k, stride, dilation, size, channels = 5, 2, 1, 7, 3
  monkeypatch.setattr(batch_chunks, 'CHUNK_BYTES',
                      chunk_images * 4 * 4 * channels * 4)
  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, channels)), jnp.float32)
  (_, _), g_ref = _loss('grouped', stride, dilation, 2)(x, kernel)
  (_, _), g = _loss('shifted', stride, dilation, 2)(x, kernel)
  np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-4)


def test_each_channel_is_filtered_by_its_own_kernel_only():
  x = jnp.zeros((1, 5, 5, 2)).at[0, 2, 2, 0].set(1.0)   # impulse, channel 0
  kernel = jnp.arange(18, dtype=jnp.float32).reshape(3, 3, 1, 2)
  for impl in depthwise.IMPLEMENTATIONS:
    y = depthwise.depthwise_conv(x, kernel, padding=1, impl=impl)
    # Correlation: the impulse reappears as channel 0's kernel, flipped.
    np.testing.assert_allclose(y[0, 1:4, 1:4, 0], kernel[::-1, ::-1, 0, 0])
    np.testing.assert_allclose(y[..., 1], 0.0)


def test_module_has_nn_conv_parameters_and_output():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
  reference = nn.Conv(4, (5, 5), strides=2, padding=4, kernel_dilation=2,
                      feature_group_count=4, use_bias=False)
  ref_vars = reference.init(jax.random.key(1), x)
  for impl in depthwise.IMPLEMENTATIONS:
    module = depthwise.DepthwiseConv(5, stride=2, dilation=2, padding=4,
                                     impl=impl)
    variables = module.init(jax.random.key(1), x)
    np.testing.assert_array_equal(variables['params']['kernel'],
                                  ref_vars['params']['kernel'])
    np.testing.assert_allclose(module.apply(variables, x),
                               reference.apply(ref_vars, x),
                               rtol=1e-5, atol=1e-5)


def test_resolve_by_backend():
  # The tests' process has two devices: an FFI call would run on the whole
  # batch on each, so 'auto' keeps the form XLA partitions.
  assert depthwise.resolve('auto', 'cpu') == 'shifted'
  assert depthwise.resolve('auto', 'gpu') == 'grouped'
  assert depthwise.resolve('auto', 'tpu') == 'grouped'
  assert depthwise.resolve('block_diagonal', 'cpu') == 'block_diagonal'
  assert depthwise.resolve('shifted', 'gpu') == 'shifted'
  with pytest.raises(ValueError, match='model.depthwise'):
    depthwise.resolve('fft')
  with pytest.raises(ValueError, match=r'\[k, k, 1, 3\]'):
    depthwise.depthwise_conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 3)))
  with pytest.raises(ValueError, match="CPU only.*model.depthwise"):
    depthwise.resolve('ffi', 'gpu')


def test_auto_is_ffi_where_the_kernels_are_preferred(kernels_preferred):
  assert depthwise.resolve('auto', 'cpu') == 'ffi'
  assert depthwise.resolve('auto', 'gpu') == 'grouped'


def test_without_cpu_kernels_auto_is_shifted_and_ffi_an_error(monkeypatch):
  reason = 'no C++ compiler: (test)'
  monkeypatch.setattr(cpu_kernels, 'available', lambda: False)
  monkeypatch.setattr(cpu_kernels, 'preferred', lambda: False)
  monkeypatch.setattr(cpu_kernels, 'unavailable_reason', lambda: reason)
  assert depthwise.resolve('auto', 'cpu') == 'shifted'
  with pytest.raises(ValueError, match=r'no C\+\+ compiler.*model.depthwise'):
    depthwise.resolve('ffi', 'cpu')


def test_ffi_refuses_other_dtypes_by_name():
  x = jnp.zeros((1, 4, 4, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match="float32.*'shifted'"):
    depthwise.depthwise_conv(x, jnp.zeros((3, 3, 1, 3), jnp.bfloat16),
                             padding=1, impl='ffi')


def test_network_is_the_same_function_whichever_implementation():
  """The DARTS-V2 child network (sep and dil convs in both cells): the same
  parameter tree, logits and gradients for each implementation."""
  arch = ss.genotype_architecture(ss.DARTS_V2)
  x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3))
  models = {impl: network.DARTSNetwork(5, 4, 3, depthwise=impl)
            for impl in ('grouped',) + OTHER_IMPLS}
  variables = models['grouped'].init({'params': jax.random.key(0)}, x, arch,
                                     train=False)
  for impl, model in models.items():
    shapes = jax.eval_shape(lambda m=model: m.init(
        {'params': jax.random.key(0)}, x, arch, train=False))
    assert (jax.tree.structure(shapes)
            == jax.tree.structure(variables)), impl
  for impl in OTHER_IMPLS:
    assert_same_network_function(models[impl], models['grouped'], variables,
                                 x, arch, rtol=1e-4, atol=1e-5)


def test_an_unknown_implementation_is_a_config_error():
  config = tiny_config('train', {'model.depthwise': 'fft'})
  with pytest.raises(ValueError, match='model.depthwise'):
    train.create_model(config, num_classes=10)
