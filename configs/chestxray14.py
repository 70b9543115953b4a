"""NIH ChestX-ray14 (14 classes; paper Table 2).

Run:  python -m kmcl_jax.main --config=configs/chestxray14.py --workdir=runs/chestxray14 \
        --config.dataset.root=/path/to/chestxray14
Variants: configs/chestxray14.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding Data_Entry_2017.csv, train_val_list.txt, test_list.txt
and images/ (or images_001/images/ ...).
"""

from ml_collections import ConfigDict, FieldReference

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'chestxray14'
  c.dataset.train_split = 'train'  # train_val minus the patients of 'val'
  c.dataset.val_split = 'val'
  c.dataset.test_split = 'test'
  c.dataset.augment = 'affine'  # RandomAffine instead of RandAugment (authors)
  c.dataset.normalization = 'chestxray14'
  c.eval.with_auc = True
  # Every option of kmcl_jax.data.chestxray14.chestxray14, at its default; the authors' reader
  # is keep_all_negative=False, fraction=0.1.
  c.dataset.options = ConfigDict(
    {
      'decode_size': FieldReference(None, field_type=int),
      'keep_all_negative': True,
      'fraction': FieldReference(None, field_type=float),
      'subset_size': FieldReference(None, field_type=int),
      'subset_seed': 0,
      'val_fraction': 0.1,  # of train_val's patients -> 'val'
      'split_seed': 0,
    }
  )
  return base.apply_variant(c, variant)
