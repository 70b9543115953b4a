"""Your own multilabel dataset from csv files (README 'Training on your data').

Run:  python -m kmcl_jax.main --config=configs/custom.py --workdir=runs/mydata \
        --config.dataset.root=/data/mydata
Variants: configs/custom.py:tresnet_l (TResNet-L at 448), :smoke (tiny, for tests).
Expected data root: train.csv, val.csv and test.csv, each with an `image` column (a path
relative to the root) and a `labels` column of space-separated label names, or one 0/1 column
per class (see kmcl_jax/data/csv_source.py). Without a val.csv, set
--config.dataset.val_split=holdout (5% of train) or --config.dataset.val_split=''.
"""

from ml_collections import ConfigDict, FieldReference

from configs import base


def get_config(variant: str = ''):
  c = base.get_base_config()
  c.dataset.name = 'csv'
  c.dataset.train_split = 'train'
  c.dataset.val_split = 'val'
  c.dataset.test_split = 'test'
  # Every option of kmcl_jax.data.csv_source.csv_source, at its default.
  c.dataset.options = ConfigDict(
    {
      'csv_file': '{split}.csv',  # per split, under root; {split} = the split name
      'classes_file': FieldReference(None, field_type=str),  # one class name per line
      'label_delimiter': ' ',  # between label names in the `labels` column
      'allow_empty': True,  # False: a row without any label is an error
      'decode_size': FieldReference(None, field_type=int),  # JPEG DCT-scaled decoding size
      'keep_all_negative': True,
      'fraction': FieldReference(None, field_type=float),
      'subset_size': FieldReference(None, field_type=int),
      'subset_seed': 0,
    }
  )
  return base.apply_variant(c, variant)
