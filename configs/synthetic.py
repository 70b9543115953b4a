"""The built-in synthetic multilabel set: `make demo`, no downloads, minutes on a CPU.

Run:  python -m kmcl_jax.main --config=configs/synthetic.py --workdir=runs/demo
Variants: configs/synthetic.py:smoke (a few steps, for tests).
Expected data root: none (images are generated from the index and seed; see
kmcl_jax/data/synthetic.py for the classes and their co-occurrence structure).

A small TResNet (width 0.25, one block per stage) at 64 px, trained from scratch with the paper's
objective; the test mAP it reaches is printed at the end with the full metric table.
"""

import ml_collections
from ml_collections import FieldReference

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'synthetic'
  c.dataset.train_split = 'train'
  c.dataset.val_split = 'val'
  c.dataset.test_split = 'test'
  # Every option of kmcl_jax.data.synthetic.synthetic; num_examples None = the split's default
  # size (train 6000, val 1000, test 1000).
  c.dataset.options = ml_collections.ConfigDict(
    {
      'num_examples': FieldReference(None, field_type=int),
      'image_size': 64,
      'num_classes': 10,
      'seed': 0,
    }
  )
  c.dataset.worker_count = 0  # 2 CPU cores: decoding threads beat extra processes here
  c.model.image_size = 64
  c.model.overrides = ml_collections.ConfigDict({'width_factor': 0.25, 'layers': (1, 1, 1, 1)})
  c.optim.peak_lr = 2e-3  # from scratch, not fine-tuning: a larger step
  c.ema_decay = 0.99  # few hundred steps: the paper's 0.9997 would lag
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_epochs = 20.0
  c.eval_every_epochs = 5.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 200
  if variant == 'smoke':
    c.dataset.options.num_examples = 64
  return base.apply_variant(c, variant)
