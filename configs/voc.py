"""PASCAL VOC 2007 (20 classes; paper Tables 1, 3, 6).

Run:  python -m kmcl_jax.main --config=configs/voc.py --workdir=runs/voc \
        --config.dataset.root=/path/to/VOC2007-parent
Variants: configs/voc.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding VOCdevkit/VOC2007/{JPEGImages,ImageSets/Main}.
"""

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'voc2007'
  c.dataset.train_split = 'trainval'
  c.dataset.val_split = 'holdout'        # a seeded slice of trainval (VOC has no val labels)
  c.dataset.test_split = 'test'
  return base.apply_variant(c, variant)
