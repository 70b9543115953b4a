"""Optimiser, learning-rate/beta1 schedule and weight EMA of the recipe (docs/training.md).

The authors train with torch's `Adam(param_groups)` driven by `OneCycleLR(pct_start=0.2)` and
keep a `ModelEma(decay=0.9997)`. This module reproduces that arithmetic with optax:

* `onecycle_schedules` gives the learning rate and Adam's beta1 as pure functions of the update
  index, equal to torch's `OneCycleLR` values after that many `scheduler.step()` calls
  (cosine annealing, two phases, beta1 cycled inversely to the learning rate). torch places the
  phase boundary at the float `pct_start * total_steps - 1`, not at an integer step; we do too.
* `make_optimizer` chains coupled L2 weight decay (added to the gradient before the moments,
  as torch's `Adam(weight_decay=...)` does, and only on tensors with more than one dimension, so
  biases and BatchNorm scales are not decayed) with Adam whose beta1 follows the schedule.
  optax's `scale_by_adam` is the same algorithm as torch's single-tensor Adam: the moment update
  and the bias correction `1 - beta1**t` both use the current beta1, and eps is added to
  `sqrt(nu / (1 - beta2**t))`, which is torch's `sqrt(nu) / sqrt(1 - beta2**t) + eps`.
* `ema_update` is the authors' `ModelEma.update`: a plain exponential average every step with a
  fixed decay (no warm-up of the decay).

A skipped step (non-finite loss) must leave the optimiser state untouched: the schedule then does
not advance, like the authors' loop, which calls `scheduler.step()` only after a finite loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _cos_anneal(start: float, end: float, frac_done: jax.Array, frac_left: jax.Array) -> jax.Array:
  """torch's `end + (start - end) / 2 * (1 + cos(pi * pct))`, written without cancellation.

  With `(1 + cos(pi p)) / 2 = sin^2(pi (1 - p) / 2)` and `(1 - cos(pi p)) / 2 = sin^2(pi p / 2)`
  the value is a convex combination of both endpoints whose weights are accurate in float32 at
  either end of a phase (the literal formula loses ~3 digits near `min_lr = peak_lr / 2.5e5`).
  `frac_left = 1 - frac_done` is passed separately because it is computed exactly from steps.
  """
  half_pi = 0.5 * math.pi
  return start * jnp.sin(half_pi * frac_left) ** 2 + end * jnp.sin(half_pi * frac_done) ** 2


def onecycle_schedules(
  *,
  total_steps: int,
  peak_lr: float,
  pct_start: float = 0.2,
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
  base_beta1: float = 0.85,
  max_beta1: float = 0.95,
) -> tuple[Schedule, Schedule]:
  """Learning-rate and beta1 schedules of torch's `OneCycleLR(anneal_strategy='cos')`.

  Args:
    total_steps: number of optimiser updates of the whole run.
    peak_lr: `max_lr`; the run starts at `peak_lr / div_factor` and ends at
      `peak_lr / div_factor / final_div_factor`.
    pct_start: fraction of the run spent raising the learning rate.
    div_factor: initial learning rate divisor.
    final_div_factor: divisor from the initial to the final learning rate.
    base_beta1: beta1 at the learning-rate peak.
    max_beta1: beta1 at the start and end of the run.

  Returns:
    `(lr_schedule, beta1_schedule)`, functions of the update index `k` (int or int array,
    traceable under `jax.jit`) returning float32 values equal to torch's after `k`
    `scheduler.step()` calls. Steps are clipped to `[0, total_steps]`, the range torch accepts.

  Raises:
    ValueError: for a `total_steps` or `pct_start` that torch rejects.
  """
  if not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f'optim: total_steps must be a positive integer, got {total_steps!r}.')
  if not 0.0 <= pct_start <= 1.0:
    raise ValueError(f'optim: pct_start must lie in [0, 1], got {pct_start}.')
  warmup_end = float(pct_start * total_steps) - 1  # torch's boundary, deliberately not rounded
  last_step = float(total_steps - 1)
  initial_lr = peak_lr / div_factor
  min_lr = initial_lr / final_div_factor

  def phase(step: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
    step = jnp.clip(jnp.asarray(step), 0, total_steps).astype(jnp.float32)
    in_warmup = step <= warmup_end
    start = jnp.where(in_warmup, 0.0, warmup_end)
    end = jnp.where(in_warmup, warmup_end, last_step)
    # A phase of zero length (boundary exactly at step 0, or pct_start=1 at the final step)
    # makes torch divide by zero and raise; take the phase's start value so that short smoke
    # runs (e.g. pct_start=0.2, total_steps=5) still work.
    span = end - start
    empty = span == 0
    span = jnp.where(empty, 1.0, span)
    done = jnp.where(empty, 0.0, (step - start) / span)
    left = jnp.where(empty, 1.0, (end - step) / span)
    return in_warmup, done, left

  def lr_schedule(step: jax.typing.ArrayLike) -> jax.Array:
    in_warmup, done, left = phase(step)
    return jnp.where(
      in_warmup,
      _cos_anneal(initial_lr, peak_lr, done, left),
      _cos_anneal(peak_lr, min_lr, done, left),
    )

  def beta1_schedule(step: jax.typing.ArrayLike) -> jax.Array:
    in_warmup, done, left = phase(step)
    return jnp.where(
      in_warmup,
      _cos_anneal(max_beta1, base_beta1, done, left),
      _cos_anneal(base_beta1, max_beta1, done, left),
    )

  return lr_schedule, beta1_schedule


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay: conv and dense kernels (ndim > 1)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
  *,
  total_steps: int,
  peak_lr: float,
  weight_decay: float,
  pct_start: float,
  div_factor: float,
  final_div_factor: float,
  base_beta1: float,
  max_beta1: float,
  beta2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Adam + coupled L2 on kernels + OneCycle learning rate and beta1, as the authors' train.py.

  The returned transformation expects `params` in `update` (the decay term needs them). Its
  state is `(decay_state, InjectHyperparamsState)`; `current_hparams` reads the logged values.
  """
  lr_schedule, beta1_schedule = onecycle_schedules(
    total_steps=total_steps,
    peak_lr=peak_lr,
    pct_start=pct_start,
    div_factor=div_factor,
    final_div_factor=final_div_factor,
    base_beta1=base_beta1,
    max_beta1=max_beta1,
  )
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.inject_hyperparams(optax.adam)(
      learning_rate=lr_schedule, b1=beta1_schedule, b2=beta2, eps=eps
    ),
  )


def current_hparams(opt_state: Any) -> dict[str, jax.Array]:
  """Learning rate and beta1 used by the latest update (the step-0 values before any update)."""
  hyperparams = opt_state[1].hyperparams
  return {'learning_rate': hyperparams['learning_rate'], 'beta1': hyperparams['b1']}


def ema_update(ema_tree: Any, new_tree: Any, decay: jax.typing.ArrayLike) -> Any:
  """`decay * ema + (1 - decay) * new` on float leaves; other leaves (counters) take `new`.

  Covers parameters and BatchNorm statistics alike. Averaging integer counters would be
  meaningless (torch's ModelEma truncates the average of `num_batches_tracked`), so they follow
  the live model. Float leaves keep the EMA's dtype.
  """

  def update(ema: jax.Array, new: jax.Array) -> jax.Array:
    if not jnp.issubdtype(jnp.result_type(ema), jnp.floating):
      return new
    return (decay * ema + (1.0 - decay) * new).astype(jnp.result_type(ema))

  return jax.tree.map(update, ema_tree, new_tree)
