"""What the train-step benchmarks share: the trainer's jitted step on a synthetic batch."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

SMOKE_OVERRIDES = {'width_factor': 0.125, 'layers': (1, 1, 1, 1)}


def make_config(
  model: str,
  image_size: int,
  *,
  batch_size: int,
  dtype: str,
  num_classes: int,
  overrides: dict | None = None,
):
  """The synthetic dataset config with the given model, size, batch and dtype."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  config.model.name = model
  config.model.image_size = image_size
  config.model.overrides = dict(overrides or {})
  config.model.dtype = dtype
  config.dataset.options.image_size = image_size
  config.dataset.options.num_classes = num_classes
  config.batch_size = config.eval_batch_size = batch_size
  return config


def build_step(config, num_classes: int, *, seed: int = 0):
  """(jitted train step, initial state, global batch) as the trainer builds them."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from kmcl_jax import distributed, experiment, losses, train  # pylint: disable=g-import-not-at-top
  from kmcl_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  mesh = distributed.data_mesh()
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  optimizer = experiment.make_optimizer(config, 10_000)
  model_fn = functools.partial(experiment.create_model, config, num_classes, seed)
  abstract = nnx.eval_shape(model_fn)
  abstract.train()
  mean, std = pipeline.NORMALIZATION[config.dataset.normalization]
  init = functools.partial(experiment.init_state, model_fn, optimizer)
  state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=state_sharding)()
  step = jax.jit(
    functools.partial(
      train.train_step,
      graphdef=nnx.graphdef(abstract),
      optimizer=optimizer,
      loss_config=losses.LossConfig.from_mapping(config.loss.to_dict()),
      ema_decay=config.ema_decay,
      mean=mean,
      std=std,
    ),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
  rng = np.random.default_rng(seed)
  n, size = config.batch_size, config.model.image_size
  batch = {
    'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    'labels': (rng.random((n, num_classes)) < 0.2).astype(np.float32),
  }
  batch = {k: jax.device_put(v, data) for k, v in batch.items()}
  return step, state, batch
