"""ImageNet, MobileNet-like space (paper Table 2, "DHA (M)"): DHA.

The space of ProxylessNAS (Cai et al., 2019), which the paper follows: the
MobileNetV2 stem and head, ProxylessNAS-mobile's stages (widths 32, 40, 80,
96, 192, 320; 4, 4, 4, 4, 4, 1 searchable layers; strides 2, 2, 2, 1, 2,
1), each layer choosing MBConv k ∈ {3, 5, 7} × e ∈ {3, 6} or, after the
first of a stage, `zero` (docs/design.md, 'Search spaces'; choices and
deviations in docs/fidelity.md, 'NAS', 'MobileNet space'). The paper gives
one ImageNet training setting; it is that of configs/imagenet_cell.py
(batch 1024, lr 0.5, wd 3e-5, 250 epochs, 50 of search, TFDS
imagenet2012), which this config inherits.

Values the paper does not state:
* the width multiplier, 1.1: the paper's network has 5.3 M parameters, more
  than any network of the width-1.0 space (3.20-5.14 M; ProxylessNAS-mobile
  4.08 M), while at 1.1 the space spans 3.69-5.93 M;
* the resource constraint (Eq. 1), 5.3 M parameters: the size of the
  paper's result, which binds within that range;
* the code length m = 4 per layer (a layer has 6-7 candidates; ISTA-NAS'
  m = 7 would not compress them) and one op per layer, as ProxylessNAS.

  python -m dha_jax.main --config=configs/imagenet_mobilenet.py --workdir=DIR \
    --config.dataset.data_dir=/path/to/tensorflow_datasets

`--config.model.width_multiplier=1.0` gives ProxylessNAS-mobile's exact
widths; `--config.mode=train` trains ProxylessNAS-mobile's own network
(`model.genotype='proxyless_mobile'`) or a searched genotype.json.
"""

import ml_collections

from configs import imagenet_cell

PAPER_PARAMS_MB = 5.3


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_cell.get_config()
  config.model.space = 'mobilenet'
  config.model.stem = 'imagenet'
  config.model.stage_layers = (4, 4, 4, 4, 4, 1)
  config.model.width_multiplier = 1.1
  config.model.head_channels = 1280
  config.model.genotype = 'proxyless_mobile'
  # The MobileNet network has no auxiliary head.
  config.model.auxiliary = False
  config.nas.proj_dims = 4
  config.nas.ops_per_layer = 1
  # α as Eq. 7 gives it, the reference's (as in configs/imagenet_cell.py);
  # runs of minutes normalise it over all layers instead ('group_mean_abs',
  # configs/cifar10_mobilenet.py), as per layer it would be ±1.
  config.nas.alpha_norm = 'none'
  config.nas.param_limit_mb = PAPER_PARAMS_MB
  return config
