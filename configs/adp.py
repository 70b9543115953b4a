"""ADP (Atlas of Digital Pathology, L1: 9 classes; paper Tables 2, 3).

Run:  python -m kmcl_jax.main --config=configs/adp.py --workdir=runs/adp \
        --config.dataset.root=/path/to/ADP
Variants: configs/adp.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding ADP_EncodedLabels_Release1_Flat.csv,
splits/{train,valid,test}.npy and img_res_1um_bicubic/.
"""

from ml_collections import ConfigDict, FieldReference

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'adp'
  c.dataset.train_split = 'train'
  c.dataset.val_split = 'valid'
  c.dataset.test_split = 'test'
  c.dataset.normalization = 'adp'
  # Every option of kmcl_jax.data.adp.adp, at its default.
  c.dataset.options = ConfigDict(
    {
      'level': 'L1',  # 'L1' | 'L2' | 'L3' | 'L3Only'
      'decode_size': FieldReference(None, field_type=int),
      'keep_all_negative': False,  # drop rows without labels
      'fraction': FieldReference(None, field_type=float),
      'subset_size': FieldReference(None, field_type=int),
      'subset_seed': 0,
    }
  )
  return base.apply_variant(c, variant)
