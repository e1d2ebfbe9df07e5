"""Offline default: scikit-learn's bundled digits, a tiny DARTS network.

Runs on a laptop CPU in a few minutes with nothing downloaded:

  python -m dha_jax.main --config=configs/default.py --workdir=/tmp/dha_default

Every other config file starts from this one and overrides fields; every
field is documented here.
"""

import ml_collections

from dha_jax import hpo
from dha_jax.augment import component as da_component
from dha_jax.nas import component as nas_component


def get_config() -> ml_collections.ConfigDict:
  """The default configuration (every field documented)."""
  config = ml_collections.ConfigDict()
  # Seed of parameter init, augmentation sampling, batch order and dropout.
  config.seed = 0
  # What to run (the paper's methods; dha_jax/modes.py MODES):
  #   'train'               train the fixed genotype `model.genotype`;
  #   'dha'                 one-stage ISTA-NAS + DA + HPO, jointly (DHA);
  #   'ista_one_stage'      NAS only (One-Stage ISTA);
  #   'nas_da', 'nas_hpo'   joint ablations;
  #   'ista_two_stage'      search b on the HPO batch, retrain from scratch;
  #   'sequential_dha', 'sequential_nas_da', 'sequential_nas_hpo'
  #                         two-stage search, then train the genotype from
  #                         scratch with DA and/or HPO.
  config.mode = 'dha'

  # ---------------------------------------------------------------- data
  config.dataset = ml_collections.ConfigDict()
  # Input source: 'digits' (scikit-learn's 8x8 digits, offline), 'image_folder'
  # (a directory or .zip laid out split/class/image) or 'tfds' (a prepared
  # TFDS dataset, read without TensorFlow through tfds.data_source).
  config.dataset.source = 'digits'
  # TFDS dataset name (source='tfds'), e.g. 'cifar10', 'imagenet2012'.
  config.dataset.name = ''
  # TFDS data_dir ('' = TFDS's default, ~/tensorflow_datasets).
  config.dataset.data_dir = ''
  # Image folder directory or .zip (source='image_folder').
  config.dataset.path = ''
  # Images are stored as uint8 squares of this size (before any crop).
  config.dataset.image_size = 16
  # Fraction of the training split held out as the HPO split.
  config.dataset.val_ratio = 0.1
  # Seed of the deterministic subset selection and train/HPO split.
  config.dataset.split_seed = 0
  # Use at most this many training / test examples (-1: all).
  config.dataset.max_train_examples = -1
  config.dataset.max_test_examples = -1
  # Split names of the source (TFDS imagenet2012 uses 'validation' as test).
  config.dataset.train_split = 'train'
  config.dataset.test_split = 'test'
  # Per-channel mean / std in [0, 1]; () = computed from training images.
  config.dataset.mean = ()
  config.dataset.std = ()
  # 'auto': decode everything into memory when train + test fit in 4 GiB of
  # uint8, else decode lazily per batch; 'true' / 'false' force it.
  config.dataset.in_memory = 'auto'

  # ------------------------------------------------------ base preprocessing
  config.preprocess = ml_collections.ConfigDict()
  # 'cifar': pad-and-crop + horizontal flip; 'imagenet': random-resized crop to
  # crop_size + flip, centre crop for evaluation; 'none': flip only.
  config.preprocess.mode = 'cifar'
  # Zero padding of the CIFAR-style random crop, in pixels.
  config.preprocess.pad = 2
  # Output size of the random-resized / centre crop ('imagenet' mode).
  config.preprocess.crop_size = 224
  # Horizontal flips in training (off for digits: mirrored digits are wrong).
  config.preprocess.flip = False
  # Side of the Cutout square on training images (0: no Cutout).
  config.preprocess.cutout_size = 0

  # --------------------------------------------------------------- network
  config.model = ml_collections.ConfigDict()
  # The search space and its network (dha_jax/nas/spaces.py): 'darts_cell'
  # (DARTS cells in the DARTS network) or 'mobilenet' (ProxylessNAS' chain
  # of MBConv layers, configs/cifar10_mobilenet.py, imagenet_mobilenet.py).
  config.model.space = 'darts_cell'
  # DARTS cells: width C of the first cells (doubled at each reduction
  # cell).
  config.model.channels = 8
  # DARTS cells: number of cells; reduction cells sit at 1/3 and 2/3 of the
  # depth.
  config.model.layers = 3
  # 'cifar' or 'imagenet'. DARTS: a 3x3 conv stem or three stride-2 convs;
  # MobileNet: stride 1 or 2 in both the stem and the first stage.
  config.model.stem = 'cifar'
  # DARTS cells: auxiliary head after cell 2*layers//3, weighted by
  # aux_weight (the MobileNet network has none: keep it False there).
  config.model.auxiliary = False
  config.model.aux_weight = 0.4
  # MobileNet: searchable layers in each of ProxylessNAS-mobile's 6 stages
  # (widths 32, 40, 80, 96, 192, 320; strides 2, 2, 2, 1, 2, 1; 0 leaves a
  # stage out); every width times width_multiplier, rounded to a multiple
  # of 8; the width of the 1x1 conv before pooling (scaled only by a
  # multiplier above 1, as ProxylessNAS).
  config.model.stage_layers = (4, 4, 4, 4, 4, 1)
  config.model.width_multiplier = 1.0
  config.model.head_channels = 1280
  # Fixed architecture: a built-in genotype of model.space ('darts_v2';
  # MobileNet: 'proxyless_mobile') or the path of a genotype.json of it.
  config.model.genotype = 'darts_v2'
  # Final drop-path probability (ramps linearly from 0 over training).
  # DARTS: every op but the identity; MobileNet: the searched branch of a
  # residual layer (stochastic depth).
  config.model.drop_path_prob = 0.0
  # Implementation of the depthwise convs of sep/dil convs: 'grouped'
  # (feature_group_count, fastest on GPU/TPU), 'ffi' (CPU kernels of our
  # own, compiled on first use with the machine's C++ compiler; the sep/dil
  # convs' ReLU-depthwise-pointwise then runs as one kernel), 'shifted' (k²
  # shifted multiply-adds, the fastest XLA form on CPU) or 'block_diagonal'
  # (a dense conv); 'auto' picks 'grouped' on GPU/TPU, on CPU 'ffi' in a
  # one-device process when the kernels build, else 'shifted'
  # (dha_jax/nas/depthwise.py). The same function and parameters whichever
  # is chosen.
  config.model.depthwise = 'auto'
  # Implementation of the DARTS space's 3×3 max and average pools:
  # 'reduce_window' (XLA's, best on GPU/TPU) or 'shifted' (the max or sum of
  # 9 shifted slices with a written-out backward pass, ~7x faster on CPU);
  # 'auto' picks by backend (dha_jax/nas/pooling.py). The same function.
  config.model.pooling = 'auto'

  # ------------------------------------------------------------- optimizer
  config.optimizer = ml_collections.ConfigDict()
  # SGD with momentum on θ; the learning rate follows a cosine schedule from
  # learning_rate to min_learning_rate over the training steps.
  config.optimizer.learning_rate = 0.05
  config.optimizer.min_learning_rate = 0.0
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 3e-4
  # Global-norm gradient clipping threshold.
  config.optimizer.grad_clip = 5.0
  # 'cosine' or 'constant'.
  config.optimizer.schedule = 'cosine'
  # When a component learns η (HPO): False, the reference code, η is θ's
  # learning rate as it is; True, θ's learning rate is η times this schedule
  # divided by learning_rate (1 during a search, then the cosine decay), so
  # that every mode ends annealed (docs/fidelity.md, 'HPO').
  config.optimizer.anneal_learned_lr = False

  # -------------------------------------------------- AutoML components
  # Each block's fields are documented where it is defined.
  # DA: τ over op pairs (dha_jax/augment/component.py:default_config).
  config.da = da_component.default_config()
  # HPO: η = (learning rate, weight decay)
  # (dha_jax/hpo/hypergradient.py:default_config).
  config.hpo = hpo.default_config()
  # NAS: one-stage ISTA-NAS (dha_jax/nas/component.py:default_config).
  config.nas = nas_component.default_config()
  # Scale-free search dynamics for a run of minutes (docs/fidelity.md,
  # 'Settings that depart from the paper for short runs'); the paper configs
  # keep the reference's. b keeps the reference's scale (1e-3), where
  # Adam's steps of 3e-4 move it as far relative to itself as in the
  # reference; α is normalised per node, so the network's output does not
  # start near zero.
  config.nas.alpha_norm = 'mean_abs'
  # A node freezes once its x̂ moved by at most 10 % of its norm in an
  # epoch, and not before b has had two epochs of steps.
  config.nas.freeze_rule = 'relative'
  config.nas.dist_limit = 0.1
  config.nas.min_freeze_steps = 40
  config.nas.search_epochs = 4
  # Adam on τ moves its logits ~policy_lr per step; the paper's SGD needs
  # ~10⁵ steps to leave uniform (dha_jax/augment/component.py). Eq. 2 has
  # no bound on how far τ goes: at 0.05 it collapsed onto one pair within
  # 400 steps; at 0.01 this config's 400 steps left τ 0.08 nats below
  # uniform, in effect uniform; 0.02 moves it by several tenths of a nat
  # without a collapse (experiments/RESULTS.md, 'Do the searches search?').
  config.da.policy_optimizer = 'adam'
  config.da.policy_lr = 0.02
  # A longer run at that rate still collapses τ (600 steps of a small,
  # overfitting training set did, experiments/RESULTS.md): τ may go at most
  # 1 nat from uniform (perplexity e^4.28 ≈ 72 of the 196 pairs). This
  # config's 400 steps end 0.7 nats from uniform, so the bound never acts.
  config.da.max_kl_from_uniform = 1.0
  # The online hypergradient (next training batch, no extra network pass)
  # keeps the default within minutes on a CPU; the paper configs use Eq. 4.
  config.hpo.mode = 'online'
  # User components, 'module:factory' entries separated by commas; each
  # factory(config) returns a dha_jax.Component (see README).
  config.extra_components = ''

  # ------------------------------------------------------------ the loop
  # Global batch size (divided evenly over all devices).
  config.batch_size = 64
  # Size of the held-out HPO batch that exact HPO (Eq. 4) and the two-stage
  # search forward each step; 0: batch_size, as the reference on CIFAR (on
  # ImageNet it uses half). Exact HPO costs one forward/backward of this
  # batch per step, so a smaller one makes it cheaper and noisier.
  config.heldout_batch_size = 0
  # Evaluation batch size (the last batch is padded and masked).
  config.eval_batch_size = 256
  # Every this many epochs (0 = never), an 'eval' record of metrics.jsonl
  # gives the clean (un-augmented) accuracy and loss on the training examples
  # below and on the HPO split: the learning curves that show overfitting.
  # The test split is evaluated at the end only.
  config.eval_every_epochs = 0
  # The train accuracy (per epoch above, and the summary's `train_accuracy`)
  # is measured on at most this many training examples, drawn once with
  # dataset.split_seed (-1: all of them).
  config.eval_train_examples = 10_000
  # Training length in epochs of the training split, unless num_train_steps
  # is positive, which then wins.
  config.num_epochs = 20
  config.num_train_steps = -1
  # Log training metrics every this many steps.
  config.log_every_steps = 50
  # Also write the metrics (and, at the end, the plots) as TensorBoard events
  # in workdir/tensorboard: `tensorboard --logdir=WORKDIR` shows the run.
  config.tensorboard = True
  # Save a checkpoint every this many steps (and at the end).
  config.checkpoint_every_steps = 200
  # Checkpoints kept in workdir/checkpoints.
  config.keep_checkpoints = 2
  # Folder of JAX's persistent compilation cache ('' = off). Reruns and
  # resumed runs then skip most XLA compilation.
  config.compilation_cache_dir = '~/.cache/dha_jax/xla'
  return config
