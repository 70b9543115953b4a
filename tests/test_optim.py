"""Optimiser, schedules and EMA against torch's Adam, OneCycleLR and the EMA arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from kmcl_jax import optim

RECIPE = dict(pct_start=0.2, div_factor=25.0, final_div_factor=1e4, base_beta1=0.85, max_beta1=0.95)


def _torch_onecycle_values(total_steps: int, pct_start: float, peak_lr: float):
  """lr and beta1 of torch's OneCycleLR after k = 0..total_steps scheduler steps."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.Adam([param], lr=peak_lr)
  sched = torch.optim.lr_scheduler.OneCycleLR(
    opt, max_lr=peak_lr, total_steps=total_steps, pct_start=pct_start
  )
  lrs, beta1s = [], []
  for k in range(total_steps + 1):
    lrs.append(opt.param_groups[0]['lr'])
    beta1s.append(opt.param_groups[0]['betas'][0])
    if k < total_steps:
      opt.step()  # no gradient: a no-op that keeps torch's step-order check quiet
      sched.step()
  return np.array(lrs), np.array(beta1s)


@pytest.mark.parametrize(
  'total_steps,pct_start',
  [
    (50, 0.2),  # boundary 9.0 on an integer step
    (7, 0.2),  # boundary 0.4: between steps
    (37, 0.3),  # boundary 10.1
    (25640, 0.2),  # 40 epochs x 641 steps: float32 accuracy near min_lr over a real run
  ],
)
def test_schedules_match_torch_onecycle(total_steps, pct_start):
  peak_lr = 2e-4
  want_lr, want_beta1 = _torch_onecycle_values(total_steps, pct_start, peak_lr)
  lr_fn, beta1_fn = optim.onecycle_schedules(
    total_steps=total_steps, peak_lr=peak_lr, pct_start=pct_start
  )
  steps = jnp.arange(total_steps + 1)
  got_lr, got_beta1 = jax.jit(lambda k: (lr_fn(k), beta1_fn(k)))(steps)
  np.testing.assert_allclose(np.asarray(got_lr), want_lr, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(got_beta1), want_beta1, rtol=1e-6, atol=0)
  # Scalar (python int) steps work too, as optax calls them with a scalar count.
  assert float(lr_fn(3)) == pytest.approx(want_lr[3], rel=1e-6)


def test_schedule_with_phase_boundary_at_step_zero():
  # pct_start * total_steps == 1 makes torch divide 0 by 0 at step 0; we take the start value
  # there. Reference: torch with the boundary nudged just above 0, which changes values ~1e-9.
  want_lr, want_beta1 = _torch_onecycle_values(5, 0.2 * (1 + 1e-9), 1e-3)
  lr_fn, beta1_fn = optim.onecycle_schedules(total_steps=5, peak_lr=1e-3, pct_start=0.2)
  steps = jnp.arange(6)
  np.testing.assert_allclose(np.asarray(lr_fn(steps)), want_lr, rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(beta1_fn(steps)), want_beta1, rtol=1e-6, atol=0)


def test_schedule_rejects_bad_settings():
  with pytest.raises(ValueError, match='total_steps'):
    optim.onecycle_schedules(total_steps=0, peak_lr=1e-3)
  with pytest.raises(ValueError, match='pct_start'):
    optim.onecycle_schedules(total_steps=10, peak_lr=1e-3, pct_start=1.5)


def _problem(rng: np.random.Generator) -> dict:
  return {
    'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
    'dense': {
      'kernel': rng.normal(size=(5, 3)).astype(np.float32),
      'bias': rng.normal(size=(3,)).astype(np.float32),
    },
    'bn': {
      'scale': (1 + 0.1 * rng.normal(size=(4,))).astype(np.float32),
      'bias': rng.normal(size=(4,)).astype(np.float32),
    },
  }


def test_full_run_matches_torch_adam_onecycle():
  total_steps, peak_lr, wd = 20, 1e-2, 0.05  # large lr and wd so both effects are visible
  rng = np.random.default_rng(0)
  params = _problem(rng)
  # Gradient scales from 1e-9 to 10 per step: the moments and, at the small end, the placement
  # of eps (added to sqrt(v_hat), not inside the square root) decide the result.
  grads = [
    jax.tree.map(
      lambda p: (rng.normal(size=p.shape) * 10.0 ** rng.uniform(-9, 1)).astype(np.float32), params
    )
    for _ in range(total_steps)
  ]

  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  leaves = jax.tree.leaves(params)
  t_params = [torch.nn.Parameter(torch.tensor(x)) for x in leaves]
  groups = [
    {'params': [p for p, x in zip(t_params, leaves) if x.ndim > 1], 'weight_decay': wd},
    {'params': [p for p, x in zip(t_params, leaves) if x.ndim <= 1], 'weight_decay': 0.0},
  ]
  t_opt = torch.optim.Adam(groups, lr=peak_lr, betas=(0.9, 0.999), eps=1e-8)
  t_sched = torch.optim.lr_scheduler.OneCycleLR(
    t_opt, max_lr=peak_lr, total_steps=total_steps, pct_start=0.2
  )

  tx = optim.make_optimizer(total_steps=total_steps, peak_lr=peak_lr, weight_decay=wd, **RECIPE)
  j_params = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(j_params)

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for g in grads:
    t_lr, t_beta1 = t_opt.param_groups[0]['lr'], t_opt.param_groups[0]['betas'][0]
    for p, x in zip(t_params, jax.tree.leaves(g)):
      p.grad = torch.tensor(x)
    t_opt.step()
    t_sched.step()
    j_params, opt_state = step(j_params, opt_state, g)
    hp = optim.current_hparams(opt_state)
    assert float(hp['learning_rate']) == pytest.approx(t_lr, rel=1e-6)
    assert float(hp['beta1']) == pytest.approx(t_beta1, rel=1e-6)
    for path, got, want, init in zip(paths, jax.tree.leaves(j_params), t_params, leaves):
      want = want.detach().numpy()
      # atol: float32 rounding of the few weights close to zero.
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7, err_msg=path)
      # The displacement from the start is the optimiser's own work: check it tightly too
      # (atol: a few float32 ulps of the O(1) weights it is the difference of).
      np.testing.assert_allclose(
        np.asarray(got) - init, want - init, rtol=1e-4, atol=5e-7, err_msg=path
      )


def test_weight_decay_only_on_kernels():
  rng = np.random.default_rng(1)
  params = jax.tree.map(jnp.asarray, _problem(rng))
  peak_lr, wd = 1e-2, 1e-4
  tx = optim.make_optimizer(total_steps=10, peak_lr=peak_lr, weight_decay=wd, **RECIPE)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for name in ('bias', 'scale'):
    np.testing.assert_array_equal(new['bn'][name], params['bn'][name])
  np.testing.assert_array_equal(new['dense']['bias'], params['dense']['bias'])
  # First Adam step on gradient wd * w moves each weight by lr * sign(w) towards zero
  # (m_hat / sqrt(v_hat) = g / |g|), with lr = peak_lr / div_factor at step 0.
  lr0 = peak_lr / RECIPE['div_factor']
  for got, old in (
    (new['conv']['kernel'], params['conv']['kernel']),
    (new['dense']['kernel'], params['dense']['kernel']),
  ):
    g = wd * np.asarray(old)
    want = np.asarray(old) - lr0 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert np.all(np.abs(np.asarray(got)) < np.abs(np.asarray(old)))


def test_nnx_state_under_jit():
  """The optimiser accepts an nnx.State of a model with a dense layer and BatchNorm."""

  class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.dense = nnx.Linear(4, 3, rngs=rngs)
      self.bn = nnx.BatchNorm(3, rngs=rngs)

  params = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
  tx = optim.make_optimizer(total_steps=5, peak_lr=1e-2, weight_decay=0.1, **RECIPE)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero, jax.jit(tx.init)(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['bn']['scale'][...], params['bn']['scale'][...])
  np.testing.assert_array_equal(new['dense']['bias'][...], params['dense']['bias'][...])
  assert not np.allclose(new['dense']['kernel'][...], params['dense']['kernel'][...])


def test_ema_update_hand_example():
  ema = {
    'w': jnp.array([1.0, 2.0]),
    'bn': {'mean': jnp.array([0.5], jnp.float32), 'count': jnp.array(3, jnp.int32)},
  }
  new = {
    'w': jnp.array([3.0, -2.0]),
    'bn': {'mean': jnp.array([1.5], jnp.float32), 'count': jnp.array(7, jnp.int32)},
  }
  out = jax.jit(optim.ema_update)(ema, new, 0.75)
  # 0.75 * 1 + 0.25 * 3 = 1.5; 0.75 * 2 + 0.25 * -2 = 1.0; 0.75 * 0.5 + 0.25 * 1.5 = 0.75.
  np.testing.assert_allclose(out['w'], [1.5, 1.0], rtol=1e-7)
  np.testing.assert_allclose(out['bn']['mean'], [0.75], rtol=1e-7)
  assert out['bn']['count'].dtype == jnp.int32 and int(out['bn']['count']) == 7
  assert out['w'].dtype == jnp.float32
  # The recipe's decay over many steps equals the closed form decay^n for a constant target.
  tree = {'w': jnp.zeros(())}
  for _ in range(50):
    tree = optim.ema_update(tree, {'w': jnp.ones(())}, 0.9997)
  assert float(tree['w']) == pytest.approx(1 - 0.9997**50, rel=1e-4)
