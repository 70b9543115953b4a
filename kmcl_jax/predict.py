"""Labels, probabilities and kernel variances of an export on image files.

    python -m kmcl_jax.predict --export=RUN/export [--jsonl] [--threshold=T] [--batch_size=B]
        PATH...

PATHs are image files or folders (searched recursively for IMAGE_EXTENSIONS). Per image: the
labels whose probability pi_k = sigmoid(pi_logits_k) reaches the class's threshold, every
class's probability, and the per-class kernel variance the KMM head predicts (the paper's
uncertainty; see `per_class_variance`). Thresholds: --threshold (one global value) if given,
else the per-class ones that `python -m kmcl_jax.evaluate --tune_thresholds` wrote into the
export's model.json, else the export's single threshold.

Output: a readable line per image, or with --jsonl one JSON object per line on stdout:
  {"path": str, "labels": [class, ...], "scores": {class: p}, "variance": {class: v}}
("variance" is null for an 'ASL only' export, which has no kernels). Progress goes to stderr.

Preprocessing equals the evaluation path: decode (`data.base.decode_image`), resize to the
export's square (`data.augment.resize`), normalisation inside the jitted function. A file that
cannot be read (or a PATH that does not exist) is reported on stderr and skipped, and the exit
status is then 1; it is 0 when every image was predicted (and 1 for a usage or export error).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging
from flax import nnx

from kmcl_jax import allocator, evaluate, export as export_lib
from kmcl_jax.data import augment, base as data_base

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
_DECODE_THREADS = 4  # PIL and libjpeg release the GIL while decoding and resizing


def per_class_variance(var: jax.Array, num_classes: int) -> jax.Array:
  """One variance per sample and class, [N, K], from any KMM variance shape.

  Isotropic Bhattacharyya var [N, K] is already per class. Per-dimension variances ([N, K, D]
  anisotropic, [N, 1, M] or [N, 1, D] Mahalanobis, [N, 1, 1] Gaussian) are averaged over the
  dimensions; a variance shared by the classes (Mahalanobis, Gaussian) gives every class the
  same value.
  """
  var = var.astype(jnp.float32)
  if var.ndim == 3:
    var = var.mean(axis=-1)
  return jnp.broadcast_to(var, (var.shape[0], num_classes))


def predict_step(params, batch_stats, images, *, graphdef, mean, std) -> dict[str, jax.Array]:
  """{'probs': [N, K], 'variance': [N, K] (absent for ASL only)} in inference mode.

  The probabilities are exactly `evaluate.predict_step`'s (same normalisation, same model).
  """
  out = evaluate.model_outputs(params, batch_stats, images, graphdef=graphdef, mean=mean, std=std)
  result = {'probs': jax.nn.sigmoid(out['pi_logits'].astype(jnp.float32))}
  if 'var' in out:
    result['variance'] = per_class_variance(out['var'], out['pi_logits'].shape[-1])
  return result


def find_images(paths: Sequence[str]) -> tuple[list[str], list[str]]:
  """(image files, paths that do not exist): folders recursively, in sorted order.

  A file named directly is taken whatever its extension; in folders only IMAGE_EXTENSIONS.
  """
  files, missing = [], []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [
          os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    elif os.path.isfile(path):
      files.append(path)
    else:
      missing.append(path)
  return files, missing


def load_image(path: str, image_size: int) -> np.ndarray:
  """uint8 [S, S, 3] exactly as the evaluation pipeline prepares an image."""
  return np.asarray(augment.resize(data_base.decode_image(path), image_size), np.uint8)


def _read(path: str, image_size: int) -> tuple[str, np.ndarray | None, str | None]:
  try:
    return path, load_image(path, image_size), None
  except (data_base.UnreadableImageError, OSError) as e:
    return path, None, str(e)


def predict_files(
  exported: export_lib.Export, files: Sequence[str], *, batch_size: int, on_error=None
) -> Iterator[dict]:
  """Yields {'path', 'probs' [K], 'variance' [K] or None} per readable file, in order.

  Batches are padded to `batch_size` so that one compiled function serves every batch.
  `on_error(path, message)` is called for each unreadable file.
  """
  mean, std = exported.normalization
  graphdef, params, batch_stats = nnx.split(exported.model, nnx.Param, nnx.BatchStat)
  step = jax.jit(functools.partial(predict_step, graphdef=graphdef, mean=mean, std=std))
  size = exported.image_size
  with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
    for start in range(0, len(files), batch_size):
      chunk = list(
        pool.map(functools.partial(_read, image_size=size), files[start : start + batch_size])
      )
      good = [(path, image) for path, image, _ in chunk if image is not None]
      for path, _, error in chunk:
        if error is not None and on_error is not None:
          on_error(path, error)
      if not good:
        continue
      images = np.zeros((batch_size, size, size, 3), np.uint8)
      images[: len(good)] = np.stack([image for _, image in good])
      out = jax.device_get(step(params, batch_stats, images))
      for i, (path, _) in enumerate(good):
        yield {
          'path': path,
          'probs': out['probs'][i],
          'variance': out['variance'][i] if 'variance' in out else None,
        }


def to_record(prediction: dict, class_names: Sequence[str], thresholds: np.ndarray) -> dict:
  """The JSON object of one image (see module docstring)."""
  probs = prediction['probs']
  variance = prediction['variance']
  return {
    'path': prediction['path'],
    'labels': [c for c, p, t in zip(class_names, probs, thresholds) if p >= t],
    'scores': {c: float(p) for c, p in zip(class_names, probs)},
    'variance': (
      None if variance is None else {c: float(v) for c, v in zip(class_names, variance)}
    ),
  }


def _readable(record: dict) -> str:
  parts = []
  for label in record['labels']:
    text = f'{label} (p={record["scores"][label]:.3f}'
    if record['variance'] is not None:
      text += f', var={record["variance"][label]:.3g}'
    parts.append(text + ')')
  return f'{record["path"]}: ' + (', '.join(parts) if parts else '(no label)')


def predict_paths(
  export_dir: str,
  paths: Sequence[str],
  *,
  jsonl: bool,
  threshold: float | None,
  batch_size: int,
  out=sys.stdout,
  err=sys.stderr,
) -> int:
  """The command as a function; returns the exit status (1 when any file was skipped)."""
  exported = export_lib.load_export(export_dir)
  thresholds = exported.thresholds(threshold)
  files, missing = find_images(paths)
  skipped = []

  def report(path, message):
    skipped.append(path)
    tqdm.tqdm.write(f'skipped {path}: {message}', file=err)

  for path in missing:
    report(path, 'no such file or folder')
  bar = tqdm.tqdm(total=len(files), file=err, unit='img', desc='predict')
  for prediction in predict_files(exported, files, batch_size=batch_size, on_error=report):
    record = to_record(prediction, exported.class_names, thresholds)
    print(json.dumps(record) if jsonl else _readable(record), file=out, flush=jsonl)
    bar.update(1)
  bar.update(len(files) - bar.n)
  bar.close()
  if skipped:
    print(f'{len(skipped)} of {len(files) + len(missing)} path(s) skipped.', file=err)
  return 1 if skipped else 0


def _define_flags():
  flags.DEFINE_string('export', None, 'Export folder (a training run writes WORKDIR/export).')
  flags.DEFINE_bool('jsonl', False, 'One JSON object per image and line on stdout.')
  flags.DEFINE_float(
    'threshold',
    None,
    "One global threshold; default: the export's "
    'per-class thresholds if tuned, else its threshold.',
  )
  flags.DEFINE_integer('batch_size', 32, 'Images per jitted call.')
  flags.mark_flags_as_required(['export'])


def main(argv):
  paths = argv[1:]
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax's restore chatter would bury the output
  if not paths:
    raise app.UsageError('give at least one image file or folder.')
  if f.batch_size < 1:
    raise app.UsageError(f'--batch_size must be positive, got {f.batch_size}.')
  try:
    status = predict_paths(
      f.export, paths, jsonl=f.jsonl, threshold=f.threshold, batch_size=f.batch_size
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  sys.exit(status)


def run() -> None:
  """The `kmcl-predict` command; flags are defined here, not on import."""
  allocator.run_on_tcmalloc()
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
