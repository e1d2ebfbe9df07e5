"""CIFAR-100, DARTS cell space (paper Table 1, second column): DHA.

The CIFAR-10 settings with 100 classes and CIFAR-100 statistics:

  python -m dha_jax.main --config=configs/cifar100_cell.py --workdir=DIR
"""

import ml_collections

from configs import cifar10_cell


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_cell.get_config()
  config.dataset.name = 'cifar100'
  config.dataset.mean = (0.5071, 0.4865, 0.4409)
  config.dataset.std = (0.2673, 0.2564, 0.2762)
  return config
