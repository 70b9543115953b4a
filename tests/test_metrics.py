"""Tests for kmcl_jax.metrics against scikit-learn, loop references and hand-worked examples."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from sklearn import metrics as skm

from kmcl_jax import metrics

# 4 samples, 2 classes, worked by hand in the tests below.
SCORES = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.2, 0.4]])
LABELS = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])


def _random_problem(seed, n=60, k=7, ties=False):
  """Scores and labels with at least one positive and one negative per class."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, k)) < 0.3).astype(np.float32)
  labels[0], labels[1] = 1, 0
  scores = rng.random((n, k)).astype(np.float32)
  scores += 0.3 * labels  # some signal so figures are not all near chance
  if ties:
    scores = np.round(scores, 1)
  return scores, labels


def _loop_average_precision(scores, labels):
  """AP of one class from its definition, ranking with Python's stable sort."""
  ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
  hits, precisions = 0, []
  for rank, i in enumerate(ranked, start=1):
    if labels[i] == 1:
      hits += 1
      precisions.append(hits / rank)
  return sum(precisions) / len(precisions) if precisions else float('nan')


def _loop_threshold_metrics(scores, labels, threshold, top_k):
  """OP ... CF1 with explicit loops, every class having a positive (x100)."""
  n, k = scores.shape
  tp, npred, ntrue = [0] * k, [0] * k, [0] * k
  for i in range(n):
    allowed = range(k)
    if top_k is not None:
      allowed = sorted(range(k), key=lambda c: -scores[i, c])[:top_k]
    for c in range(k):
      pred = c in allowed and scores[i, c] >= threshold
      npred[c] += pred
      ntrue[c] += labels[i, c] == 1
      tp[c] += pred and labels[i, c] == 1
  op = sum(tp) / sum(npred) if sum(npred) else 0.0
  orr = sum(tp) / sum(ntrue)
  cp = sum(t / p if p else 0.0 for t, p in zip(tp, npred)) / k
  cr = sum(t / g for t, g in zip(tp, ntrue)) / k

  def f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0

  return {
    'OP': 100 * op,
    'OR': 100 * orr,
    'OF1': 100 * f1(op, orr),
    'CP': 100 * cp,
    'CR': 100 * cr,
    'CF1': 100 * f1(cp, cr),
  }


# --- hand-worked examples -----------------------------------------------------------------


def test_average_precision_by_hand():
  # Class 0 ranking: + - + -  -> precisions 1/1, 2/3 -> AP 5/6. Class 1: + + - - -> AP 1.
  np.testing.assert_allclose(metrics.average_precision(SCORES, LABELS), [5 / 6, 1.0])
  assert metrics.mean_average_precision(SCORES, LABELS) == pytest.approx(100 * 11 / 12)


def test_roc_auc_by_hand():
  # Class 0: positives {.9, .3} vs negatives {.8, .2}: 3 of 4 pairs ordered.
  np.testing.assert_allclose(metrics.roc_auc(SCORES, LABELS), [0.75, 1.0])


def test_threshold_metrics_by_hand():
  # threshold 0.65 predicts class 0 for samples 0, 1 (one correct) and class 1 for sample 1
  # (correct): TP = (1, 1), predictions = (2, 1), positives = (2, 2).
  got = metrics.threshold_metrics(SCORES, LABELS, threshold=0.65)
  expected = {'OP': 200 / 3, 'OR': 50.0, 'OF1': 400 / 7, 'CP': 75.0, 'CR': 50.0, 'CF1': 60.0}
  assert got == pytest.approx(expected)


def test_ties_rank_lower_index_first():
  scores = np.array([[0.9], [0.5], [0.5]])
  # Ranking 0, 1, 2 whatever the labels: the tied samples 1 and 2 keep their input order.
  # Positive at sample 1 -> rank 2 -> AP 1/2; positive at sample 2 -> rank 3 -> AP 1/3.
  assert metrics.average_precision(scores, np.array([[0], [1], [0]]))[0] == pytest.approx(0.5)
  assert metrics.average_precision(scores, np.array([[0], [0], [1]]))[0] == pytest.approx(1 / 3)


def test_roc_auc_counts_ties_half():
  scores = np.array([[0.5], [0.5], [0.2], [0.7]])
  labels = np.array([[1], [0], [0], [1]])
  # Pairs (pos, neg): (.5,.5) half, (.5,.2) 1, (.7,.5) 1, (.7,.2) 1 -> 3.5 / 4.
  assert metrics.roc_auc(scores, labels)[0] == pytest.approx(0.875)


# --- against scikit-learn and loop references ---------------------------------------------


@pytest.mark.parametrize('seed', range(4))
def test_average_precision_matches_sklearn_tie_free(seed):
  scores, labels = _random_problem(seed)
  assert len(np.unique(scores)) == scores.size
  expected = [
    skm.average_precision_score(labels[:, c], scores[:, c]) for c in range(labels.shape[1])
  ]
  np.testing.assert_allclose(metrics.average_precision(scores, labels), expected, rtol=1e-12)
  assert metrics.mean_average_precision(scores, labels) == pytest.approx(100 * np.mean(expected))


@pytest.mark.parametrize('seed', range(3))
def test_average_precision_with_ties_matches_stable_loop(seed):
  scores, labels = _random_problem(seed, ties=True)
  expected = [_loop_average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
  np.testing.assert_allclose(metrics.average_precision(scores, labels), expected, rtol=1e-12)


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('seed', range(3))
def test_roc_auc_matches_sklearn(seed, ties):
  scores, labels = _random_problem(seed, ties=ties)
  expected = [skm.roc_auc_score(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
  np.testing.assert_allclose(metrics.roc_auc(scores, labels), expected, rtol=1e-12)


@pytest.mark.parametrize('top_k', [None, 1, 3, 10])
@pytest.mark.parametrize('seed', range(3))
def test_threshold_metrics_match_loop_reference(seed, top_k):
  scores, labels = _random_problem(seed, ties=True)  # ties exercise the top-k tie rule
  got = metrics.threshold_metrics(scores, labels, threshold=0.5, top_k=top_k)
  assert got == pytest.approx(_loop_threshold_metrics(scores, labels, 0.5, top_k))


@pytest.mark.parametrize('seed', range(3))
def test_threshold_metrics_match_sklearn(seed):
  scores, labels = _random_problem(seed)
  pred = scores >= 0.6
  got = metrics.threshold_metrics(scores, labels, threshold=0.6)
  assert got['OP'] == pytest.approx(100 * skm.precision_score(labels, pred, average='micro'))
  assert got['OR'] == pytest.approx(100 * skm.recall_score(labels, pred, average='micro'))
  assert got['OF1'] == pytest.approx(100 * skm.f1_score(labels, pred, average='micro'))
  assert got['CP'] == pytest.approx(
    100 * skm.precision_score(labels, pred, average='macro', zero_division=0)
  )
  assert got['CR'] == pytest.approx(100 * skm.recall_score(labels, pred, average='macro'))


# --- VOC difficult ------------------------------------------------------------------------


@pytest.mark.parametrize('seed', range(3))
def test_difficult_entries_leave_the_ranking(seed):
  scores, labels = _random_problem(seed)
  rng = np.random.default_rng(100 + seed)
  difficult = rng.random(labels.shape) < 0.2
  difficult[0] = False  # keep a positive in every class
  ap = metrics.average_precision(scores, labels, ignore=difficult)
  auc = metrics.roc_auc(scores, labels, ignore=difficult)
  for c in range(labels.shape[1]):
    kept = ~difficult[:, c]
    assert ap[c] == pytest.approx(
      skm.average_precision_score(labels[kept, c], scores[kept, c]), rel=1e-12
    )
    assert auc[c] == pytest.approx(skm.roc_auc_score(labels[kept, c], scores[kept, c]), rel=1e-12)


def test_difficult_by_hand():
  scores = np.array([[0.9], [0.8], [0.7], [0.6]])
  labels = np.array([[1], [0], [1], [1]])  # sample 0 is a difficult positive
  difficult = np.array([[True], [False], [False], [True]])
  # Ranking without samples 0 and 3: 1(-), 2(+) -> AP 1/2 (it would be (1 + 2/3 + 3/4)/3).
  assert metrics.average_precision(scores, labels, ignore=difficult)[0] == pytest.approx(0.5)
  # Thresholded at 0.75: predictions 0 and 1, both negatives once difficult counts negative.
  got = metrics.threshold_metrics(scores, labels, threshold=0.75, ignore=difficult)
  assert got['OP'] == 0.0 and got['OR'] == 0.0
  # At 0.65 sample 2 is a hit among three predictions; the one kept positive is found.
  got = metrics.threshold_metrics(scores, labels, threshold=0.65, ignore=difficult)
  assert got['OP'] == pytest.approx(100 / 3) and got['OR'] == pytest.approx(100.0)


# --- top-k --------------------------------------------------------------------------------


def test_top3_keeps_three_of_five_predictions():
  scores = np.array([[0.95, 0.9, 0.85, 0.99, 0.81]])
  labels = np.ones((1, 5))
  full = metrics.threshold_metrics(scores, labels, threshold=0.8)
  top3 = metrics.threshold_metrics(scores, labels, threshold=0.8, top_k=3)
  assert full['OR'] == 100.0
  # Classes 3, 0, 1 predicted: OP 100 (the authors' denominator would give 3/5 here), OR 3/5,
  # CP = (1 + 1 + 0 + 1 + 0) / 5 with 0 for the two classes without predictions.
  assert top3 == pytest.approx(
    {'OP': 100.0, 'OR': 60.0, 'OF1': 75.0, 'CP': 60.0, 'CR': 60.0, 'CF1': 60.0}
  )


def test_top_k_still_applies_threshold_and_breaks_ties_by_class_index():
  scores = np.array([[0.9, 0.7, 0.85, 0.2], [0.6, 0.6, 0.6, 0.6]])
  labels = np.array([[1, 1, 1, 0], [0, 0, 1, 1]])
  # Sample 0: top-3 = {0, 2, 1}, but 0.7 < 0.8 -> predictions {0, 2}.
  # Sample 1 at threshold 0.5: all tied, top-3 = {0, 1, 2} -> one hit (class 2).
  got = metrics.threshold_metrics(scores[:1], labels[:1], threshold=0.8, top_k=3)
  assert got['OP'] == 100.0 and got['OR'] == pytest.approx(200 / 3)
  got = metrics.threshold_metrics(scores[1:], labels[1:], threshold=0.5, top_k=3)
  assert got['OP'] == pytest.approx(100 / 3) and got['OR'] == pytest.approx(50.0)


# --- degenerate inputs --------------------------------------------------------------------


def test_class_without_positives_is_left_out_of_means():
  scores = np.array([[0.9, 0.3], [0.2, 0.8], [0.6, 0.1]])
  labels = np.array([[1, 0], [0, 0], [1, 0]])
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    ap = metrics.average_precision(scores, labels)
    auc = metrics.roc_auc(scores, labels)
    report = metrics.evaluation_report(scores, labels, threshold=0.5, with_auc=True)
  assert ap[0] == 1.0 and np.isnan(ap[1])
  assert auc[0] == 1.0 and np.isnan(auc[1])
  assert report['mAP'] == 100.0 and report['mAUC'] == 100.0
  # Class 1 is predicted once (a false positive): CP = (1 + 0) / 2; CR over class 0 only.
  assert report['CP'] == pytest.approx(50.0) and report['CR'] == pytest.approx(100.0)


def test_class_with_only_positives_has_nan_auc():
  scores = np.array([[0.9, 0.3], [0.2, 0.8]])
  labels = np.array([[1, 1], [0, 1]])
  auc = metrics.roc_auc(scores, labels)
  assert auc[0] == 1.0 and np.isnan(auc[1])


def test_single_sample():
  scores = np.array([[0.9, 0.2, 0.7]], np.float32)
  labels = np.array([[1, 0, 1]])
  np.testing.assert_array_equal(metrics.average_precision(scores, labels), [1.0, np.nan, 1.0])
  assert np.isnan(metrics.roc_auc(scores, labels)).all()
  report = metrics.evaluation_report(scores, labels, threshold=0.5, with_auc=True)
  assert report['mAP'] == 100.0 and report['mAUC'] == 0.0
  assert report['OP'] == 100.0 and report['OR'] == 100.0


def test_all_zero_labels():
  scores = np.random.default_rng(0).random((5, 3))
  labels = np.zeros((5, 3))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    report = metrics.evaluation_report(scores, labels, threshold=0.5, with_auc=True)
  assert np.isnan(report['AP']).all() and np.isnan(report['AUC']).all()
  for key in ('mAP', 'mAUC', 'OP', 'OR', 'OF1', 'CP', 'CR', 'CF1', 'CR_top3'):
    assert report[key] == 0.0, key


# --- the report ---------------------------------------------------------------------------


def test_evaluation_report_keys_values_and_json():
  scores, labels = _random_problem(0, k=3)
  difficult = np.zeros(labels.shape, bool)
  difficult[5:9, 1] = True
  report = metrics.evaluation_report(
    scores,
    labels,
    difficult=difficult,
    threshold=0.7,
    top_k=2,
    with_auc=True,
    class_names=['a', 'b', 'c'],
  )
  expected_keys = {
    'threshold',
    'top_k',
    'mAP',
    'OP',
    'OR',
    'OF1',
    'CP',
    'CR',
    'CF1',
    'OP_top2',
    'OR_top2',
    'OF1_top2',
    'CP_top2',
    'CR_top2',
    'CF1_top2',
    'AP',
    'AUC',
    'mAUC',
  }
  assert set(report) == expected_keys
  assert report['threshold'] == 0.7 and report['top_k'] == 2
  assert list(report['AP']) == ['a', 'b', 'c']
  ap = metrics.average_precision(scores, labels, ignore=difficult)
  assert report['AP']['b'] == pytest.approx(100 * ap[1])
  assert report['mAP'] == pytest.approx(100 * ap.mean())
  top = metrics.threshold_metrics(scores, labels, threshold=0.7, top_k=2, ignore=difficult)
  assert report['CF1_top2'] == top['CF1']
  for key, value in report.items():
    if key not in ('AP', 'AUC', 'top_k'):
      assert type(value) is float, key
  assert all(type(v) is float for v in report['AUC'].values())
  json.loads(json.dumps(report, allow_nan=False))


def test_evaluation_report_without_names_or_top_k():
  report = metrics.evaluation_report(SCORES, LABELS, top_k=None)
  assert report['AP'] == pytest.approx([100 * 5 / 6, 100.0])
  assert 'OP_top3' not in report and 'AUC' not in report and report['top_k'] is None


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  'scores, labels, match',
  [
    (np.zeros((4, 2)), np.zeros((4, 3)), r'\(4, 2\).*\(4, 3\)'),
    (np.zeros(4), np.zeros(4), '2-D'),
    (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), '2-D'),
    (np.zeros((0, 3)), np.zeros((0, 3)), 'at least one sample'),
    (np.array([[0.1, np.nan]]), np.array([[1, 0]]), 'NaN'),
    (np.zeros((2, 2)), np.array([[1, -1], [0, 1]]), 'only 0 and 1'),
  ],
)
def test_invalid_inputs_raise(scores, labels, match):
  for fn in (metrics.average_precision, metrics.roc_auc, metrics.evaluation_report):
    with pytest.raises(ValueError, match=match):
      fn(scores, labels)
  with pytest.raises(ValueError, match=match):
    metrics.threshold_metrics(scores, labels, threshold=0.5)


def test_invalid_settings_raise():
  with pytest.raises(ValueError, match=r'ignore has shape \(4, 1\)'):
    metrics.average_precision(SCORES, LABELS, ignore=np.zeros((4, 1), bool))
  with pytest.raises(ValueError, match='top_k'):
    metrics.threshold_metrics(SCORES, LABELS, threshold=0.5, top_k=0)
  with pytest.raises(ValueError, match='class_names'):
    metrics.evaluation_report(SCORES, LABELS, class_names=['a'])
  with pytest.raises(ValueError, match='class_names'):
    metrics.evaluation_report(SCORES, LABELS, class_names=['a', 'a'])


# --- properties ---------------------------------------------------------------------------

_problems = st.tuples(st.integers(1, 12), st.integers(1, 4)).flatmap(
  lambda shape: st.tuples(
    hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])),
    hnp.arrays(np.int8, shape, elements=st.integers(0, 1)),
    st.randoms(use_true_random=False),
  )
)


@settings(max_examples=60, deadline=None)
@given(_problems)
def test_property_ranges_and_permutation(problem):
  scores, labels, rnd = problem
  perm = list(range(scores.shape[0]))
  rnd.shuffle(perm)
  ap = metrics.average_precision(scores, labels)
  defined = ~np.isnan(ap)
  assert np.all((ap[defined] > 0) & (ap[defined] <= 1))
  np.testing.assert_array_equal(defined, labels.any(axis=0))
  # AUC does not depend on sample order even with ties; 1 - AUC is the AUC of -scores.
  auc = metrics.roc_auc(scores, labels)
  np.testing.assert_allclose(metrics.roc_auc(scores[perm], labels[perm]), auc)
  np.testing.assert_allclose(metrics.roc_auc(-scores, labels), 1 - auc)
  figures = metrics.threshold_metrics(scores, labels, threshold=0.5, top_k=2)
  assert all(0 <= v <= 100 for v in figures.values())
  assert figures == pytest.approx(
    metrics.threshold_metrics(scores[perm], labels[perm], threshold=0.5, top_k=2)
  )


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_property_ap_permutation_invariant_without_ties(n, k, seed):
  rng = np.random.default_rng(seed)
  scores = rng.permutation(n * k).reshape(n, k) / (n * k)  # distinct by construction
  labels = rng.integers(0, 2, (n, k))
  perm = rng.permutation(n)
  np.testing.assert_allclose(
    metrics.average_precision(scores[perm], labels[perm]),
    metrics.average_precision(scores, labels),
    rtol=1e-12,
  )
