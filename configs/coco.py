"""MS-COCO 2014 (80 classes; paper Tables 1, 3, 6).

Run:  python -m kmcl_jax.main --config=configs/coco.py --workdir=runs/coco \
        --config.dataset.root=/path/to/coco2014
Variants: configs/coco.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: the folder holding annotations/instances_{train,val}2014.json, train2014/,
val2014/.
"""

from ml_collections import ConfigDict, FieldReference

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'coco2014'
  c.dataset.train_split = 'train'
  c.dataset.val_split = 'holdout'  # a seeded slice of train2014
  c.dataset.test_split = 'val'  # val2014 is the paper's test set
  # Every option of kmcl_jax.data.coco.coco2014; all but decode_size at their defaults.
  c.dataset.options = ConfigDict(
    {
      # DCT-scaled JPEG decoding at the training size; to_int() makes a one-way link, so that
      # overriding decode_size leaves model.image_size alone.
      'decode_size': c.model.get_ref('image_size').to_int(),
      'keep_all_negative': False,  # only images with annotations
      'fraction': FieldReference(None, field_type=float),
      'subset_size': FieldReference(None, field_type=int),  # the paper's COCO subsets
      'subset_seed': 0,
      'subset_ids': FieldReference(None, field_type=str),  # or the authors' id csv
    }
  )
  return base.apply_variant(c, variant)
