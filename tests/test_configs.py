"""Every dataset config loads, validates and opens its splits on a fixture in its layout."""

import importlib

import pytest

import data_fixtures as fx
from kmcl_jax import experiment

FIXTURES = {'voc': fx.make_voc, 'coco': fx.make_coco, 'adp': fx.make_adp,
            'chestxray14': fx.make_chestxray14}


@pytest.mark.parametrize('name', ['voc', 'coco', 'adp', 'chestxray14', 'synthetic'])
def test_variants(name):
  module = importlib.import_module(f'configs.{name}')
  default = module.get_config()
  assert (default.model.name, default.model.image_size) == ('tresnet_m', 224 if name !=
                                                           'synthetic' else 64)
  assert default.loss.variant == 'paper' and default.ema_decay > 0.98
  smoke = module.get_config('smoke')
  assert smoke.num_train_steps == 3 and smoke.model.image_size == 64
  assert module.__doc__ and f'--config=configs/{name}.py' in module.__doc__
  if name != 'synthetic':
    large = module.get_config('tresnet_l')
    assert (large.model.name, large.model.image_size) == ('tresnet_l', 448)
    assert default.num_epochs == 40 and default.optim.peak_lr == 2e-4
    assert default.batch_size == 64
  with pytest.raises(ValueError, match='variant'):
    module.get_config('tresnet_s')


@pytest.mark.parametrize('name', sorted(FIXTURES))
def test_config_opens_its_dataset_layout(name, tmp_path):
  FIXTURES[name](str(tmp_path))
  config = importlib.import_module(f'configs.{name}').get_config('smoke')
  config.dataset.root = str(tmp_path)
  experiment.validate_config(config)
  train_src, val_src, test_src = experiment.open_sources(config)
  assert len(train_src) > 0 and len(val_src) > 0 and len(test_src) > 0
  assert train_src.class_names == val_src.class_names == test_src.class_names
  if config.dataset.val_split == 'holdout':
    ids = lambda s: {s[i]['id'] for i in range(len(s))}
    assert not ids(train_src) & ids(val_src)
