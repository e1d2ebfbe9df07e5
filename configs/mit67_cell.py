"""MIT67 indoor scenes, DARTS cell space (paper Table 1): DHA.

The Sport8 settings on the MIT67 image folder (`split/class/image`):

  python -m dha_jax.main --config=configs/mit67_cell.py --workdir=DIR \
    --config.dataset.path=/data/mit67.zip
"""

import ml_collections

from configs import sport8_cell


def get_config() -> ml_collections.ConfigDict:
  config = sport8_cell.get_config()
  config.dataset.name = 'mit67'
  return config
