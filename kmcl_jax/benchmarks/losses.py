"""Speed of the jitted KMCL objective against a per-anchor Python loop of the same maths.

  python -m kmcl_jax.benchmarks.losses [--json=PATH] [--repeats=5] [--max_loop_n=256]

Times forward+backward (gradients w.r.t. features, pi logits, mu and var) of
`losses.kmcl_objective` under `jax.jit`, and of a baseline that has the authors' structure: the
pairwise similarities vectorised, then a Python loop over anchors that selects each anchor's
positives (as masks) and accumulates its contrastive term, differentiated op by op (eager, no
jit). Prints a table; `--json` writes {"device": ..., "rows": [{"N", "K", "M", "case",
"jax_ms", "loop_ms", "speedup", "temp_mb"}, ...]} where temp_mb is XLA's temporary buffer size
for the compiled step (memory growth with N). Figures only: nothing here asserts on time.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kmcl_jax import allocator, losses

_JSON = flags.DEFINE_string('json', None, 'Write the rows to this JSON file.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repetitions (median reported).')
_MAX_LOOP_N = flags.DEFINE_integer('max_loop_n', 256, 'Skip the loop baseline above this N.')

SIZES = ((64, 20, 2048), (64, 80, 2048), (256, 80, 2048), (1024, 80, 2048))
REDUCED_DIM = 128
CONFIG = losses.LossConfig()


def _inputs(n, k, m, case, seed=0):
  rng = np.random.default_rng(seed)
  dim = REDUCED_DIM if case == 'anisotropic' else m
  kernel_shape = (n, k, dim) if case == 'anisotropic' else (n, k)
  labels = (rng.random((n, k)) < 3.0 / k).astype(np.float32)  # ~3 labels per image
  return dict(
    features=rng.uniform(0, 1, (n, dim)).astype(np.float32),
    pi_logits=rng.normal(0, 1, (n, k)).astype(np.float32),
    mu=rng.uniform(0, 0.1, kernel_shape).astype(np.float32),
    var=rng.uniform(1, 3, kernel_shape).astype(np.float32),
    labels=labels,
  )


def _objective(features, pi_logits, mu, var, labels):
  head = dict(pi_logits=pi_logits, mu=mu, var=var)
  return losses.kmcl_objective(features=features, head=head, labels=labels, config=CONFIG)[0]


def _loop_objective(features, pi_logits, mu, var, labels):
  """Same value as `_objective`, with the contrastive term accumulated anchor by anchor."""
  cfg = CONFIG.resolved()
  rec = losses.reconstruction_loss(
    features=features, pi_logits=pi_logits, mu=mu, var=var, labels=labels
  )
  asl = losses.asl_loss(logits=pi_logits, labels=labels)
  logits = (
    jnp.exp(losses.pairwise_log_similarity(mu=mu, var=var, feature_dim=features.shape[-1]))
    / cfg.temperature
  )
  y = np.asarray(labels)
  n = y.shape[0]
  anchors = []
  for a in range(n):
    # Fixed-shape masks rather than gathers of each anchor's positives: eager JAX compiles
    # every new shape, which would time compilation instead of the loop.
    others = np.arange(n) != a
    positive = others & ((y @ y[a]) > 0)
    if not positive.any():
      continue
    row = jnp.take(logits, jnp.asarray(a), axis=0)  # [N, K]
    log_denominator = jax.nn.logsumexp(jnp.where(others[:, None], row, -jnp.inf), axis=0)
    shared = y * y[a] * positive[:, None]  # [N, K]
    inter = shared.sum(-1)
    jaccard = np.where(positive, inter / np.maximum(y.sum(-1) + y[a].sum() - inter, 1), 0)
    terms = jnp.sum(jnp.where(shared > 0, row - log_denominator, 0.0), -1)
    anchors.append(-jnp.sum(jaccard * terms) / positive.sum())
  kmcl = jnp.mean(jnp.stack(anchors)) if anchors else 0.0
  return rec + cfg.lambda_asl * asl + cfg.lambda_kmcl * kmcl


def _time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def run(repeats: int, max_loop_n: int) -> list[dict]:
  grad_args = (0, 1, 2, 3)
  jitted = jax.jit(jax.value_and_grad(_objective, argnums=grad_args))
  eager = jax.value_and_grad(_loop_objective, argnums=grad_args)
  rows = []
  for case in ('isotropic', 'anisotropic'):
    for n, k, m in SIZES:
      x = _inputs(n, k, m, case)
      args = tuple(jnp.asarray(x[key]) for key in ('features', 'pi_logits', 'mu', 'var', 'labels'))
      compiled = jitted.lower(*args).compile()
      memory = compiled.memory_analysis()
      temp_mb = memory.temp_size_in_bytes / 2**20 if memory is not None else float('nan')
      jax_ms = _time(jitted, args, repeats)
      loop_ms = None
      if n <= max_loop_n:
        jax_value = float(jitted(*args)[0])
        loop_value = float(eager(*args)[0])
        if not np.isclose(jax_value, loop_value, rtol=1e-4):
          raise RuntimeError(f'loop baseline disagrees: {loop_value} vs {jax_value}')
        loop_ms = _time(eager, args, max(1, repeats // 2))
      row = dict(
        N=n,
        K=k,
        M=m,
        case=case,
        jax_ms=round(jax_ms, 3),
        loop_ms=None if loop_ms is None else round(loop_ms, 1),
        speedup=None if loop_ms is None else round(loop_ms / jax_ms, 1),
        temp_mb=round(temp_mb, 1),
      )
      rows.append(row)
      print(
        f'{case:12s} N={n:5d} K={k:3d} M={m:5d}  jax {jax_ms:9.2f} ms  '
        f'loop {"-" if loop_ms is None else f"{loop_ms:10.1f}"} ms  '
        f'speedup {"-" if loop_ms is None else f"{loop_ms / jax_ms:8.1f}"}x  '
        f'XLA temp {temp_mb:8.1f} MiB',
        flush=True,
      )
  return rows


def main(argv):
  del argv
  print(
    f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), '
    f'{jax.device_count()} device(s)'
  )
  rows = run(_REPEATS.value, _MAX_LOOP_N.value)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'device': jax.devices()[0].device_kind, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  allocator.run_on_tcmalloc()
  app.run(main)
