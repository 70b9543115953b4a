"""NIH ChestX-ray14 (14 classes; paper Table 2).

Run:  python -m kmcl_jax.main --config=configs/chestxray14.py --workdir=runs/chestxray14 \
        --config.dataset.root=/path/to/chestxray14
Variants: configs/chestxray14.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding Data_Entry_2017.csv, train_val_list.txt, test_list.txt and images/ (or images_001/images/ ...).
"""

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'chestxray14'
  c.dataset.train_split = 'train'        # train_val minus the patients of 'val'
  c.dataset.val_split = 'val'
  c.dataset.test_split = 'test'
  c.dataset.augment = 'affine'           # RandomAffine instead of RandAugment (authors)
  c.dataset.normalization = 'chestxray14'
  c.eval.with_auc = True
  return base.apply_variant(c, variant)
