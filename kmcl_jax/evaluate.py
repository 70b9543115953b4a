"""Evaluation: class probabilities of a model on a split, and the full metric report.

The trainer evaluates its model and EMA weights with `evaluate`; the post-training commands use
the same functions on an export, so a number means the same thing in both places.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
import tqdm

from kmcl_jax import metrics as metrics_lib
from kmcl_jax.data import pipeline

# The report's headline metrics, in the order tables print them.
TABLE_METRICS = ('mAP', 'mAUC', 'CP', 'CR', 'CF1', 'OP', 'OR', 'OF1', 'CP_top3', 'CR_top3',
                 'CF1_top3', 'OP_top3', 'OR_top3', 'OF1_top3')


def predict_step(params, batch_stats, images, *, graphdef, mean, std) -> jax.Array:
  """Class probabilities sigmoid(pi_logits) in inference mode (running BN statistics)."""
  model = nnx.merge(graphdef, params, batch_stats)
  out = model(pipeline.normalize(images, mean, std))
  return jax.nn.sigmoid(out['pi_logits'].astype(jnp.float32))


def make_predict_fn(graphdef, *, mean, std, data_sharding: NamedSharding) -> Callable:
  """`predict_step` jitted for batches sharded like `data_sharding`."""
  return jax.jit(functools.partial(predict_step, graphdef=graphdef, mean=mean, std=std),
                 out_shardings=data_sharding)


def to_global(data_sharding: NamedSharding, local_batch: Mapping[str, np.ndarray]
              ) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded on the mesh's data axis."""
  return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v))
          for k, v in local_batch.items()}


def collect_scores(predict_fn: Callable, weights: Mapping[str, tuple[Any, Any]], source, *,
                   data_sharding: NamedSharding, batch_size: int, image_size: int,
                   desc: str = 'eval'):
  """Probabilities of each named (params, batch_stats) pair on every example of `source`.

  `batch_size` is global. Returns ({name: float32 [N, K]}, labels [N, K], difficult [N, K]) in
  the source's order as dealt to processes; every process gets the whole arrays.
  """
  per_process = batch_size // jax.process_count()
  scores = {name: [] for name in weights}
  labels, difficult = [], []
  batches = pipeline.eval_batches(source, batch_size=per_process, image_size=image_size)
  for local in tqdm.tqdm(batches, desc=desc, leave=False, disable=jax.process_index() != 0):
    images = to_global(data_sharding, {'image': local['image']})['image']
    # Every process gathers the whole batch; padding rows (mask False) are dropped.
    host = multihost_utils.process_allgather(
        {k: local[k] for k in ('labels', 'difficult', 'mask')}, tiled=True)
    keep = host['mask']
    labels.append(host['labels'][keep])
    difficult.append(host['difficult'][keep])
    for name, (params, batch_stats) in weights.items():
      probs = predict_fn(params, batch_stats, images)
      scores[name].append(np.asarray(multihost_utils.process_allgather(probs, tiled=True))[keep])
  return ({name: np.concatenate(s) for name, s in scores.items()}, np.concatenate(labels),
          np.concatenate(difficult))


def reports(scores: Mapping[str, np.ndarray], labels: np.ndarray, difficult: np.ndarray, *,
            threshold: float, top_k: int, with_auc: bool, class_names) -> dict[str, dict]:
  """`metrics.evaluation_report` for each named score array."""
  return {name: metrics_lib.evaluation_report(
      s, labels, difficult=difficult, threshold=threshold, top_k=top_k, with_auc=with_auc,
      class_names=class_names) for name, s in scores.items()}


def evaluate(predict_fn: Callable, weights: Mapping[str, tuple[Any, Any]], source, *,
             data_sharding: NamedSharding, batch_size: int, image_size: int, threshold: float,
             top_k: int, with_auc: bool, class_names, desc: str = 'eval') -> dict[str, dict]:
  """Full metric reports of each named set of weights on `source` (every example once)."""
  scores, labels, difficult = collect_scores(
      predict_fn, weights, source, data_sharding=data_sharding, batch_size=batch_size,
      image_size=image_size, desc=desc)
  return reports(scores, labels, difficult, threshold=threshold, top_k=top_k,
                 with_auc=with_auc, class_names=class_names)


def scalars(report: Mapping[str, Any]) -> dict[str, float]:
  """The scalar entries of a report (drops per-class lists)."""
  return {k: v for k, v in report.items() if isinstance(v, (int, float))}


def format_table(results: Mapping[str, Mapping[str, Any]], title: str) -> str:
  """A terminal table: one row per headline metric, one column per set of weights."""
  names = list(results)
  first = results[names[0]]
  keys = [k for k in TABLE_METRICS if k in first]
  lines = [f'{title} (threshold {first["threshold"]}):',
           f'  {"metric":10s} ' + ' '.join(f'{n:>8s}' for n in names)]
  lines += [f'  {k:10s} ' + ' '.join(f'{results[n][k]:8.2f}' for n in names) for k in keys]
  return '\n'.join(lines)
