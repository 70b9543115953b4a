"""PASCAL VOC 2007 (20 classes; paper Tables 1, 3, 6).

Run:  python -m kmcl_jax.main --config=configs/voc.py --workdir=runs/voc \
        --config.dataset.root=/path/to/VOC2007-parent
Variants: configs/voc.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding VOCdevkit/VOC2007/{JPEGImages,ImageSets/Main}.
"""

from ml_collections import ConfigDict, FieldReference

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'voc2007'
  c.dataset.train_split = 'trainval'
  c.dataset.val_split = 'holdout'  # a seeded slice of trainval (VOC has no val labels)
  c.dataset.test_split = 'test'
  # Every option of kmcl_jax.data.voc.voc2007, at its default (README 'Datasets').
  c.dataset.options = ConfigDict(
    {
      'decode_size': FieldReference(None, field_type=int),  # JPEG DCT-scaled decoding size
      'keep_all_negative': True,
      'fraction': FieldReference(None, field_type=float),  # keep the first fraction of a split
      'subset_size': FieldReference(None, field_type=int),  # a seeded random subset
      'subset_seed': 0,
    }
  )
  return base.apply_variant(c, variant)
