"""What a config builds, before any training: checked settings, data sources, model, optimizer
and the initial train state.

The trainer (`kmcl_jax.train`) and the post-training commands (`kmcl_jax.evaluate`, ...) both
start here, so a setting means the same thing everywhere.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from kmcl_jax import data as data_lib, export as export_lib, losses, optim
from kmcl_jax.data import augment_device, pipeline
from kmcl_jax.models import COMPUTE_DTYPES, ENCODERS, KMCLModel

EXPORT_CHOICES = ('best', 'ema', 'model')


class ConfigError(ValueError):
  """A setting a user can fix; the message names it."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, with one message naming the setting, on config errors a user can make."""

  def fail(message):
    raise ConfigError(f'config error: {message}')

  if config.dataset.name not in data_lib.SOURCES:
    fail(f'dataset.name={config.dataset.name!r} is not one of {data_lib.SOURCES}.')
  if config.dataset.name not in ('synthetic', 'tfds'):
    if not config.dataset.root:
      fail(
        f'dataset.root is empty; dataset {config.dataset.name!r} needs its folder '
        '(see README "Datasets").'
      )
    if not os.path.isdir(config.dataset.root):
      fail(f'dataset.root={config.dataset.root!r} is not a directory.')
  if problem := data_lib.options_error(config.dataset.name, config.dataset.options):
    fail(f'{problem}.')
  if config.model.name not in ENCODERS:
    fail(f'model.name={config.model.name!r} is not one of {sorted(ENCODERS)}.')
  if config.model.image_size <= 0 or config.model.image_size % 32:
    fail(
      f'model.image_size={config.model.image_size} must be a positive multiple of 32 '
      '(TResNet downsamples by 32).'
    )
  if config.model.dtype not in COMPUTE_DTYPES:
    fail(f'model.dtype={config.model.dtype!r} is not one of {sorted(COMPUTE_DTYPES)}.')
  if config.model.kind != config.loss.kind:
    fail(
      f'model.kind={config.model.kind!r} and loss.kind={config.loss.kind!r} differ; the '
      'KMM variance shape must match the similarity.'
    )
  if config.dataset.normalization not in pipeline.NORMALIZATION:
    fail(
      f'dataset.normalization={config.dataset.normalization!r} is not one of '
      f'{sorted(pipeline.NORMALIZATION)}.'
    )
  if config.dataset.augment_device not in augment_device.SETTINGS:
    fail(
      f'dataset.augment_device={config.dataset.augment_device!r} is not one of '
      f'{augment_device.SETTINGS}.'
    )
  # Batches are global: each process loads value / processes rows, each device computes
  # value / devices of them (and a process's rows fill its own devices).
  devices, processes = jax.device_count(), jax.process_count()
  local = jax.local_device_count()
  for key in ('batch_size', 'eval_batch_size'):
    value = config[key]
    if value <= 0 or value % devices or (value // processes) % local:
      fail(
        f'{key}={value} (global) must be a positive multiple of the device count '
        f'{devices} ({processes} process(es) x {local} local devices): it is split into a '
        f'per-process batch of {value / processes:g} and a per-device batch of '
        f'{value / devices:g}.'
      )
  if config.export_weights not in EXPORT_CHOICES:
    fail(f'export_weights={config.export_weights!r} is not one of {EXPORT_CHOICES}.')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    fail('set num_epochs > 0 or num_train_steps > 0.')
  if config.init_from and not os.path.exists(config.init_from):
    fail(
      f'init_from={config.init_from!r} does not exist (make it with python -m kmcl_jax.convert).'
    )
  for name, (low, high, closed) in _RANGES.items():
    value = _setting(config, name)
    if value is None and name in _DEFAULTED:
      continue
    above = value >= low if closed[0] else value > low
    below = value <= high if closed[1] else value < high
    if not (isinstance(value, (int, float)) and above and below):
      if high == _INF:
        fail(f'{name}={value!r} must be {">=" if closed[0] else ">"} {low:g}.')
      interval = f'{"[" if closed[0] else "("}{low:g}, {high:g}{"]" if closed[1] else ")"}'
      fail(f'{name}={value!r} must be in {interval}.')
  try:
    losses.LossConfig.from_mapping(config.loss.to_dict()).resolved()
  except ValueError as e:
    fail(f'loss: {e}')


_INF = float('inf')
# Numeric settings with a natural range: name -> (low, high, (low included, high included)).
_RANGES = {
  'seed': (0, 2**32 - 1, (True, True)),
  'optim.peak_lr': (0, _INF, (False, False)),
  'optim.weight_decay': (0, _INF, (True, False)),
  'optim.pct_start': (0, 1, (False, False)),
  'optim.div_factor': (0, _INF, (False, False)),
  'optim.final_div_factor': (0, _INF, (False, False)),
  'optim.base_beta1': (0, 1, (True, False)),
  'optim.max_beta1': (0, 1, (True, False)),
  'optim.beta2': (0, 1, (True, False)),
  'optim.eps': (0, _INF, (False, False)),
  'ema_decay': (0, 1, (True, False)),
  'eval_every_epochs': (0, _INF, (False, False)),
  'log_every_steps': (1, _INF, (True, False)),
  'checkpoint_every_steps': (1, _INF, (True, False)),
  'dataset.holdout_fraction': (0, 1, (False, False)),
  'dataset.worker_count': (0, _INF, (True, False)),
  'dataset.device_prefetch': (0, _INF, (True, False)),
  'model.reduced_dim': (1, _INF, (True, False)),
  'eval.threshold': (0, 1, (False, False)),
  'eval.top_k': (1, _INF, (True, False)),
  'loss.lambda_asl': (0, _INF, (True, False)),
  'loss.lambda_kmcl': (0, _INF, (True, False)),
  'loss.temperature': (0, _INF, (False, False)),
  'loss.asl_gamma_pos': (0, _INF, (True, False)),
  'loss.asl_gamma_neg': (0, _INF, (True, False)),
  'loss.asl_clip': (0, 1, (True, False)),
  'loss.asl_eps': (0, 1, (False, False)),
}
_DEFAULTED = ('loss.lambda_asl', 'loss.lambda_kmcl', 'loss.temperature')  # None: the variant's


def _setting(config: ml_collections.ConfigDict, name: str) -> Any:
  for part in name.split('.'):
    config = config[part]
  return config


def open_split(config: ml_collections.ConfigDict, split: str) -> data_lib.Source:
  """The source of one split of the config's dataset (with the config's options)."""
  ds = config.dataset
  return data_lib.get_source(ds.name, root=ds.root or None, split=split, **ds.options.to_dict())


def open_sources(
  config: ml_collections.ConfigDict,
) -> tuple[data_lib.Source, data_lib.Source | None, data_lib.Source]:
  """(train, selection split or None, test) sources for the config's dataset."""
  ds = config.dataset
  train, test = open_split(config, ds.train_split), open_split(config, ds.test_split)
  if ds.val_split == 'holdout':
    train, val = data_lib.holdout_split(train, ds.holdout_fraction, seed=config.seed)
  else:
    val = open_split(config, ds.val_split) if ds.val_split else None
  if ds.select_on_test:
    val = test
  for name, source in (('train', train), ('val', val), ('test', test)):
    if source is not None and tuple(source.class_names) != tuple(train.class_names):
      raise ValueError(
        f'the {name} split has classes {source.class_names}, the train split {train.class_names}.'
      )
  return train, val, test


def model_layout(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings that shape the model, as `model.json` records them (`export.build_model`)."""
  return {
    'model': config.model.name,
    'encoder_overrides': config.model.overrides.to_dict(),
    'kmm': {
      'kind': config.model.kind,
      'anisotropic': config.model.anisotropic,
      'reduced_dim': config.model.reduced_dim,
      'asl_only': config.loss.asl_only,
    },
    'dtype': config.model.dtype,
  }


def create_model(config: ml_collections.ConfigDict, num_classes: int, seed: int) -> KMCLModel:
  """The model the config describes; an export rebuilds it through the same function."""
  return export_lib.build_model(model_layout(config), num_classes=num_classes, seed=seed)


def total_steps(config: ml_collections.ConfigDict, train_size: int) -> tuple[int, int]:
  """(total train steps, steps per epoch); durations are turned into steps once, here."""
  steps_per_epoch = max(1, train_size // config.batch_size)
  if config.num_train_steps > 0:
    return int(config.num_train_steps), steps_per_epoch
  return int(math.ceil(config.num_epochs * steps_per_epoch)), steps_per_epoch


def make_optimizer(
  config: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
  o = config.optim
  return optim.make_optimizer(
    total_steps=num_steps,
    peak_lr=o.peak_lr,
    weight_decay=o.weight_decay,
    pct_start=o.pct_start,
    div_factor=o.div_factor,
    final_div_factor=o.final_div_factor,
    base_beta1=o.base_beta1,
    max_beta1=o.max_beta1,
    beta2=o.beta2,
    eps=o.eps,
  )


def init_state(model_fn, optimizer: optax.GradientTransformation) -> dict[str, Any]:
  """The train state pytree built from a fresh model (call under jit).

  `best_val_map` and `best_is_ema` record the best selection-split mAP so far and whether the
  EMA weights (1) or the model weights (0) reached it; the export uses the same choice.
  """
  model = model_fn()
  params, batch_stats = nnx.state(model, nnx.Param, nnx.BatchStat)
  return dict(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=optimizer.init(params),
    ema_params=params,
    ema_batch_stats=batch_stats,
    skipped=jnp.zeros((), jnp.int32),
    best_val_map=jnp.full((), -1.0, jnp.float32),
    best_is_ema=jnp.zeros((), jnp.int32),
  )


def export_info(
  config: ml_collections.ConfigDict, class_names, *, weights: str, step: int
) -> dict[str, Any]:
  """The `model.json` of an export: everything needed to rebuild the model for inference."""
  mean, std = pipeline.NORMALIZATION[config.dataset.normalization]
  return {
    **model_layout(config),
    'image_size': config.model.image_size,
    'normalization': {'name': config.dataset.normalization, 'mean': list(mean), 'std': list(std)},
    'class_names': list(class_names),
    'weights': weights,
    'step': int(step),
    'threshold': config.eval.threshold,
  }
