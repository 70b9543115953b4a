"""Every dataset config loads, validates and opens its splits on a fixture in its layout."""

import importlib
import os

import data_fixtures as fx
import pytest
from absl import flags
from ml_collections import config_flags

from kmcl_jax import data, experiment

FIXTURES = {
  'voc': fx.make_voc,
  'coco': fx.make_coco,
  'adp': fx.make_adp,
  'chestxray14': fx.make_chestxray14,
  'custom': fx.make_csv,
}
CONFIGS = ['voc', 'coco', 'adp', 'chestxray14', 'synthetic', 'custom']
# Options a config sets on purpose to something other than the source's default.
CHOSEN = {('coco', 'decode_size'): 224}  # DCT-scaled decoding at the training size


@pytest.mark.parametrize('name', CONFIGS)
def test_variants(name):
  module = importlib.import_module(f'configs.{name}')
  default = module.get_config()
  assert (default.model.name, default.model.image_size) == (
    'tresnet_m',
    224 if name != 'synthetic' else 64,
  )
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


@pytest.mark.parametrize('name', CONFIGS)
def test_config_declares_exactly_the_options_its_dataset_accepts(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  declared = config.dataset.options.to_dict()
  accepted = data.accepted_options(config.dataset.name)
  assert sorted(declared) == sorted(accepted)
  for key, default in accepted.items():
    assert declared[key] == CHOSEN.get((name, key), default), key


# A command-line value other than the default, per option type (strings by option name).
_STRINGS = {
  'level': 'L2',
  'subset_ids': 'ids.csv',
  'csv_file': 'lists/{split}.csv',
  'classes_file': 'classes.txt',
  'label_delimiter': '|',
}


@pytest.mark.parametrize('name', CONFIGS)
def test_every_option_can_be_set_on_the_command_line(name):
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', f'{name}.py')
  options = importlib.import_module(f'configs.{name}').get_config().dataset.options
  wanted = {}
  for key in options:
    kind = options.get_type(key)
    wanted[key] = (
      not options[key]
      if kind is bool
      else _STRINGS[key]
      if kind is str
      else kind(7 if kind is int else 0.5)
    )
  argv = ['main', f'--config={path}'] + [
    f'--config.dataset.options.{key}={value}' for key, value in wanted.items()
  ]
  flag_values = flags.FlagValues()
  # Override flags are defined from the argv the flag is given (not pytest's sys.argv).
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.dataset.options.to_dict() == wanted
  assert data.options_error(flag_values.config.dataset.name, wanted) is None


def test_validate_config_names_an_option_the_dataset_does_not_take(tmp_path):
  config = importlib.import_module('configs.adp').get_config()
  config.dataset.name = 'voc2007'
  config.dataset.root = str(tmp_path)
  with pytest.raises(
    experiment.ConfigError,
    match=r'^config error: dataset\.options\.level: not '
    r"an option of dataset 'voc2007', which accepts decode_size, fraction, "
    r'keep_all_negative, subset_seed, subset_size\.$',
  ):
    experiment.validate_config(config)


def test_coco_decode_size_follows_the_image_size_one_way():
  config = importlib.import_module('configs.coco').get_config('tresnet_l')
  assert config.dataset.options.decode_size == 448
  config.dataset.options.decode_size = 0  # full-resolution decoding
  assert config.model.image_size == 448
