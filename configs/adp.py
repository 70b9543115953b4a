"""ADP (Atlas of Digital Pathology, L1: 9 classes; paper Tables 2, 3).

Run:  python -m kmcl_jax.main --config=configs/adp.py --workdir=runs/adp \
        --config.dataset.root=/path/to/ADP
Variants: configs/adp.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding ADP_EncodedLabels_Release1_Flat.csv, splits/{train,valid,test}.npy and img_res_1um_bicubic/.
"""

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'adp'
  c.dataset.train_split = 'train'
  c.dataset.val_split = 'valid'
  c.dataset.test_split = 'test'
  c.dataset.normalization = 'adp'
  c.dataset.options.level = 'L1'
  return base.apply_variant(c, variant)
