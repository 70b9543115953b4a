"""Figures of a training run, written to RUN/figures/ as PNG.

    python -m kmcl_jax.analyze --workdir=RUN [--config=FILE[:variant]] [--split=NAME]
        [--num_examples=512] [--num_gradcam=4]

  training_curves.png   total loss and its terms (rec, asl, kmcl), learning rate, and the
                        selection-split mAP of model and EMA over steps (paper Fig. 5), from
                        RUN/metrics.jsonl
  per_class_ap.png      test AP per class of each set of weights, from RUN/results.json
  tsne.png              t-SNE of the encoder's pooled features of the export on --split, one
                        point per image coloured by its first label (class order), class names
                        at the mean position of the images holding the class (scikit-learn)
  label_similarity.png  the split's label co-occurrence P(j | i) beside the mean learned
                        log-similarity log rho(g_i, g_j) between the KMM kernels of classes i
                        and j of the same image (`kmcl_jax.losses.log_similarity`); an 'ASL
                        only' export has no kernels and gets the co-occurrence alone
  gradcam.png           Grad-CAM maps (`grad_cam`) of the export for the first --num_gradcam
                        images of --split and their three most probable classes

The config defaults to RUN/config.json (what the run trained with). Needs the optional extra
`analysis` (matplotlib, scikit-learn): pip install -e '.[analysis]'.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from kmcl_jax import allocator, experiment, export as export_lib, losses
from kmcl_jax.data import pipeline

FIGURES = (
  'training_curves.png',
  'per_class_ap.png',
  'tsne.png',
  'label_similarity.png',
  'gradcam.png',
)
_CURVES = (
  ('train/loss', 'total loss'),
  ('train/rec', 'L_REC'),
  ('train/asl', 'L_ASL'),
  ('train/kmcl', 'L_KMCL'),
  ('train/learning_rate', 'learning rate'),
)


# ------------------------------------------------------------------------------ pure numerics


def grad_cam(
  head_fn: Callable[[jax.Array], jax.Array], feature_map: jax.Array, class_index: jax.Array
) -> jax.Array:
  """Grad-CAM maps of one class per sample, [N, h, w] in [0, 1].

  Args:
    head_fn: last feature map [N, h, w, C] -> class scores [N, K]; each sample's scores must
      depend only on its own feature map (inference mode), so one gradient of the summed
      scores gives every sample's.
    feature_map: [N, h, w, C].
    class_index: int [N], the class explained in each sample.

  Returns:
    ReLU(sum_c alpha_c A_c) with alpha_c the spatial mean of d score / d A_c, divided by its
    maximum per sample (an all-zero map stays zero).
  """
  feature_map = feature_map.astype(jnp.float32)

  def score(fm):
    return jnp.take_along_axis(head_fn(fm), class_index[:, None], axis=1).sum()

  weights = jax.grad(score)(feature_map).mean(axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum('nhwc,nc->nhw', feature_map, weights))
  peak = cam.max(axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


def class_log_similarity(head: Mapping[str, jax.Array], *, kind: str) -> jax.Array:
  """Mean over samples of log rho(g_i^n, g_j^n) between the kernels of classes i and j, [K, K].

  Handles every KMM shape (`kmcl_jax.models.kmm`): isotropic kernels live in the width of
  head['features'], per-dimension ones are summed over their last axis.
  """
  mu, var = head['mu'].astype(jnp.float32), head['var'].astype(jnp.float32)
  if mu.ndim == 2 and var.ndim == 2:  # isotropic: var [N, K] or shared [N, 1]
    rho = losses.log_similarity(
      mu_p=mu[:, :, None],
      var_p=var[:, :, None],
      mu_q=mu[:, None, :],
      var_q=var[:, None, :],
      feature_dim=head['features'].shape[-1],
      kind=kind,
    )
  else:  # per-dimension: mu [N, K, D] or isotropic mean with var [N, 1, M]
    if mu.ndim == 2:
      mu = mu[:, :, None]
    rho = losses.log_similarity(
      mu_p=mu[:, :, None, :],
      var_p=var[:, :, None, :],
      mu_q=mu[:, None, :, :],
      var_q=var[:, None, :, :],
      feature_dim=0,
      kind=kind,
      anisotropic=True,
    )
  return rho.mean(axis=0)


def cooccurrence(labels: np.ndarray) -> np.ndarray:
  """P(j | i) = #(i and j) / #i over the samples, [K, K]; rows of absent classes are 0."""
  labels = np.asarray(labels, np.float64)
  counts = labels.T @ labels
  present = np.diag(counts)
  return np.divide(counts, present[:, None], out=np.zeros_like(counts), where=present[:, None] > 0)


def _forward(params, batch_stats, images, *, graphdef, mean, std):
  """Pooled features, last feature map and KMM outputs in inference mode."""
  model = nnx.merge(graphdef, params, batch_stats)
  pooled, feature_map = model.encoder(
    pipeline.normalize(images, mean, std), return_feature_map=True
  )
  head = model.kmm(pooled)
  return dict(head, pooled=pooled.astype(jnp.float32), probs=jax.nn.sigmoid(head['pi_logits']))


def _gradcam_step(params, batch_stats, images, class_index, *, graphdef, mean, std):
  model = nnx.merge(graphdef, params, batch_stats)
  _, feature_map = model.encoder(pipeline.normalize(images, mean, std), return_feature_map=True)

  def head_fn(fm):
    return model.kmm(fm.mean(axis=(1, 2)))['pi_logits']

  return grad_cam(head_fn, feature_map, class_index)


# ------------------------------------------------------------------------------ figures


def _plt():
  import matplotlib  # the optional extra; imported only here

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def plot_training_curves(workdir: str, path: str) -> None:
  plt = _plt()
  lines = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  fig, axes = plt.subplots(2, 3, figsize=(13, 7))
  for ax, (key, title) in zip(axes.flat, _CURVES):
    points = [(line['step'], line[key]) for line in lines if line.get(key) is not None]
    if points:
      ax.plot(*zip(*points), lw=1)
    else:
      ax.text(0.5, 0.5, 'not logged', ha='center', transform=ax.transAxes)
    ax.set(title=title, xlabel='step')
  ax = axes.flat[5]
  for name in ('model', 'ema'):
    points = [
      (line['step'], line[f'eval/{name}/mAP'])
      for line in lines
      if line.get(f'eval/{name}/mAP') is not None
    ]
    if points:
      ax.plot(*zip(*points), marker='o', label=name)
  ax.set(title='selection-split mAP', xlabel='step', ylabel='mAP')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_per_class_ap(results: Mapping, path: str) -> None:
  plt = _plt()
  reports = results['test']
  names = list(reports)
  classes = list(reports[names[0]]['AP'])
  fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes) * len(names)), 4.5))
  width = 0.8 / len(names)
  x = np.arange(len(classes))
  for i, name in enumerate(names):
    values = [v if v is not None else np.nan for v in reports[name]['AP'].values()]
    label = f'{name} (mAP {reports[name]["mAP"]:.1f})'
    if name == results.get('exported_weights'):
      label += ', exported'
    ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=label)
  ax.set_xticks(x, classes, rotation=60, ha='right', fontsize=8)
  ax.set(ylabel='AP', ylim=(0, 100), title=f'test AP per class ({results.get("test_split")})')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_tsne(pooled: np.ndarray, labels: np.ndarray, class_names, path: str, *, seed: int) -> None:
  from sklearn.manifold import TSNE  # the optional extra

  plt = _plt()
  n = len(pooled)
  perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
  points = TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(
    pooled
  )
  first = np.where(labels.any(axis=1), labels.argmax(axis=1), -1)
  cmap = plt.get_cmap('tab20', max(len(class_names), 1))
  fig, ax = plt.subplots(figsize=(7, 6))
  for k, name in enumerate(class_names):
    chosen = first == k
    if chosen.any():
      ax.scatter(points[chosen, 0], points[chosen, 1], s=8, color=cmap(k), label=name)
    holding = labels[:, k] > 0
    if holding.any():
      cx, cy = points[holding].mean(axis=0)
      ax.text(cx, cy, name, fontsize=7, weight='bold', ha='center')
  ax.set(title=f't-SNE of pooled features ({n} images)', xticks=[], yticks=[])
  ax.legend(fontsize=6, markerscale=2, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_label_similarity(
  labels: np.ndarray, similarity: np.ndarray | None, class_names, path: str
) -> None:
  plt = _plt()
  panels = [('label co-occurrence P(j | i)', cooccurrence(labels), 'viridis')]
  if similarity is not None:
    panels.append(('mean kernel log-similarity log rho(g_i, g_j)', similarity, 'magma'))
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
  k = len(class_names)
  for ax, (title, matrix, cmap) in zip(axes[0], panels):
    im = ax.imshow(matrix, cmap=cmap)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set(title=title, xlabel='j', ylabel='i')
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_gradcam(
  images: np.ndarray,
  maps: np.ndarray,
  top: np.ndarray,
  probs: np.ndarray,
  labels: np.ndarray,
  class_names,
  path: str,
) -> None:
  """images [N, S, S, 3]; maps [N, T, h, w]; top [N, T] class indices."""
  plt = _plt()
  n, t = top.shape
  size = images.shape[1]
  fig, axes = plt.subplots(n, t + 1, figsize=(2.6 * (t + 1), 2.6 * n), squeeze=False)
  for i in range(n):
    truth = [class_names[k] for k in np.flatnonzero(labels[i])]
    axes[i, 0].imshow(images[i])
    axes[i, 0].set_title('\n'.join(truth) or '(no label)', fontsize=7)
    for j in range(t):
      ax = axes[i, j + 1]
      ax.imshow(images[i])
      ax.imshow(
        maps[i, j],
        cmap='jet',
        alpha=0.45,
        vmin=0,
        vmax=1,
        interpolation='bilinear',
        extent=(-0.5, size - 0.5, size - 0.5, -0.5),
      )
      ax.set_title(f'{class_names[top[i, j]]} p={probs[i, top[i, j]]:.2f}', fontsize=7)
  for ax in axes.flat:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------------------ the command


def _collect(exported: export_lib.Export, source, *, num_examples: int, batch_size: int):
  """Forward outputs and labels of the first `num_examples` examples of `source`."""
  mean, std = exported.normalization
  graphdef, params, batch_stats = nnx.split(exported.model, nnx.Param, nnx.BatchStat)
  forward = jax.jit(functools.partial(_forward, graphdef=graphdef, mean=mean, std=std))
  keep = ('pooled', 'probs', 'features', 'mu', 'var')
  outputs, labels, images = [], [], []
  batches = pipeline.eval_batches(
    source, batch_size=batch_size, image_size=exported.image_size, shard_index=0, shard_count=1
  )
  total = 0
  for batch in batches:
    mask = batch['mask']
    out = jax.device_get(forward(params, batch_stats, batch['image']))
    outputs.append({k: v[mask] for k, v in out.items() if k in keep})
    labels.append(batch['labels'][mask])
    images.append(batch['image'][mask])
    total += int(mask.sum())
    if total >= num_examples:
      break
  cat = {k: np.concatenate([o[k] for o in outputs])[:num_examples] for k in outputs[0]}
  return (cat, np.concatenate(labels)[:num_examples] > 0, np.concatenate(images)[:num_examples])


def gradcam_for(exported: export_lib.Export, images: np.ndarray, top: np.ndarray) -> np.ndarray:
  """Grad-CAM maps [N, T, h, w] of the export for each image and each of its T classes."""
  mean, std = exported.normalization
  graphdef, params, batch_stats = nnx.split(exported.model, nnx.Param, nnx.BatchStat)
  step = jax.jit(functools.partial(_gradcam_step, graphdef=graphdef, mean=mean, std=std))
  maps = [step(params, batch_stats, images, jnp.asarray(top[:, j])) for j in range(top.shape[1])]
  return np.stack(jax.device_get(maps), axis=1)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in WORKDIR/config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} does not exist: pass --config, or a --workdir of a training run.'
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def analyze(
  workdir: str,
  config: ml_collections.ConfigDict | None = None,
  *,
  split: str | None = None,
  num_examples: int = 512,
  num_gradcam: int = 4,
) -> list[str]:
  """Writes the figures (module docstring) into WORKDIR/figures; returns their paths."""
  config = config if config is not None else load_run_config(workdir)
  out = os.path.join(workdir, 'figures')
  os.makedirs(out, exist_ok=True)
  written = []

  def target(name):
    written.append(os.path.join(out, name))
    return written[-1]

  plot_training_curves(workdir, target('training_curves.png'))
  with open(os.path.join(workdir, 'results.json')) as f:
    plot_per_class_ap(json.load(f), target('per_class_ap.png'))

  exported = export_lib.load_export(os.path.join(workdir, 'export'))
  split = split or config.dataset.test_split
  source = experiment.open_split(config, split)
  outputs, labels, images = _collect(
    exported, source, num_examples=num_examples, batch_size=min(64, num_examples)
  )
  names = exported.class_names
  try:
    plot_tsne(outputs['pooled'], labels, names, target('tsne.png'), seed=config.seed)
  except ImportError:
    written.pop()
    logging.warning('scikit-learn is not installed: no tsne.png (pip install -e .[analysis]).')
  similarity = None
  if 'mu' in outputs:
    similarity = np.asarray(class_log_similarity(outputs, kind=exported.info['kmm']['kind']))
  plot_label_similarity(labels, similarity, names, target('label_similarity.png'))

  n = min(num_gradcam, len(images))
  top = np.argsort(-outputs['probs'][:n], axis=1, kind='stable')[:, : min(3, len(names))]
  maps = gradcam_for(exported, images[:n], top)
  plot_gradcam(
    images[:n], maps, top, outputs['probs'][:n], labels[:n], names, target('gradcam.png')
  )
  return written


def _define_flags():
  flags.DEFINE_string('workdir', None, 'A training run (metrics.jsonl, results.json, export/).')
  config_flags.DEFINE_config_file(
    'config', None, 'Configuration; default: WORKDIR/config.json.', lock_config=True
  )
  flags.DEFINE_string(
    'split', None, "Split for t-SNE, similarities and Grad-CAM; default: the config's test split."
  )
  flags.DEFINE_integer('num_examples', 512, 'Images of --split for t-SNE and similarities.')
  flags.DEFINE_integer('num_gradcam', 4, 'Images shown with Grad-CAM maps.')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  if f.num_examples < 2 or f.num_gradcam < 1:
    raise app.UsageError('--num_examples must be >= 2 and --num_gradcam >= 1.')
  try:
    written = analyze(
      f.workdir, f.config, split=f.split, num_examples=f.num_examples, num_gradcam=f.num_gradcam
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print('\n'.join(written))


def run() -> None:
  """The `kmcl-analyze` command; flags are defined here, not on import."""
  allocator.run_on_tcmalloc()
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
