"""Shared defaults: the paper's recipe (docs/training.md: paper Table 6, the authors' train.py).

Dataset configs start from `get_base_config()` and change only what differs. Every setting the
trainer reads is declared here; `--config.x=y` overrides any of them on the command line, and an
unknown key is an error (the config is locked).
"""

import ml_collections

# Encoder name -> training resolution used in the paper.
MODEL_VARIANTS = {'tresnet_m': 224, 'tresnet_l': 448, 'tresnet_xl': 448, 'tresnet_v2_l': 448}


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = ''  # a key of kmcl_jax.data.SOURCES
  c.dataset.root = ''  # dataset folder (see README 'Datasets')
  c.dataset.train_split = 'train'
  c.dataset.val_split = ''  # model selection split; '' = select on the final epoch
  c.dataset.holdout_fraction = 0.05  # of train, held out when val_split = 'holdout'
  c.dataset.test_split = 'test'  # evaluated once at the end with the selected weights
  c.dataset.select_on_test = False  # the authors' practice: select on test (only when asked)
  # Extra keyword options for kmcl_jax.data.get_source (e.g. level, subset_size, fraction,
  # keep_all_negative, decode_size, num_examples); applied to every split.
  c.dataset.options = ml_collections.ConfigDict()
  c.dataset.augment = 'randaugment'  # 'randaugment' | 'affine' (ChestX-ray14) | 'none'
  # Where CutoutPIL + RandAugment/affine run: 'on' = in the jitted train step (the host only
  # decodes and resizes), 'off' = on the host (PIL), 'auto' = 'on' unless the backend is the
  # CPU (README 'Augmentation on the device').
  c.dataset.augment_device = 'auto'
  c.dataset.normalization = 'imagenet'  # a key of kmcl_jax.data.pipeline.NORMALIZATION
  c.dataset.difficult_as_positive = True  # VOC: train on difficult as positive (authors)
  c.dataset.skip_unreadable = False  # True: skip and count unreadable images instead of stopping
  c.dataset.worker_count = 2  # grain worker processes for the train pipeline
  # Train batches made into device arrays ahead of the step by a background thread (0: none).
  c.dataset.device_prefetch = 2

  c.model = ml_collections.ConfigDict()
  c.model.name = 'tresnet_m'  # kmcl_jax.models.create_encoder name
  c.model.image_size = 224
  c.model.dtype = 'float32'  # 'bfloat16': bf16 compute, f32 params/BN stats/losses
  # Encoder constructor overrides (e.g. width, layers) for small models; empty = the real one.
  c.model.overrides = ml_collections.ConfigDict()
  c.model.kind = 'bhattacharyya'  # KMM variances: 'bhattacharyya'|'mahalanobis'|'gaussian'
  c.model.anisotropic = False
  c.model.reduced_dim = 128  # D of the anisotropic case

  c.loss = ml_collections.ConfigDict()
  c.loss.variant = 'paper'  # 'paper' (Eq. 5-8) | 'official' (the authors' arithmetic)
  c.loss.kind = 'bhattacharyya'  # similarity in L_KMCL; keep equal to model.kind
  c.loss.asl_only = False  # the 'ASL only' baseline: pi head and L_ASL alone
  # None = the variant's value (paper 0.1 / 0.3 / 0.2 / 'mean'; official 1 / 1 / 0.17 / 'sum').
  c.loss.lambda_asl = ml_collections.FieldReference(None, field_type=float)
  c.loss.lambda_kmcl = ml_collections.FieldReference(None, field_type=float)
  c.loss.temperature = ml_collections.FieldReference(None, field_type=float)
  c.loss.asl_reduction = ml_collections.FieldReference(None, field_type=str)
  c.loss.asl_gamma_pos = 0.0
  c.loss.asl_gamma_neg = 4.0
  c.loss.asl_clip = 0.05
  c.loss.asl_eps = 1e-7
  c.loss.asl_detach_focusing = True

  c.optim = ml_collections.ConfigDict()
  c.optim.peak_lr = 2e-4
  c.optim.weight_decay = 1e-4  # coupled L2, kernels only
  c.optim.pct_start = 0.2
  c.optim.div_factor = 25.0
  c.optim.final_div_factor = 1e4
  c.optim.base_beta1 = 0.85
  c.optim.max_beta1 = 0.95
  c.optim.beta2 = 0.999
  c.optim.eps = 1e-8
  c.ema_decay = 0.9997

  c.batch_size = 64  # global batch, split over all devices
  c.eval_batch_size = 64
  c.num_epochs = 40.0  # used when num_train_steps < 0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.eval_every_epochs = 5.0  # evaluate model and EMA on the selection split
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000  # plus one at every evaluation and at the end
  # XLA's persistent compilation cache: a restart reuses the compiled steps ('' = off).
  c.compilation_cache_dir = '~/.cache/kmcl_jax/xla'

  c.eval = ml_collections.ConfigDict()
  c.eval.threshold = 0.8  # the authors' threshold for OP/OR/OF1/CP/CR/CF1
  c.eval.top_k = 3
  c.eval.with_auc = False

  c.init_from = ''  # a `python -m kmcl_jax.convert` output directory
  c.init_head = False  # also load a KMM head from init_from (same classes)
  c.export_weights = 'best'  # 'best' (better of model/EMA) | 'ema' | 'model'
  return c


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """'' (TResNet-M 224), an encoder name (at its paper resolution), or 'smoke' (tiny, for tests).

  Several may be joined with ',' (e.g. 'tresnet_l,smoke' is not useful, but 'smoke' alone is).
  """
  for part in filter(None, variant.split(',')):
    if part in MODEL_VARIANTS:
      config.model.name = part
      config.model.image_size = MODEL_VARIANTS[part]
    elif part == 'smoke':
      config.model.image_size = 64
      config.model.overrides = ml_collections.ConfigDict(
        {'width_factor': 0.125, 'layers': (1, 1, 1, 1)}
      )
      config.batch_size = 8
      config.eval_batch_size = 8
      config.num_train_steps = 3
      config.eval_every_epochs = 1.0
      config.log_every_steps = 1
      config.checkpoint_every_steps = 2
      config.dataset.worker_count = 0
    else:
      raise ValueError(
        f'unknown config variant {part!r}: expected one of {sorted(MODEL_VARIANTS) + ["smoke"]}'
      )
  return config
