"""The MobileNet-like (ProxylessNAS) network over an `Architecture` PyTree.

One Linen module serves, as `network.DARTSNetwork` does for cells, the
fixed network of a genotype (α = 1 on one op per layer), the sparse child
network of one-stage ISTA-NAS (real-valued α on the current support; only
the supported MBConvs are built and run) and the dense super-network (every
candidate of every layer), which tests and benchmarks use as the reference
for the sparse child. The layers and widths are those of
`mobilenet_space.network_plan`:

    x [N, H, W, 3] → 3×3 conv, stride s₀ → BN → ReLU6
      → MBConv(3×3, e = 1) to 16·w                       (fixed)
      → searchable layer i = 0 .. L−1:
          y = [x +] Σ_{o ∈ S_i} α_{i,o} · MBConv_o(x)     (residual: stride 1,
                                                           width unchanged)
      → 1×1 conv to the head width → BN → ReLU6 → mean over H, W → dense
      → logits [N, classes]

Every candidate's parameters are named by layer and op —
`layer{i}/{op}` — so a parameter tree initialised on the dense support holds
those of every sparse support and pruning it to the final genotype is a key
lookup (`network.prune_params`). Drop path, in training, drops the whole
searched branch of a residual layer (stochastic depth); a layer without a
residual has no identity to fall back on and is never dropped. BatchNorm uses
ProxylessNAS' ε = 1e-3 (docs/fidelity.md, 'NAS', 'MobileNet space').
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from dha_jax.nas import depthwise as depthwise_lib
from dha_jax.nas import dense_conv
from dha_jax.nas import mobilenet_space
from dha_jax.nas import network
from dha_jax.nas import op_weights
from dha_jax.nas.mobilenet_space import LayerSpec, NetworkPlan
from dha_jax.nas.search_space import Architecture, NodeSupport

BN_EPSILON = 1e-3  # ProxylessNAS' BatchNorm ε
STEM_KERNEL = 3


def _conv_bn(x: jax.Array, features: int, kernel: int, stride: int,
             train: bool, name: str) -> jax.Array:
  """conv (no bias, 'same' padding) → BN, named `{name}_conv`, `{name}_bn`."""
  x = dense_conv.Conv(features, (kernel, kernel), strides=stride,
               padding=kernel // 2, use_bias=False, name=f'{name}_conv')(x)
  return network.batch_norm(train, f'{name}_bn', BN_EPSILON)(x)


class MBConv(nn.Module):
  """The inverted-residual body (MobileNetV2), without its residual:

      x [N, H, W, C] → 1×1 conv to e·C → BN → ReLU6        (none when e = 1)
        → depthwise k×k, stride s → BN → ReLU6
        → 1×1 conv to `features` → BN                → [N, H/s, W/s, features]

  `depthwise` picks the depthwise conv's implementation
  (`depthwise.IMPLEMENTATIONS`); its parameter is named as `nn.Conv`'s.
  """
  features: int
  kernel: int
  expansion: int
  stride: int = 1
  depthwise: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.expansion != 1:
      x = nn.relu6(_conv_bn(x, self.expansion * x.shape[-1], 1, 1, train,
                            'expand'))
    x = depthwise_lib.DepthwiseConv(
        self.kernel, self.stride, 1, self.kernel // 2, self.depthwise,
        name='depthwise_conv')(x)
    x = nn.relu6(network.batch_norm(train, 'depthwise_bn', BN_EPSILON)(x))
    return _conv_bn(x, self.features, 1, 1, train, 'project')


class SearchableLayer(nn.Module):
  """One searchable layer: y = [x +] Σ_{o ∈ S} α_o · MBConv_o(x).

  `zero` adds nothing (a residual layer whose support is {zero} passes its
  input through). Call with x [N, H, W, C] and α [|S|] aligned with the
  support's pairs; returns [N, H/s, W/s, spec.features].
  """
  spec: LayerSpec
  support: NodeSupport
  depthwise: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, alphas: jax.Array, *, train: bool,
               drop_path_rate: jax.Array | None) -> jax.Array:
    chex.assert_rank(x, 4)
    chex.assert_shape(alphas, (len(self.support),))
    branch = None
    for k, (_, op) in enumerate(self.support):
      if op == mobilenet_space.ZERO:
        continue
      kernel, expansion = mobilenet_space.MBCONV_SHAPES[op]
      h = op_weights.weight_output(alphas[k], MBConv(
          self.spec.features, kernel, expansion, self.spec.stride,
          self.depthwise, name=op)(x, train))
      branch = h if branch is None else branch + h
    if branch is None:
      if not self.spec.residual:
        raise ValueError(
            f'support {self.support}: `zero` skips a layer through its '
            'identity residual, which a layer that changes the stride or '
            'the width lacks; give it an MBConv')
      return x
    if not self.spec.residual:
      return branch
    if train and drop_path_rate is not None:
      branch = network.drop_path(branch, drop_path_rate,
                                 self.make_rng('dropout'))
    return x + branch


class MobileNetwork(nn.Module):
  """The MobileNet-space network (module docstring) over an `Architecture`
  whose group 'layers' has one node per searchable layer of `plan`.

  Attributes:
    num_classes: classifier outputs.
    plan: widths and strides (`mobilenet_space.network_plan`).
    depthwise: the depthwise convs' implementation
      (`depthwise.IMPLEMENTATIONS`; 'auto' by backend).

  Call: `apply(variables, x, arch, train=..., drop_path_rate=...)` with
  x float [N, H, W, 3] → (logits [N, classes], None: there is no auxiliary
  head). With a `drop_path_rate` (None: no drop path) the dropout rng
  ('dropout') is needed in training.
  """
  num_classes: int
  plan: NetworkPlan
  depthwise: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, arch: Architecture, *, train: bool,
               drop_path_rate: float | jax.Array | None = None
               ) -> tuple[jax.Array, None]:
    chex.assert_rank(x, 4)
    support = arch.support_dict.get(mobilenet_space.GROUP)
    if support is None or len(support) != len(self.plan.layers):
      raise ValueError(
          f'the architecture has groups {sorted(arch.support_dict)} with '
          f'{None if support is None else len(support)} layers; the '
          f'MobileNet network has {len(self.plan.layers)} searchable layers '
          "in group 'layers' (check model.space and model.stage_layers)")
    rate = network.as_drop_path_rate(drop_path_rate)
    plan = self.plan
    x = nn.relu6(_conv_bn(x, plan.stem_width, STEM_KERNEL, plan.stem_stride,
                          train, 'stem'))
    x = MBConv(plan.first_block_width, mobilenet_space.FIRST_BLOCK_KERNEL, 1,
               depthwise=self.depthwise, name='first_block')(x, train)
    for i, (spec, node) in enumerate(zip(plan.layers, support)):
      x = SearchableLayer(spec, node, self.depthwise, name=f'layer{i}')(
          x, arch.weights[mobilenet_space.GROUP][i], train=train,
          drop_path_rate=rate)
    x = nn.relu6(_conv_bn(x, plan.head_width, 1, 1, train, 'head'))
    logits = nn.Dense(self.num_classes, name='classifier')(
        jnp.mean(x, axis=(1, 2)))
    return logits, None
