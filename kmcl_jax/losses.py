"""The KMCL objective: reconstruction, ASL and kernel contrastive losses (docs/method.md).

Every function is pure, keyword-only and jit-able, and computes in float32 whatever dtype its
inputs carry. Similarities are handled as log-similarities: with feature width M = 2048 the
kernel values and Bhattacharyya coefficients underflow float32 long before the losses stop
depending on them, so everything that can underflow stays in log space until the last step.

Shapes (N batch, K classes, M kernel width, D anisotropic width; see `models/kmm.py`):
  pi_logits [N, K]; mu [N, K] (isotropic) or [N, K, D] (anisotropic);
  var [N, K] | [N, 1] (gaussian: one scalar per sample) | [N, 1, M] (mahalanobis: one variance
  per feature dimension shared by the classes) | [N, K, D] | [N, 1, D] | [N, 1, 1];
  features [N, M] (the space the kernels live in: D after the anisotropic reduction);
  labels {0, 1} [N, K].

Paper equation -> function:
  Eq. 1, 3a, 3b, 2a, 2b (similarities) -> `log_similarity`, `pairwise_log_similarity`
  Eq. 5 (reconstruction)               -> `reconstruction_loss`
  Eq. 6 (ASL)                          -> `asl_loss`
  Eq. 7 (kernel contrastive)           -> `kmcl_contrastive_loss`
  Eq. 8 (objective)                    -> `kmcl_objective`
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

KINDS = ('bhattacharyya', 'mahalanobis', 'gaussian')
VARIANTS = ('paper', 'official')

# The authors' constants, used only by variant='official'.
# Their clamp of g_k(f) is the literal 1.17549e-38, which is just below the smallest normal
# float32 and is flushed to 0 where denormals are (XLA on CPU), making REC 0/0. We clamp at the
# smallest normal float32 instead: the same value to 5 digits, and it survives flushing.
_OFFICIAL_KERNEL_FLOOR = float(np.finfo(np.float32).tiny)
_OFFICIAL_RATIO_FLOOR = 1e-7  # their clamp of the REC ratio (ASL's eps)
_OFFICIAL_LOG_OFFSET = 1e-7  # log(J * ratio + 1e-7) in their contrastive loss
_OFFICIAL_TEMPERATURE = 0.17


def _f32(x: ArrayLike) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f'similarity kind must be one of {KINDS}, got {kind!r}.')


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f'loss variant must be one of {VARIANTS}, got {variant!r}.')


def _unbroadcast(grad: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `grad` over the axes along which an input of `shape` was broadcast."""
  extra = grad.ndim - len(shape)
  axes = tuple(range(extra)) + tuple(
    extra + i for i, size in enumerate(shape) if size == 1 and grad.shape[extra + i] != 1
  )
  return jnp.sum(grad, axis=axes).reshape(shape) if axes else grad


def _per_dim_log_similarity(mu_p, var_p, mu_q, var_q, kind):
  """Per-dimension log-similarity terms of two 1-D kernels (broadcasting).

  Mean term of Eq. 1: (1/8) (mu_p-mu_q)^2 / ((var_p+var_q)/2). Bhattacharyya adds
  1/2 log(((var_p+var_q)/2) / sqrt(var_p var_q)) = 1/2 log1p((sd_p-sd_q)^2 / (2 sd_p sd_q)):
  >= 0, exactly 0 for equal variances, exactly symmetric, and one log1p per element.
  """
  mean_term = 0.25 * jnp.square(mu_p - mu_q) / (var_p + var_q)
  if kind != 'bhattacharyya':
    return -mean_term
  sd_p, sd_q = jnp.sqrt(var_p), jnp.sqrt(var_q)
  det_term = 0.5 * jnp.log1p(jnp.square(sd_p - sd_q) / (2.0 * sd_p * sd_q))
  return -(det_term + mean_term)


def log_similarity(
  *,
  mu_p: ArrayLike,
  var_p: ArrayLike,
  mu_q: ArrayLike,
  var_q: ArrayLike,
  feature_dim: int,
  kind: str = 'bhattacharyya',
  anisotropic: bool = False,
) -> jax.Array:
  """Elementwise log of the similarity rho(p, q) between two exponential kernels.

  Isotropic (Eq. 3b, 2a, 2b): each entry is a kernel with mean mu * 1 and covariance var * I in
  `feature_dim` dimensions, so the per-dimension terms are multiplied by `feature_dim`.
  Anisotropic (Eq. 3a): the last axis holds the per-dimension means and variances and is summed
  over (it broadcasts, so a shared-variance axis of size 1 works); `feature_dim` is ignored.

  kind: 'bhattacharyya' (with the log-determinant term), 'mahalanobis' and 'gaussian' (without
  it, -1/4 sum_d (mu_p-mu_q)^2/(var_p+var_q); which variance is shared is the KMM's choice).
  The result is <= 0 and equals 0 when p == q.
  """
  _check_kind(kind)
  mu_p, var_p, mu_q, var_q = map(_f32, (mu_p, var_p, mu_q, var_q))
  terms = _per_dim_log_similarity(mu_p, var_p, mu_q, var_q, kind)
  if anisotropic:
    return jnp.sum(terms, axis=-1)
  return feature_dim * terms


# Elements of one [rows, N, K, D] intermediate of the pairwise similarities that are
# materialised at once (64 MiB in float32); larger batches are processed in row blocks of at
# least _MIN_BLOCK_ROWS rows (single-row blocks ran 4x slower on XLA:CPU: too little to
# parallelise per iteration).
_BLOCK_ELEMENTS = 2**24
_MIN_BLOCK_ROWS = 8


def _map_row_blocks(fn, arrays, *, per_row: int):
  """fn(*row_blocks) -> pytree of [rows, ...], over blocks of the leading axis, stacked.

  The pairwise similarities of anisotropic kernels are O(N^2 K D) elementwise work; in one
  piece they hold [N, N, K, D] tensors (2.7 GB each at N=256, K=80, D=128).
  """
  n = arrays[0].shape[0]
  target = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(per_row, 1))
  block = max(b for b in range(1, min(n, target) + 1) if n % b == 0)
  if block == n:
    return fn(*arrays)
  blocks = tuple(a.reshape(n // block, block, *a.shape[1:]) for a in arrays)
  out = jax.lax.map(lambda args: fn(*args), blocks)
  return jax.tree.map(lambda o: o.reshape(n, *o.shape[2:]), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pairwise_kernels(mu, var, kind, anisotropic, scale):
  """[N, N, K]: scale * sum over D (anisotropic) of the per-dimension terms of all pairs."""

  def rows(mu_rows, var_rows):
    terms = _per_dim_log_similarity(mu_rows[:, None], var_rows[:, None], mu[None], var[None], kind)
    return scale * (jnp.sum(terms, axis=-1) if anisotropic else terms)

  return _map_row_blocks(rows, (mu, var), per_row=mu.size)


def _pairwise_kernels_fwd(mu, var, kind, anisotropic, scale):
  return _pairwise_kernels(mu, var, kind, anisotropic, scale), (mu, var)


def _pairwise_kernels_bwd(kind, anisotropic, scale, residuals, g):
  """Hand-written VJP: pair (n, m) and pair (m, n) contribute the same factor to sample n,
  so one reduction over m of (g + g^T) gives every gradient. It avoids reducing over the
  leading axis (12x slower than the second one in XLA:CPU), needs no transcendental function
  (tanh of the log-variance difference is rational) and keeps nothing of size [N, N, K, D].
  """
  mu, var = residuals
  g_sym = g + jnp.swapaxes(g, 0, 1)

  def rows(mu_rows, var_rows, g_rows):
    g_rows = g_rows[..., None] if anisotropic else g_rows
    var_p, var_q = var_rows[:, None], var[None]
    var_sum = var_p + var_q
    ratio = (mu_rows[:, None] - mu[None]) / var_sum
    d_var = 0.25 * jnp.square(ratio)
    if kind == 'bhattacharyya':
      # d/dvar_p of -1/2 log cosh(t), t = (log var_p - log var_q) / 2: tanh(t) is rational.
      d_var = d_var - 0.25 * (var_p - var_q) / (var_sum * var_p)
    d_mu = jnp.sum(g_rows * (-0.5 * ratio), axis=1)
    d_var = _unbroadcast(jnp.sum(g_rows * d_var, axis=1), var_rows.shape)
    return scale * d_mu, scale * d_var

  return _map_row_blocks(rows, (mu, var, g_sym), per_row=mu.size)


_pairwise_kernels.defvjp(_pairwise_kernels_fwd, _pairwise_kernels_bwd)


def pairwise_log_similarity(
  *, mu: ArrayLike, var: ArrayLike, feature_dim: int, kind: str = 'bhattacharyya'
) -> jax.Array:
  """log rho^{nm}_k for all pairs of samples: [N, N, K], entry [n, m, k] = log rho(g_k^n, g_k^m).

  Accepted shapes (see the module docstring): mu [N, K] with var [N, K] or [N, 1] (isotropic
  kernels in `feature_dim` dimensions), mu [N, K] with var [N, 1, M] (mahalanobis: isotropic
  mean, per-dimension variances shared by the classes), and mu [N, K, D] with var [N, K, D],
  [N, 1, D] or [N, 1, 1] (anisotropic; `feature_dim` ignored).
  """
  _check_kind(kind)
  mu, var = _f32(mu), _f32(var)
  if mu.ndim == 2 and var.ndim == 2:
    return _pairwise_kernels(mu, var, kind, False, feature_dim)
  if mu.ndim == 2 and var.ndim == 3:
    if kind == 'bhattacharyya':
      raise ValueError(
        'per-dimension variances shared by the classes ([N, 1, M]) need '
        "kind='mahalanobis' or 'gaussian' with an isotropic mean."
      )
    # Without the log-determinant the per-dimension sum factorises:
    # sum_d (mu_n - mu_m)^2 / (v_nd + v_md) = (mu_n - mu_m)^2 * sum_d 1 / (v_nd + v_md).
    v = var[:, 0, :]

    def rows(v_rows):
      return jnp.sum(1.0 / (v_rows[:, None, :] + v[None, :, :]), axis=-1)

    inv_sum = _map_row_blocks(rows, (v,), per_row=v.size)  # [N, N]
    return -0.25 * jnp.square(mu[:, None, :] - mu[None, :, :]) * inv_sum[..., None]
  if mu.ndim == 3 and var.ndim == 3:
    return _pairwise_kernels(mu, var, kind, True, 1)
  raise ValueError(f'unsupported kernel shapes: mu {mu.shape}, var {var.shape}.')


def _log_kernels(features: ArrayLike, mu: ArrayLike, var: ArrayLike) -> jax.Array:
  """log g_k(f^n) = -||f^n - mu_k||^2_{var^-1} / 2 for every sample and class: [N, K]."""
  f, mu, var = _f32(features), _f32(mu), _f32(var)
  if mu.ndim == 3:  # anisotropic: per-dimension means and variances
    sq = jnp.sum(jnp.square(f[:, None, :] - mu) / var, axis=-1)
  elif var.ndim == 2:  # isotropic mean mu_k * 1, variance var_k * I (or one shared var)
    # sum_d (f_d - mu)^2 = sum_d (f_d - fbar)^2 + M (fbar - mu)^2: exact, no [N, K, M]
    # intermediate, and no cancellation between large sums.
    fbar = jnp.mean(f, axis=-1, keepdims=True)
    spread = jnp.sum(jnp.square(f - fbar), axis=-1, keepdims=True)
    sq = (spread + f.shape[-1] * jnp.square(fbar - mu)) / var
  else:  # isotropic mean, per-dimension variance shared by classes: var [N, 1, M]
    w = 1.0 / var[:, 0, :]
    w_sum = jnp.sum(w, axis=-1, keepdims=True)
    centre = jnp.sum(w * f, axis=-1, keepdims=True) / w_sum
    spread = jnp.sum(w * jnp.square(f - centre), axis=-1, keepdims=True)
    sq = spread + w_sum * jnp.square(centre - mu)
  return -0.5 * sq


def _masked_logsumexp(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """logsumexp over the entries where mask is True; -inf where none is (no NaN gradients)."""
  safe = jnp.where(mask, x, -jnp.inf)
  peak = jnp.max(safe, axis=axis, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), jax.lax.stop_gradient(peak), 0.0)
  # Mask before exp: a masked entry far above the peak would overflow to inf and send
  # 0 * inf = NaN back through the where.
  total = jnp.sum(jnp.exp(jnp.where(mask, x - peak, -jnp.inf)), axis=axis)
  # log(0) would send 0 * inf = NaN back through the masked-out rows: take log(1) there.
  empty = total <= 0
  return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, total)) + jnp.squeeze(peak, axis))


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of values over mask; 0 (not NaN) when the mask is empty."""
  count = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1)


def reconstruction_loss(
  *,
  features: ArrayLike,
  pi_logits: ArrayLike,
  mu: ArrayLike,
  var: ArrayLike,
  labels: ArrayLike,
  variant: str = 'paper',
) -> jax.Array:
  """L_REC (Eq. 5): mean_n [logsumexp_k (log pi_k + log g_k) - logsumexp_{y_k=1} (...)].

  Samples with no positive label are excluded from the mean (their ratio is undefined); the loss
  is 0 when no sample has a positive. variant='official' reproduces the authors' arithmetic:
  kernel values clamped at the smallest normal float32 (their 1.17549e-38), ratio clamped at
  1e-7, mean over all N samples.
  """
  _check_variant(variant)
  labels = _f32(labels) > 0
  log_g = _log_kernels(features, mu, var)
  logits = _f32(pi_logits)
  if variant == 'official':
    # Their clamp, taken on the log scale, then every kernel divided by the row's largest: the
    # ratio is scale-free, so this is their value, but the quotient rule no longer squares a
    # denominator of ~1e-38 (which flushes to 0 and gives NaN gradients).
    log_kernel = jnp.maximum(log_g, jnp.log(_OFFICIAL_KERNEL_FLOOR))
    kernel = jnp.exp(log_kernel - jax.lax.stop_gradient(jnp.max(log_kernel, -1, keepdims=True)))
    weighted = jax.nn.sigmoid(logits) * kernel
    ratio = jnp.sum(jnp.where(labels, weighted, 0.0), -1) / jnp.sum(weighted, -1)
    return -jnp.mean(jnp.log(jnp.maximum(ratio, _OFFICIAL_RATIO_FLOOR)))
  log_terms = jax.nn.log_sigmoid(logits) + log_g
  has_positive = jnp.any(labels, axis=-1)
  all_classes = jax.nn.logsumexp(log_terms, axis=-1)
  positives = _masked_logsumexp(log_terms, labels, axis=-1)
  per_sample = jnp.where(has_positive, all_classes - positives, 0.0)
  return _masked_mean(per_sample, has_positive)


def asl_loss(
  *,
  logits: ArrayLike,
  labels: ArrayLike,
  gamma_pos: float = 0.0,
  gamma_neg: float = 4.0,
  clip: float = 0.05,
  eps: float = 1e-7,
  detach_focusing: bool = True,
  reduction: str = 'mean',
) -> jax.Array:
  """Asymmetric loss (Eq. 6, Ridnik et al. 2021), per element
  -[y (1-p)^gamma_pos log(max(p, eps)) + (1-y) p_m^gamma_neg log(max(1-p_m, eps))],
  p = sigmoid(logit), p_m = max(p - clip, 0).

  reduction: 'mean' sums over classes and averages over samples (the paper); 'sum' sums over
  both (the authors' code). detach_focusing treats the focusing weights as constants for the
  gradient, as the authors train (ASL's disable_torch_grad_focal_loss=True).
  """
  if reduction not in ('mean', 'sum'):
    raise ValueError(f"ASL reduction must be 'mean' or 'sum', got {reduction!r}.")
  labels = _f32(labels)
  p = jax.nn.sigmoid(_f32(logits))
  p_m = jnp.maximum(p - clip, 0.0) if clip and clip > 0 else p
  log_pos = jnp.log(jnp.maximum(p, eps))
  log_neg = jnp.log(jnp.maximum(1.0 - p_m, eps))

  def focus(base, gamma):
    # gamma == 0 gives weight 1 without the 0 * inf of d/dx x^0 at x = 0.
    if gamma == 0:
      return jnp.ones_like(base)
    weight = jnp.power(base, gamma)
    return jax.lax.stop_gradient(weight) if detach_focusing else weight

  per_element = -(
    labels * focus(1.0 - p, gamma_pos) * log_pos + (1.0 - labels) * focus(p_m, gamma_neg) * log_neg
  )
  total = jnp.sum(per_element)
  return total if reduction == 'sum' else total / labels.shape[0]


def _jaccard(labels: jax.Array) -> jax.Array:
  """J(n, m) = |y_n & y_m| / |y_n | y_m| for binary labels: [N, N] (0 where both are empty)."""
  inter = labels @ labels.T
  counts = jnp.sum(labels, axis=-1)
  union = counts[:, None] + counts[None, :] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


def kmcl_contrastive_loss(
  *,
  mu: ArrayLike,
  var: ArrayLike,
  labels: ArrayLike,
  feature_dim: int,
  temperature: float = 0.2,
  kind: str = 'bhattacharyya',
  variant: str = 'paper',
) -> jax.Array:
  """L_KMCL (Eq. 7), vectorised over [N, N, K]. 0 (not NaN) when no anchor has a positive.

  Paper: mean over anchors n with positives A(n) = {m != n : y_n . y_m > 0} of
    -(1/|A(n)|) sum_{m in A(n)} J(n,m) sum_{k shared}
        [rho^{nm}_k/tau - logsumexp_{i!=n} rho^{ni}_k/tau].
  variant='official' (docs/method.md): Jaccard inside the log, log(J * ratio + 1e-7), the sum
  over anchors divided by N, and the anisotropic per-dimension terms multiplied by D.
  """
  _check_variant(variant)
  labels = (_f32(labels) > 0).astype(jnp.float32)
  n = labels.shape[0]
  log_rho = pairwise_log_similarity(mu=mu, var=var, feature_dim=feature_dim, kind=kind)
  if variant == 'official' and jnp.ndim(mu) == 3:
    log_rho = log_rho * jnp.shape(mu)[-1]
  logits = jnp.exp(log_rho) / temperature  # rho / tau, in [0, 1/tau]
  not_self = ~jnp.eye(n, dtype=bool)
  log_denominator = _masked_logsumexp(logits, not_self[:, :, None], axis=1)  # [N, K]
  # Only finite where the anchor has another sample; masked out everywhere else below.
  log_ratio = logits - jnp.where(jnp.isfinite(log_denominator), log_denominator, 0.0)[:, None]
  shared = labels[:, None, :] * labels[None, :, :] * not_self[:, :, None]  # [N, N, K]
  positive = jnp.any(shared > 0, axis=-1)  # [N, N] = A(n)
  num_positives = jnp.sum(positive, axis=-1)
  jaccard = _jaccard(labels)
  if variant == 'official':
    inner = jnp.log(jaccard[..., None] * jnp.exp(log_ratio) + _OFFICIAL_LOG_OFFSET)
    per_anchor = -jnp.sum(jnp.where(shared > 0, inner, 0.0), axis=(1, 2))
    per_anchor = per_anchor / jnp.maximum(num_positives, 1)
    return jnp.sum(per_anchor) / n
  per_pair = jaccard * jnp.sum(jnp.where(shared > 0, log_ratio, 0.0), axis=-1)  # [N, N]
  per_anchor = -jnp.sum(per_pair, axis=-1) / jnp.maximum(num_positives, 1)
  return _masked_mean(per_anchor, num_positives > 0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss settings. `None` means the variant's own value (docs/method.md):

  | setting      | 'paper' | 'official' |
  |--------------|---------|------------|
  | lambda_asl   | 0.1     | 1.0        |
  | lambda_kmcl  | 0.3     | 1.0        |
  | temperature  | 0.2     | 0.17       |
  | asl_reduction| 'mean'  | 'sum'      |
  """

  variant: str = 'paper'
  kind: str = 'bhattacharyya'
  asl_only: bool = False
  lambda_asl: float | None = None
  lambda_kmcl: float | None = None
  temperature: float | None = None
  asl_reduction: str | None = None
  asl_gamma_pos: float = 0.0
  asl_gamma_neg: float = 4.0
  asl_clip: float = 0.05
  asl_eps: float = 1e-7
  asl_detach_focusing: bool = True

  def resolved(self) -> LossConfig:
    """The same settings with every `None` replaced by the variant's value."""
    _check_variant(self.variant)
    _check_kind(self.kind)
    official = self.variant == 'official'
    defaults = dict(
      lambda_asl=1.0 if official else 0.1,
      lambda_kmcl=1.0 if official else 0.3,
      temperature=_OFFICIAL_TEMPERATURE if official else 0.2,
      asl_reduction='sum' if official else 'mean',
    )
    updates = {k: v for k, v in defaults.items() if getattr(self, k) is None}
    return dataclasses.replace(self, **updates)

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any]) -> LossConfig:
    """From a dict or ml_collections ConfigDict; unknown keys are an error."""
    items = dict(mapping.items()) if hasattr(mapping, 'items') else dict(mapping)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - known)
    if unknown:
      raise ValueError(f'unknown loss settings {unknown}; known: {sorted(known)}.')
    return cls(**items)


def kmcl_objective(
  *,
  features: ArrayLike,
  head: Mapping[str, jax.Array],
  labels: ArrayLike,
  config: LossConfig | Mapping[str, Any],
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 8: L = L_REC + lambda_1 L_ASL + lambda_2 L_KMCL, or L_ASL alone when asl_only.

  Args:
    features: [N, M] features in the kernels' space (the KMM's output 'features').
    head: the KMM output with 'pi_logits', and 'mu', 'var' unless asl_only.
    labels: {0, 1} [N, K].
    config: a `LossConfig`, or a mapping of its fields (e.g. `config.loss` of the train config).

  Returns:
    (loss, aux) with aux {'loss', 'asl', 'rec', 'kmcl'}: each unweighted term, float32 scalars.
  """
  if not isinstance(config, LossConfig):
    config = LossConfig.from_mapping(config)
  cfg = config.resolved()
  asl = asl_loss(
    logits=head['pi_logits'],
    labels=labels,
    gamma_pos=cfg.asl_gamma_pos,
    gamma_neg=cfg.asl_gamma_neg,
    clip=cfg.asl_clip,
    eps=cfg.asl_eps,
    detach_focusing=cfg.asl_detach_focusing,
    reduction=cfg.asl_reduction,
  )
  zero = jnp.zeros((), jnp.float32)
  if cfg.asl_only:
    return asl, {'loss': asl, 'asl': asl, 'rec': zero, 'kmcl': zero}
  rec = reconstruction_loss(
    features=features,
    pi_logits=head['pi_logits'],
    mu=head['mu'],
    var=head['var'],
    labels=labels,
    variant=cfg.variant,
  )
  kmcl = kmcl_contrastive_loss(
    mu=head['mu'],
    var=head['var'],
    labels=labels,
    feature_dim=jnp.shape(features)[-1],
    temperature=cfg.temperature,
    kind=cfg.kind,
    variant=cfg.variant,
  )
  loss = rec + cfg.lambda_asl * asl + cfg.lambda_kmcl * kmcl
  return loss, {'loss': loss, 'asl': asl, 'rec': rec, 'kmcl': kmcl}
