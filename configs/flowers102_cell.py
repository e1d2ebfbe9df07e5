"""Oxford Flowers-102, DARTS cell space (paper Table 1): DHA.

The Sport8 settings on TFDS `oxford_flowers102` (prepared in the array_record
format; its 'test' split is the test set):

  python -m dha_jax.main --config=configs/flowers102_cell.py --workdir=DIR \
    --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

import ml_collections

from configs import sport8_cell


def get_config() -> ml_collections.ConfigDict:
  config = sport8_cell.get_config()
  config.dataset.source = 'tfds'
  config.dataset.name = 'oxford_flowers102'
  return config
