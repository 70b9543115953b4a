"""Inference exports: `write_export` at the end of training, `load_export` in every later tool.

  export/weights/      orbax checkpoint of {'params', 'batch_stats'} (the selected weights)
  export/model.json    what rebuilds the model: encoder name and overrides, KMM head, image size,
                       normalisation, class names, dtype, which weights (model or EMA), step,
                       and the decision threshold(s)

`model.json` may also hold `thresholds`: one per class, written by
`python -m kmcl_jax.evaluate --tune_thresholds`; the predict command prefers them to the single
`threshold`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kmcl_jax.models import COMPUTE_DTYPES, KMCLModel


def write_export(directory: str, weights: Any, model_info: dict[str, Any]) -> None:
  """Saves {'params', 'batch_stats'} and model.json (collective: call on every process)."""
  directory = os.path.abspath(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, 'weights'), weights, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    write_model_info(directory, model_info)


def write_model_info(directory: str, model_info: dict[str, Any]) -> None:
  """Rewrites model.json atomically (a crash leaves the old or the new file, never half)."""
  path = os.path.join(directory, 'model.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(model_info, f, indent=1)
  os.replace(path + '.tmp', path)


@dataclasses.dataclass
class Export:
  """A loaded export: the model in inference mode and its model.json."""

  model: KMCLModel
  info: dict[str, Any]

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.info['class_names'])

  @property
  def image_size(self) -> int:
    return int(self.info['image_size'])

  @property
  def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(self.info['normalization']['mean']), tuple(self.info['normalization']['std'])

  def thresholds(self, override: float | None = None) -> np.ndarray:
    """Per-class decision thresholds: `override` if given, else tuned ones, else the global."""
    k = len(self.class_names)
    if override is not None:
      return np.full(k, float(override), np.float32)
    if self.info.get('thresholds') is not None:
      return np.asarray(self.info['thresholds'], np.float32)
    return np.full(k, float(self.info.get('threshold', 0.5)), np.float32)


def build_model(
  info: dict[str, Any], *, num_classes: int | None = None, seed: int = 0
) -> KMCLModel:
  """A freshly initialised model with the layout model.json describes (the trainer builds its
  model here too, from `experiment.model_layout`). `num_classes` defaults to the class names'."""
  kmm = info['kmm']
  return KMCLModel(
    info['model'],
    len(info['class_names']) if num_classes is None else num_classes,
    kind=kmm['kind'],
    anisotropic=kmm['anisotropic'],
    reduced_dim=kmm['reduced_dim'],
    asl_only=kmm['asl_only'],
    dtype=COMPUTE_DTYPES[info.get('dtype', 'float32')],
    rngs=nnx.Rngs(seed),
    **info.get('encoder_overrides', {}),
  )


def load_export(directory: str) -> Export:
  """The inverse of `write_export`: the model (eval mode) with the exported weights."""
  directory = os.path.abspath(directory)
  info_path = os.path.join(directory, 'model.json')
  weights_path = os.path.join(directory, 'weights')
  for path in (info_path, weights_path):
    if not os.path.exists(path):
      raise FileNotFoundError(
        f'{path} does not exist: {directory} is not an export folder '
        '(a training run writes one to WORKDIR/export).'
      )
  with open(info_path) as f:
    info = json.load(f)
  abstract = nnx.eval_shape(lambda: build_model(info))
  abstract.eval()
  graphdef = nnx.graphdef(abstract)
  params, batch_stats = nnx.state(abstract, nnx.Param, nnx.BatchStat)
  target = {'params': params, 'batch_stats': batch_stats}
  try:
    weights = ocp.StandardCheckpointer().restore(weights_path, target)
  except (ValueError, KeyError) as e:
    raise ValueError(f'{weights_path} does not match {info_path} ({e}).') from e
  model = nnx.merge(graphdef, weights['params'], weights['batch_stats'])
  return Export(model=model, info=info)
