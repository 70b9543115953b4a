"""Evaluation: class probabilities of a model on a split, and the full metric report.

The trainer evaluates its model and EMA weights with `evaluate`; the post-training commands use
the same functions on an export, so a number means the same thing in both places.

Command line (the full report of an export):

    python -m kmcl_jax.evaluate --export=RUN/export --config=configs/voc.py[:variant]
        [--split=NAME] [--out=DIR] [--workdir=RUN] [--tune_thresholds]

prints the tables and writes report.json and report.md to --out (default: the export folder).
report.json: {"split", "num_examples", "export", "exported_weights", "model": report at
config.eval.threshold, ["checkpoint_model", "checkpoint_ema": with --workdir],
["at_threshold_0.5": {name: report} unless eval.threshold is 0.5], ["tuned_thresholds":
{"model": report} when model.json holds per-class thresholds]}; a report is
`metrics.evaluation_report`'s dict. --tune_thresholds picks one threshold per class on the
selection split (dataset.val_split) and writes them into the export's model.json, which the
predict command then uses; the report shows fixed and tuned figures side by side.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from ml_collections import config_flags

from kmcl_jax import (
  allocator,
  checkpoint as checkpoint_lib,
  distributed,
  experiment,
  export as export_lib,
  metrics as metrics_lib,
)
from kmcl_jax.data import pipeline

# The report's headline metrics, in the order tables print them.
TABLE_METRICS = (
  'mAP',
  'mAUC',
  'CP',
  'CR',
  'CF1',
  'OP',
  'OR',
  'OF1',
  'CP_top3',
  'CR_top3',
  'CF1_top3',
  'OP_top3',
  'OR_top3',
  'OF1_top3',
)


def model_outputs(params, batch_stats, images, *, graphdef, mean, std) -> dict[str, jax.Array]:
  """The model's outputs (pi_logits, kernels, features) on uint8 images, in inference mode
  (running BN statistics); the images are normalised here, inside the jitted function."""
  model = nnx.merge(graphdef, params, batch_stats)
  return model(pipeline.normalize(images, mean, std))


def predict_step(params, batch_stats, images, *, graphdef, mean, std) -> jax.Array:
  """Class probabilities sigmoid(pi_logits) in inference mode."""
  out = model_outputs(params, batch_stats, images, graphdef=graphdef, mean=mean, std=std)
  return jax.nn.sigmoid(out['pi_logits'].astype(jnp.float32))


def make_predict_fn(graphdef, *, mean, std, data_sharding: NamedSharding) -> Callable:
  """`predict_step` jitted for batches sharded like `data_sharding`."""
  return jax.jit(
    functools.partial(predict_step, graphdef=graphdef, mean=mean, std=std),
    out_shardings=data_sharding,
  )


def to_global(
  data_sharding: NamedSharding, local_batch: Mapping[str, np.ndarray]
) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded on the mesh's data axis."""
  return {
    k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def collect_scores(
  predict_fn: Callable,
  weights: Mapping[str, tuple[Any, Any]],
  source,
  *,
  data_sharding: NamedSharding,
  batch_size: int,
  image_size: int,
  desc: str = 'eval',
):
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
      {k: local[k] for k in ('labels', 'difficult', 'mask')}, tiled=True
    )
    keep = host['mask']
    labels.append(host['labels'][keep])
    difficult.append(host['difficult'][keep])
    for name, (params, batch_stats) in weights.items():
      probs = predict_fn(params, batch_stats, images)
      scores[name].append(np.asarray(multihost_utils.process_allgather(probs, tiled=True))[keep])
  return (
    {name: np.concatenate(s) for name, s in scores.items()},
    np.concatenate(labels),
    np.concatenate(difficult),
  )


def reports(
  scores: Mapping[str, np.ndarray],
  labels: np.ndarray,
  difficult: np.ndarray,
  *,
  threshold: float,
  top_k: int,
  with_auc: bool,
  class_names,
) -> dict[str, dict]:
  """`metrics.evaluation_report` for each named score array."""
  return {
    name: metrics_lib.evaluation_report(
      s,
      labels,
      difficult=difficult,
      threshold=threshold,
      top_k=top_k,
      with_auc=with_auc,
      class_names=class_names,
    )
    for name, s in scores.items()
  }


def evaluate(
  predict_fn: Callable,
  weights: Mapping[str, tuple[Any, Any]],
  source,
  *,
  data_sharding: NamedSharding,
  batch_size: int,
  image_size: int,
  threshold: float,
  top_k: int,
  with_auc: bool,
  class_names,
  desc: str = 'eval',
) -> dict[str, dict]:
  """Full metric reports of each named set of weights on `source` (every example once)."""
  scores, labels, difficult = collect_scores(
    predict_fn,
    weights,
    source,
    data_sharding=data_sharding,
    batch_size=batch_size,
    image_size=image_size,
    desc=desc,
  )
  return reports(
    scores,
    labels,
    difficult,
    threshold=threshold,
    top_k=top_k,
    with_auc=with_auc,
    class_names=class_names,
  )


def scalars(report: Mapping[str, Any]) -> dict[str, float]:
  """The scalar entries of a report (drops per-class lists)."""
  return {k: v for k, v in report.items() if isinstance(v, (int, float))}


def format_table(results: Mapping[str, Mapping[str, Any]], title: str) -> str:
  """A terminal table: one row per headline metric, one column per set of weights."""
  names = list(results)
  first = results[names[0]]
  keys = [k for k in TABLE_METRICS if k in first]
  widths = [max(8, len(n)) for n in names]
  lines = [
    f'{title} (threshold {first["threshold"]}):',
    f'  {"metric":10s} ' + ' '.join(f'{n:>{w}s}' for n, w in zip(names, widths)),
  ]
  lines += [
    f'  {k:10s} ' + ' '.join(f'{results[n][k]:{w}.2f}' for n, w in zip(names, widths)) for k in keys
  ]
  return '\n'.join(lines)


# ------------------------------------------------------------------------------ thresholds


def tune_thresholds(
  scores: np.ndarray, labels: np.ndarray, difficult: np.ndarray | None = None, *, default: float
) -> np.ndarray:
  """One threshold per class maximising that class's F1 (predict when score >= threshold).

  Candidate thresholds are the class's own scores (the end of each run of equal scores), so a
  threshold reproduces exactly the predictions it was chosen for. Difficult entries count as
  negatives, as in the thresholded metrics. A class without positives keeps `default`; among
  equally good thresholds the highest is taken (fewest predictions).

  Returns:
    [K] thresholds, float64 (exact copies of scores, so float32 scores compare equal).
  """
  scores = np.asarray(scores, np.float64)
  truth = np.asarray(labels).astype(bool)
  if difficult is not None:
    truth &= ~np.asarray(difficult).astype(bool)
  thresholds = np.full(scores.shape[1], float(default))
  for k in range(scores.shape[1]):
    num_pos = int(truth[:, k].sum())
    if num_pos == 0:
      continue
    order = np.argsort(-scores[:, k], kind='stable')
    ranked = scores[order, k]
    true_pos = np.cumsum(truth[order, k])
    num_pred = np.arange(1, len(ranked) + 1)
    f1 = 2.0 * true_pos / (num_pos + num_pred)
    # Only cuts after the last of a run of equal scores are reachable with `>=`.
    last_of_run = np.append(ranked[1:] != ranked[:-1], True)
    f1 = np.where(last_of_run, f1, -1.0)
    thresholds[k] = ranked[int(np.argmax(f1))]
  return thresholds


def report_with_thresholds(
  scores: np.ndarray,
  labels: np.ndarray,
  difficult: np.ndarray,
  *,
  thresholds: np.ndarray,
  top_k: int,
  with_auc: bool,
  class_names,
) -> dict[str, Any]:
  """`metrics.evaluation_report` with one threshold per class.

  Each class's scores are shifted by 0.5 - threshold_k and thresholded at 0.5, which predicts
  exactly score >= threshold_k. A per-class shift leaves AP and AUC unchanged (they rank within
  a class); the top-k metrics then rank a sample's classes by score minus threshold, i.e. by
  how far each class clears its own threshold.
  """
  thresholds = np.asarray(thresholds, np.float64)
  shifted = np.asarray(scores, np.float64) - thresholds[None, :] + 0.5
  report = metrics_lib.evaluation_report(
    shifted,
    labels,
    difficult=difficult,
    threshold=0.5,
    top_k=top_k,
    with_auc=with_auc,
    class_names=class_names,
  )
  report['threshold'] = 'per-class'
  report['thresholds'] = dict(zip(class_names, (float(t) for t in thresholds)))
  return report


# ------------------------------------------------------------------------------ report files


def _per_class_names(report: Mapping[str, Any], key: str) -> list[str]:
  values = report[key]
  return list(values) if isinstance(values, Mapping) else [str(i) for i in range(len(values))]


def _per_class_values(report: Mapping[str, Any], key: str) -> list[float]:
  values = report[key]
  return list(values.values()) if isinstance(values, Mapping) else list(values)


def format_per_class(results: Mapping[str, Mapping[str, Any]], key: str = 'AP') -> str:
  """A terminal table of a per-class entry ('AP' or 'AUC'): one row per class."""
  names = list(results)
  classes = _per_class_names(results[names[0]], key)
  width = max(10, *(len(c) for c in classes))
  widths = [max(8, len(n)) for n in names]
  lines = [
    f'Per-class {key}:',
    f'  {"class":{width}s} ' + ' '.join(f'{n:>{w}s}' for n, w in zip(names, widths)),
  ]
  columns = [_per_class_values(results[n], key) for n in names]
  for i, c in enumerate(classes):
    lines.append(
      f'  {c:{width}s} ' + ' '.join(f'{col[i]:{w}.2f}' for col, w in zip(columns, widths))
    )
  return '\n'.join(lines)


def _md_number(value: float) -> str:
  return '-' if value is None or not np.isfinite(value) else f'{value:.1f}'


def format_markdown(sections: Mapping[str, Mapping[str, Mapping[str, Any]]], *, title: str) -> str:
  """report.md: per section (a threshold setting), the paper's table layouts.

  Per-class AP with classes as columns and mAP last (paper Table 1), the overall and top-k
  figures (Table 2 layout), and per-class AUC when the reports hold it (Table 2, ChestX-ray14).
  Rows are the sets of weights.
  """
  lines = [f'# {title}', '']
  first_section = next(iter(sections.values()))
  first = next(iter(first_section.values()))
  classes = _per_class_names(first, 'AP')
  lines += [
    '## Per-class AP',
    '',
    '| weights | ' + ' | '.join(classes) + ' | mAP |',
    '|---|' + '---:|' * (len(classes) + 1),
  ]
  for name, r in first_section.items():
    lines.append(
      f'| {name} | '
      + ' | '.join(_md_number(v) for v in _per_class_values(r, 'AP'))
      + f' | {_md_number(r["mAP"])} |'
    )
  if 'AUC' in first:
    lines += [
      '',
      '## Per-class AUC',
      '',
      '| weights | ' + ' | '.join(classes) + ' | mAUC |',
      '|---|' + '---:|' * (len(classes) + 1),
    ]
    for name, r in first_section.items():
      lines.append(
        f'| {name} | '
        + ' | '.join(_md_number(v) for v in _per_class_values(r, 'AUC'))
        + f' | {_md_number(r["mAUC"])} |'
      )
  overall = ('CP', 'CR', 'CF1', 'OP', 'OR', 'OF1')
  for section, results in sections.items():
    top_k = next(iter(results.values()))['top_k']
    columns = ['mAP', *overall] + ([f'{m}_top{top_k}' for m in overall] if top_k else [])
    header = ['mAP', *overall] + ([f'{m} top-{top_k}' for m in overall] if top_k else [])
    lines += [
      '',
      f'## Overall, {section}',
      '',
      '| weights | ' + ' | '.join(header) + ' |',
      '|---|' + '---:|' * len(header),
    ]
    for name, r in results.items():
      lines.append(f'| {name} | ' + ' | '.join(_md_number(r[c]) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------ command line


class UserError(Exception):
  """A problem with the command's arguments; main prints the message alone and exits 1."""


def _open_split(config, split: str):
  """The named split of the config's dataset ('holdout': the held-out part of train)."""
  if split == 'holdout' and config.dataset.val_split == 'holdout':
    return experiment.open_sources(config)[1]
  try:
    return experiment.open_split(config, split)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f'--split={split!r}: {e}') from e


def _checkpoint_weights(config, workdir: str, num_classes: int, mesh) -> dict[str, tuple]:
  """Model and EMA weights of WORKDIR's best checkpoint (else its latest)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', 'latest')):
    raise UserError(f'--workdir={workdir!r} holds no checkpoints/latest (not a training run).')
  model_fn = functools.partial(experiment.create_model, config, num_classes, config.seed)
  # The optimizer only shapes the state to restore; its schedule length does not matter.
  optimizer = experiment.make_optimizer(config, 1)
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.eval_shape(functools.partial(experiment.init_state, model_fn, optimizer))
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
  )
  ckpt = checkpoint_lib.Checkpoints(workdir)
  try:
    which = 'best' if ckpt.best_step() is not None else 'latest'
    state = ckpt.restore(which, abstract)
  except checkpoint_lib.CheckpointError as e:
    raise UserError(f'--workdir={workdir!r}: {e}; does it match --config?') from e
  finally:
    ckpt.close()
  return {
    'checkpoint_model': (state['params'], state['batch_stats']),
    'checkpoint_ema': (state['ema_params'], state['ema_batch_stats']),
  }


def run_report(
  config,
  export_dir: str,
  *,
  split: str | None = None,
  out: str | None = None,
  workdir: str | None = None,
  tune: bool = False,
) -> dict[str, Any]:
  """The `python -m kmcl_jax.evaluate` command as a function; returns report.json's content.

  Raises:
    UserError: a problem the user can fix (message names the flag or file).
  """
  try:
    exported = export_lib.load_export(export_dir)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from e
  try:
    experiment.validate_config(config)
  except experiment.ConfigError as e:
    raise UserError(str(e)) from e
  if tune and not (config.dataset.val_split or config.dataset.select_on_test):
    raise UserError('--tune_thresholds needs a selection split: dataset.val_split is empty.')
  split = split or config.dataset.test_split
  source = _open_split(config, split)
  if tuple(source.class_names) != exported.class_names:
    raise UserError(
      f'the classes of {config.dataset.name!r} split {split!r} '
      f'({len(source.class_names)}: {", ".join(source.class_names[:5])}, ...) '
      f"differ from the export's in {export_dir}/model.json "
      f'({len(exported.class_names)}: {", ".join(exported.class_names[:5])}, '
      '...).'
    )
  mesh = distributed.data_mesh()
  data_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  mean, std = exported.normalization
  graphdef, params, batch_stats = nnx.split(exported.model, nnx.Param, nnx.BatchStat)
  predict_fn = make_predict_fn(graphdef, mean=mean, std=std, data_sharding=data_sharding)
  collect = functools.partial(
    collect_scores,
    data_sharding=data_sharding,
    batch_size=config.eval_batch_size,
    image_size=exported.image_size,
  )
  scores, labels, difficult = collect(
    predict_fn, {'model': (params, batch_stats)}, source, desc=split
  )
  if workdir:
    weights = _checkpoint_weights(config, workdir, len(exported.class_names), mesh)
    abstract = nnx.eval_shape(
      functools.partial(experiment.create_model, config, len(exported.class_names), config.seed)
    )
    abstract.eval()
    ckpt_fn = make_predict_fn(
      nnx.graphdef(abstract), mean=mean, std=std, data_sharding=data_sharding
    )
    scores.update(collect(ckpt_fn, weights, source, desc=f'{split} (checkpoint)')[0])

  common = dict(
    top_k=config.eval.top_k, with_auc=config.eval.with_auc, class_names=exported.class_names
  )
  threshold = float(config.eval.threshold)
  result: dict[str, Any] = {
    'split': split,
    'num_examples': int(len(labels)),
    'export': os.path.abspath(export_dir),
    'exported_weights': exported.info.get('weights'),
  }
  result.update(reports(scores, labels, difficult, threshold=threshold, **common))
  sections = {f'threshold {threshold:g}': {n: result[n] for n in scores}}
  if threshold != 0.5:
    result['at_threshold_0.5'] = reports(scores, labels, difficult, threshold=0.5, **common)
    sections['threshold 0.5'] = result['at_threshold_0.5']
  if tune:
    selection = experiment.open_sources(config)[1]
    val_scores, val_labels, val_difficult = collect(
      predict_fn, {'model': (params, batch_stats)}, selection, desc='selection split'
    )
    tuned = tune_thresholds(val_scores['model'], val_labels, val_difficult, default=threshold)
    ds = config.dataset
    info = dict(
      exported.info,
      thresholds=[float(t) for t in tuned],
      thresholds_split=ds.test_split if ds.select_on_test else ds.val_split,
    )
    if jax.process_index() == 0:
      export_lib.write_model_info(os.path.abspath(export_dir), info)
    exported.info = info
  if exported.info.get('thresholds') is not None:
    result['tuned_thresholds'] = {
      'model': report_with_thresholds(
        scores['model'], labels, difficult, thresholds=exported.thresholds(), **common
      )
    }
    sections['per-class thresholds (model.json)'] = result['tuned_thresholds']

  if jax.process_index() == 0:
    _write_report(
      result,
      sections,
      out=out or export_dir,
      config=config,
      title=f'{config.dataset.name} {split} ({len(labels)} images): {os.path.abspath(export_dir)}',
    )
  return result


def _write_report(result, sections, *, out: str, config, title: str) -> None:
  """report.json, report.md and the terminal tables."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write(format_markdown(sections, title=title))
  for section in sections.values():
    print(format_table(section, f'{config.dataset.name} {result["split"]}'))
  weights = next(iter(sections.values()))
  print(format_per_class(weights, 'AP'))
  if config.eval.with_auc:
    print(format_per_class(weights, 'AUC'))
  print(f'Wrote {os.path.join(out, "report.json")} and report.md.', flush=True)


def _define_flags():
  flags.DEFINE_string('export', None, 'Export folder (a training run writes WORKDIR/export).')
  config_flags.DEFINE_config_file(
    'config', None, 'The dataset/model configuration file.', lock_config=True
  )
  flags.DEFINE_string('split', None, "Split to report on; default: the config's test split.")
  flags.DEFINE_string('out', None, 'Folder for report.json and report.md; default: --export.')
  flags.DEFINE_string(
    'workdir',
    None,
    "A training run: also report its checkpoint's model "
    'and EMA weights (best checkpoint, else latest).',
  )
  flags.DEFINE_bool(
    'tune_thresholds',
    False,
    'Tune one threshold per class on the selection '
    "split (max F1) and write them into the export's model.json.",
  )
  flags.mark_flags_as_required(['export', 'config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax's restore chatter would bury the tables
  try:
    run_report(
      f.config, f.export, split=f.split, out=f.out, workdir=f.workdir, tune=f.tune_thresholds
    )
  except UserError as e:
    sys.exit(f'error: {e}')


def run() -> None:
  """The `kmcl-evaluate` command (flags are defined here, not on import: train.py imports this
  module beside main.py's flags)."""
  allocator.run_on_tcmalloc()
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
