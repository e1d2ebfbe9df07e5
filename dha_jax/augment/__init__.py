"""The DA component's functions: Pillow's ops, policy τ, base augmentation.

* `ops`: the 14 AutoAugment ops of DHA (`OP_NAMES`), per image and batched
  with traced per-example op ids (`apply_ops`), and `augment_pairs`, which
  the train step calls with the pairs sampled from τ.
* `policy`: τ as [K, K] logits over ordered op pairs: Gumbel-perturbed
  sampling, the DA loss of Eq. 2, entropy, `policy.json` export.
* `base`: crops, flips, normalisation and Cutout around the op pair.
"""

from dha_jax.augment import base
from dha_jax.augment import ops
from dha_jax.augment import policy
from dha_jax.augment.ops import apply_op
from dha_jax.augment.ops import apply_ops
from dha_jax.augment.ops import augment_pairs
from dha_jax.augment.ops import DEFAULT_FILL_VALUE
from dha_jax.augment.ops import NUM_OPS
from dha_jax.augment.ops import OP_NAMES
from dha_jax.augment.ops import PAPER_MAX_LEVEL
from dha_jax.augment.ops import REFERENCE_MAX_LEVEL
from dha_jax.augment.policy import export_policy
from dha_jax.augment.policy import init_policy
from dha_jax.augment.policy import pair_log_probs
from dha_jax.augment.policy import pair_probs
from dha_jax.augment.policy import perturbed_pair_probs
from dha_jax.augment.policy import policy_entropy
from dha_jax.augment.policy import policy_loss
from dha_jax.augment.policy import sample_pairs

__all__ = (
    'DEFAULT_FILL_VALUE',
    'NUM_OPS',
    'OP_NAMES',
    'PAPER_MAX_LEVEL',
    'REFERENCE_MAX_LEVEL',
    'apply_op',
    'apply_ops',
    'augment_pairs',
    'base',
    'export_policy',
    'init_policy',
    'ops',
    'pair_log_probs',
    'pair_probs',
    'perturbed_pair_probs',
    'policy',
    'policy_entropy',
    'policy_loss',
    'sample_pairs',
)
