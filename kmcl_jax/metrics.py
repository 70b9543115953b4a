"""Multilabel evaluation metrics (docs/metrics.md), computed on the host with numpy.

Evaluation gathers every sample's scores before ranking, so these functions take whole
[N, K] arrays (N samples, K classes) and never run inside a jitted step. They compute in
float64: the arrays are small next to the model, and exact counts keep the figures
reproducible across batch sizes and devices.

Inputs: `scores` are real numbers (probabilities = sigmoid of logits for the thresholded
metrics), `labels` are 0/1 with 1 = positive, `ignore` / `difficult` is a boolean mask of
the same shape. Raw VOC labels (1 positive, -1 negative, 0 difficult) must be converted by the
caller: labels = (raw == 1), difficult = (raw == 0); anything other than 0/1 in `labels` is
rejected so that a raw -1/0/1 array cannot slip through.

Conventions (the choices that change figures, so written down once):
- Ranking ties (`average_precision`): samples are ranked by descending score with a stable
  sort, so among equal scores the sample with the lower row index ranks first. AP therefore
  depends on the order of tied samples; scikit-learn instead treats a run of ties as one
  threshold, so the two agree only on tie-free scores. The authors' meter uses torch's
  unstable descending sort, whose tie order is unspecified.
- VOC 'difficult' entries (`ignore`): left out of that class's ranking for AP and AUC, and
  counted as negatives (a prediction there is a false positive) for the thresholded metrics,
  as in the authors' evaluation.
- Per-class precision of a class with no predictions is 0 (ML-GCN's and the authors'
  convention), and CP averages over all K classes. Per-class recall of a class with no
  positives is undefined; CR averages over the classes with at least one positive (the
  authors' code returns NaN for CR there and then 0 for CF1).
- OP is sum(TP) / sum(predictions). The authors' code divides by the sum of per-class
  prediction counts after raising each zero count to 1, which adds 1 to the denominator per
  class without predictions; on real test sets the difference is in the last digits.
- ROC AUC counts a tied positive/negative pair as half (Mann-Whitney U). A class with no
  positives or no negatives has AUC NaN.
- Aggregates (mAP, mAUC, OP, OR, CP, CR and the F1s) skip undefined per-class entries; an
  aggregate with nothing to average (for example mAP with all-zero labels) is 0.0, and an F1
  with P + R = 0 is 0.0, so a report never holds NaN outside its per-class entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

_METRIC_NAMES = ('OP', 'OR', 'OF1', 'CP', 'CR', 'CF1')


def _as_mask(name: str, array: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
  """Returns a 0/1 array of `shape` as bool, or raises ValueError naming the problem."""
  mask = np.asarray(array)
  if mask.shape != shape:
    raise ValueError(f'{name} has shape {mask.shape} but scores have shape {shape}.')
  if mask.dtype != bool:
    if not np.isin(mask, (0, 1)).all():
      bad = np.unique(mask[~np.isin(mask, (0, 1))])[:5]
      raise ValueError(
        f'{name} must hold only 0 and 1, found {bad.tolist()}; convert raw VOC labels '
        'with labels = (raw == 1) and difficult = (raw == 0).'
      )
    mask = mask.astype(bool)
  return mask


def _validated(
  scores: ArrayLike, labels: ArrayLike, ignore: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Checks shapes and values; returns float64 scores, bool labels, bool keep-mask."""
  scores = np.asarray(scores)
  labels_shape = np.shape(labels)
  if scores.ndim != 2 or len(labels_shape) != 2:
    raise ValueError(
      'scores and labels must be 2-D [N samples, K classes], got shapes '
      f'{scores.shape} and {labels_shape}.'
    )
  if scores.shape != labels_shape:
    raise ValueError(f'scores have shape {scores.shape} but labels have shape {labels_shape}.')
  if scores.shape[0] == 0 or scores.shape[1] == 0:
    raise ValueError(f'need at least one sample and one class, got shape {scores.shape}.')
  if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
    raise ValueError(f'scores must be real numbers, got dtype {scores.dtype}.')
  scores = scores.astype(np.float64)
  if np.isnan(scores).any():
    raise ValueError(
      f'scores hold {int(np.isnan(scores).sum())} NaN value(s) (shape {scores.shape}).'
    )
  labels = _as_mask('labels', labels, scores.shape)
  if ignore is None:
    keep = np.ones(scores.shape, bool)
  else:
    keep = ~_as_mask('ignore', ignore, scores.shape)
  return scores, labels, keep


def _mean_defined(values: np.ndarray) -> float:
  """Mean over the non-NaN entries; 0.0 when there are none (see module docstring)."""
  defined = values[~np.isnan(values)]
  return float(defined.mean()) if defined.size else 0.0


def _f1(precision: float, recall: float) -> float:
  total = precision + recall
  return 2.0 * precision * recall / total if total > 0 else 0.0


def average_precision(
  scores: ArrayLike, labels: ArrayLike, *, ignore: ArrayLike | None = None
) -> np.ndarray:
  """Per-class average precision: the mean of the precision at the rank of each positive.

  Args:
    scores: [N, K] real scores; higher means more confident.
    labels: [N, K] 0/1 ground truth.
    ignore: optional [N, K] bool, True for entries left out of that class's ranking
      entirely (VOC 'difficult').

  Returns:
    [K] float64 AP in [0, 1]; NaN for a class with no positive left after `ignore`.
    Ties rank the lower sample index first (stable sort, see module docstring).
  """
  scores, labels, keep = _validated(scores, labels, ignore)
  order = np.argsort(-scores, axis=0, kind='stable')
  ranked_pos = np.take_along_axis(labels & keep, order, axis=0)
  ranked_keep = np.take_along_axis(keep, order, axis=0)
  # Ignored entries take no rank: count only kept samples above and at each position.
  rank = np.cumsum(ranked_keep, axis=0)
  hits = np.cumsum(ranked_pos, axis=0)
  precision = np.divide(hits, rank, out=np.zeros(scores.shape), where=ranked_pos)
  num_pos = ranked_pos.sum(axis=0)
  ap = np.full(scores.shape[1], np.nan)
  has_pos = num_pos > 0
  ap[has_pos] = precision.sum(axis=0)[has_pos] / num_pos[has_pos]
  return ap


def mean_average_precision(
  scores: ArrayLike, labels: ArrayLike, *, ignore: ArrayLike | None = None
) -> float:
  """mAP x100 over the classes with at least one positive (0.0 if there are none)."""
  return 100.0 * _mean_defined(average_precision(scores, labels, ignore=ignore))


def threshold_metrics(
  scores: ArrayLike,
  labels: ArrayLike,
  *,
  threshold: float,
  top_k: int | None = None,
  ignore: ArrayLike | None = None,
) -> dict[str, float]:
  """Overall and per-class precision, recall and F1 (x100) of thresholded predictions.

  Args:
    scores: [N, K] probabilities.
    labels: [N, K] 0/1 ground truth.
    threshold: a class is predicted when its score >= threshold.
    top_k: if set, only each sample's `top_k` highest scores may be predicted, and they must
      still reach `threshold` (the authors' top-3 metrics). Equal scores go to the lower
      class index.
    ignore: optional [N, K] bool (VOC 'difficult'); these entries count as negatives.

  Returns:
    dict with 'OP', 'OR', 'OF1', 'CP', 'CR', 'CF1' as Python floats in [0, 100].
  """
  scores, labels, keep = _validated(scores, labels, ignore)
  threshold = float(threshold)
  if not np.isfinite(threshold):
    raise ValueError(f'threshold must be finite, got {threshold}.')
  predicted = scores >= threshold
  if top_k is not None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
      raise ValueError(f'top_k must be a positive integer or None, got {top_k!r}.')
    top = np.argsort(-scores, axis=1, kind='stable')[:, :top_k]
    in_top = np.zeros(scores.shape, bool)
    np.put_along_axis(in_top, top, True, axis=1)
    predicted &= in_top
  truth = labels & keep
  true_pos = (predicted & truth).sum(axis=0).astype(np.float64)
  num_pred = predicted.sum(axis=0).astype(np.float64)
  num_true = truth.sum(axis=0).astype(np.float64)

  op = true_pos.sum() / num_pred.sum() if num_pred.sum() else 0.0
  o_r = true_pos.sum() / num_true.sum() if num_true.sum() else 0.0
  class_precision = np.divide(true_pos, num_pred, out=np.zeros_like(true_pos), where=num_pred > 0)
  class_recall = np.divide(
    true_pos, num_true, out=np.full_like(true_pos, np.nan), where=num_true > 0
  )
  cp = float(class_precision.mean())
  cr = _mean_defined(class_recall)
  values = (op, o_r, _f1(op, o_r), cp, cr, _f1(cp, cr))
  return {name: 100.0 * float(v) for name, v in zip(_METRIC_NAMES, values)}


def roc_auc(scores: ArrayLike, labels: ArrayLike, *, ignore: ArrayLike | None = None) -> np.ndarray:
  """Per-class area under the ROC curve, tied positive/negative pairs counting half.

  AUC = U / (P * Q) with U the Mann-Whitney statistic: for each positive, the number of
  negatives scored below it plus half those scored equal. Computed for all classes at once
  from one sort, by counting positives and negatives per run of tied scores.

  Args:
    scores: [N, K] real scores.
    labels: [N, K] 0/1 ground truth.
    ignore: optional [N, K] bool, entries left out (VOC 'difficult').

  Returns:
    [K] float64 AUC in [0, 1]; NaN (no warning) for a class without both a positive and a
    negative.
  """
  scores, labels, keep = _validated(scores, labels, ignore)
  n, k = scores.shape
  order = np.argsort(scores, axis=0, kind='stable')
  # Class-major flat layout: runs of equal scores never cross a class boundary below.
  flat_scores = np.take_along_axis(scores, order, axis=0).T.ravel()
  flat_pos = np.take_along_axis(labels & keep, order, axis=0).T.ravel()
  flat_neg = np.take_along_axis(~labels & keep, order, axis=0).T.ravel()
  run_start = np.ones(n * k, bool)
  run_start[1:] = flat_scores[1:] != flat_scores[:-1]
  run_start[::n] = True
  run_id = np.cumsum(run_start) - 1
  run_class = np.flatnonzero(run_start) // n
  pos_in_run = np.bincount(run_id, weights=flat_pos)
  neg_in_run = np.bincount(run_id, weights=flat_neg)
  num_pos = flat_pos.reshape(k, n).sum(axis=1)
  num_neg = flat_neg.reshape(k, n).sum(axis=1)
  # Negatives in earlier runs of the same class = running total minus the earlier classes'.
  neg_before_class = np.cumsum(num_neg) - num_neg
  neg_below = np.cumsum(neg_in_run) - neg_in_run - neg_before_class[run_class]
  u = np.bincount(run_class, weights=pos_in_run * (neg_below + 0.5 * neg_in_run), minlength=k)
  auc = np.full(k, np.nan)
  defined = (num_pos > 0) & (num_neg > 0)
  auc[defined] = u[defined] / (num_pos[defined] * num_neg[defined].astype(np.float64))
  return auc


def evaluation_report(
  scores: ArrayLike,
  labels: ArrayLike,
  *,
  difficult: ArrayLike | None = None,
  threshold: float = 0.8,
  top_k: int | None = 3,
  with_auc: bool = False,
  class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Every figure of the paper's tables for one set of scores, as JSON-ready Python values.

  Args:
    scores: [N, K] probabilities (sigmoid of the logits).
    labels: [N, K] 0/1 ground truth.
    difficult: optional [N, K] bool (VOC): left out of AP/AUC rankings, negative for the
      thresholded metrics.
    threshold: prediction threshold (authors: 0.8; ML-GCN-style tables: 0.5).
    top_k: adds 'OP_top{k}' ... 'CF1_top{k}' (same threshold); None leaves them out.
    with_auc: adds per-class 'AUC' and their mean 'mAUC' (ChestX-ray14).
    class_names: K names keying the per-class entries; lists when None.

  Returns:
    dict with 'mAP', 'OP', 'OR', 'OF1', 'CP', 'CR', 'CF1', the top-k variants, 'AP'
    (per class) and, with `with_auc`, 'AUC' and 'mAUC'; every figure x100. Also 'threshold'
    and 'top_k'. Only per-class entries of classes without positives (or, for AUC, without
    negatives) are NaN.
  """
  scores, labels, keep = _validated(scores, labels, difficult)
  ignore = ~keep
  num_classes = scores.shape[1]
  if class_names is not None:
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes or len(set(class_names)) != num_classes:
      raise ValueError(
        f'class_names must be {num_classes} distinct names (one per score '
        f'column), got {len(class_names)} ({len(set(class_names))} distinct).'
      )

  def per_class(values: np.ndarray) -> dict[str, float] | list[float]:
    values = [100.0 * float(v) for v in values]
    return dict(zip(class_names, values)) if class_names is not None else values

  ap = average_precision(scores, labels, ignore=ignore)
  report: dict[str, Any] = {
    'threshold': float(threshold),
    'top_k': None,
    'mAP': 100.0 * _mean_defined(ap),
  }
  report.update(threshold_metrics(scores, labels, threshold=threshold, ignore=ignore))
  if top_k is not None:
    top = threshold_metrics(scores, labels, threshold=threshold, top_k=top_k, ignore=ignore)
    report['top_k'] = int(top_k)
    report.update({f'{name}_top{top_k}': value for name, value in top.items()})
  report['AP'] = per_class(ap)
  if with_auc:
    auc = roc_auc(scores, labels, ignore=ignore)
    report['AUC'] = per_class(auc)
    report['mAUC'] = 100.0 * _mean_defined(auc)
  return report
