"""MS-COCO 2014 (80 classes; paper Tables 1, 3, 6).

Run:  python -m kmcl_jax.main --config=configs/coco.py --workdir=runs/coco \
        --config.dataset.root=/path/to/coco2014
Variants: configs/coco.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding annotations/instances_{train,val}2014.json, train2014/, val2014/.
"""

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'coco2014'
  c.dataset.train_split = 'train'
  c.dataset.val_split = 'holdout'        # a seeded slice of train2014
  c.dataset.test_split = 'val'           # val2014 is the paper's test set
  c.dataset.options.decode_size = c.model.get_ref('image_size')  # DCT-scaled JPEG decoding
  return base.apply_variant(c, variant)
