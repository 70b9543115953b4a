"""The same training step in kmcl_jax and in PyTorch, alternated in one run on one machine.

  python -m kmcl_jax.benchmarks.vs_pytorch [--batch_size=8] [--image_size=224] \\
      [--repeats=5] [--steps=4] [--json=PATH]
  python -m kmcl_jax.benchmarks.vs_pytorch --smoke     # tiny TResNet at 64 px, seconds

PyTorch side: timm's `tresnet_m` (features only) + a torch transcription of the KMM head
(isotropic Bhattacharyya) and the paper objective (L_REC + 0.1 L_ASL + 0.3 L_KMCL), Adam with
coupled L2 on the kernels and a weight EMA, in float32, `torch.set_num_threads(--threads)`.
kmcl_jax side: `kmcl_jax.train.train_step` jitted as the trainer does, same batch, resolution,
classes and float32. Both see a fresh random batch of the same shape; each repeat times
`--steps` steps of one then `--steps` of the other, so load from other processes hits both.
Prints the medians; `--json` writes {"jax_step_s", "torch_step_s", "ratio", ...} with
ratio = jax / torch (medians of wall time), and the same for the CPU time the process used
("jax_cpu_s", "torch_cpu_s", "cpu_ratio"; a check on a machine shared with other jobs, where
wall time also measures the others). On a shared machine run it with OMP_WAIT_POLICY=PASSIVE:
torch's OpenMP threads otherwise spin while waiting for descheduled peers, which slowed its
step 9x here (BENCHMARKS.md) and would flatter kmcl_jax. Needs the test extras (torch,
timm: requirements-test.txt) and the repository checkout (timm is imported through
tests/timm_reference.py).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from kmcl_jax import allocator
from kmcl_jax.benchmarks import common

_BATCH = flags.DEFINE_integer('batch_size', 8, 'batch size')
_SIZE = flags.DEFINE_integer('image_size', 224, 'image size')
_CLASSES = flags.DEFINE_integer('num_classes', 20, 'K of the KMM head')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'alternations of the two frameworks')
_STEPS = flags.DEFINE_integer('steps', 4, 'timed steps per framework and repeat')
_THREADS = flags.DEFINE_integer(
  'threads', None, 'torch threads (default: all host cores, as XLA:CPU uses)'
)
_SMOKE = flags.DEFINE_bool('smoke', False, 'tiny TResNet at 64 px, one short repeat (tests)')
_JSON = flags.DEFINE_string('json', None, 'write the result to this JSON file')

LAMBDA_ASL, LAMBDA_KMCL, TEMPERATURE = 0.1, 0.3, 0.2  # the paper variant


def _torch_objective(torch, features, pi_logits, mu, var, labels):
  """The paper objective of `kmcl_jax.losses.kmcl_objective` (isotropic Bhattacharyya)."""
  f = torch.nn.functional
  pos = labels > 0
  m = features.shape[-1]
  # Reconstruction (Eq. 5): log g_k(f) with the exact centred split of ||f - mu 1||^2.
  fbar = features.mean(-1, keepdim=True)
  spread = (features - fbar).square().sum(-1, keepdim=True)
  log_g = -0.5 * (spread + m * (fbar - mu).square()) / var
  log_terms = f.logsigmoid(pi_logits) + log_g
  has_pos = pos.any(-1)
  rec_per = torch.logsumexp(log_terms, -1) - torch.logsumexp(
    log_terms.masked_fill(~pos, -torch.inf), -1
  )
  rec = torch.where(has_pos, rec_per, 0.0).sum() / has_pos.sum().clamp(min=1)
  # ASL (Eq. 6): gamma_pos 0, gamma_neg 4, clip 0.05, focusing weights detached, mean over N.
  p = torch.sigmoid(pi_logits)
  p_m = (p - 0.05).clamp(min=0)
  asl = -(
    labels * p.clamp(min=1e-7).log()
    + (1 - labels) * p_m.detach().pow(4) * (1 - p_m).clamp(min=1e-7).log()
  ).sum()
  asl = asl / labels.shape[0]
  # Kernel contrastive loss (Eq. 7) over [N, N, K].
  n = labels.shape[0]
  sd = var.sqrt()
  mean_term = 0.25 * (mu[:, None] - mu[None]).square() / (var[:, None] + var[None])
  det_term = 0.5 * torch.log1p((sd[:, None] - sd[None]).square() / (2 * sd[:, None] * sd[None]))
  logits = torch.exp(-m * (mean_term + det_term)) / TEMPERATURE
  not_self = ~torch.eye(n, dtype=torch.bool)
  log_den = torch.logsumexp(logits.masked_fill(~not_self[:, :, None], -torch.inf), 1)
  log_ratio = logits - log_den[:, None]
  shared = pos[:, None] & pos[None] & not_self[:, :, None]
  positive = shared.any(-1)
  num_pos = positive.sum(-1)
  inter = labels @ labels.T
  counts = labels.sum(-1)
  union = counts[:, None] + counts[None] - inter
  jaccard = torch.where(union > 0, inter / union.clamp(min=1), 0.0)
  per_pair = jaccard * torch.where(shared, log_ratio, 0.0).sum(-1)
  per_anchor = -per_pair.sum(-1) / num_pos.clamp(min=1)
  has_anchor = num_pos > 0
  kmcl = torch.where(has_anchor, per_anchor, 0.0).sum() / has_anchor.sum().clamp(min=1)
  return rec + LAMBDA_ASL * asl + LAMBDA_KMCL * kmcl


def torch_step_fn(image_size: int, batch_size: int, num_classes: int, *, smoke: bool):
  """A closure running one torch training step on a fresh random batch."""
  import torch  # pylint: disable=g-import-not-at-top

  from tests import timm_reference  # pylint: disable=g-import-not-at-top

  timm = timm_reference.import_timm()
  torch.manual_seed(0)
  if smoke:
    overrides = common.SMOKE_OVERRIDES
    encoder = timm.models.tresnet.TResNet(
      layers=list(overrides['layers']), num_classes=0, width_factor=overrides['width_factor']
    )
  else:
    encoder = timm.create_model('tresnet_m', pretrained=False, num_classes=0)
  width = encoder.num_features
  head = torch.nn.ModuleDict(
    {name: torch.nn.Linear(width, num_classes) for name in ('pi', 'mu', 'var')}
  )
  model = torch.nn.ModuleDict({'encoder': encoder, 'head': head}).train()
  params = list(model.parameters())
  optimizer = torch.optim.Adam(
    [
      {'params': [p for p in params if p.ndim > 1], 'weight_decay': 1e-4},
      {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0},
    ],
    lr=1e-4,
    betas=(0.9, 0.999),
    eps=1e-8,
  )
  ema = [t.detach().clone() for t in model.state_dict().values() if t.is_floating_point()]
  live = [t for t in model.state_dict().values() if t.is_floating_point()]
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  rng = np.random.default_rng(1)

  def step():
    images = torch.from_numpy(
      rng.integers(0, 256, (batch_size, 3, image_size, image_size), dtype=np.uint8)
    )
    labels = torch.from_numpy((rng.random((batch_size, num_classes)) < 0.2).astype(np.float32))
    x = (images.float() / 255 - mean) / std
    features = encoder(x)
    out = {name: layer(features) for name, layer in head.items()}
    var = torch.nn.functional.elu(out['var']) + 2 + 1e-7
    loss = _torch_objective(torch, features, out['pi'], out['mu'], var, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, live, 1 - 0.9997)  # pylint: disable=protected-access
    return float(loss.detach())

  return step


def jax_step_fn(image_size: int, batch_size: int, num_classes: int, *, smoke: bool):
  """A closure running one kmcl_jax training step on a fresh random batch (waited for)."""
  config = common.make_config(
    'tresnet_m',
    image_size,
    batch_size=batch_size,
    dtype='float32',
    num_classes=num_classes,
    overrides=common.SMOKE_OVERRIDES if smoke else None,
  )
  step, state, batch = common.build_step(config, num_classes)
  sharding = batch['image'].sharding
  rng = np.random.default_rng(1)
  holder = {'state': state}

  def run():
    images = rng.integers(0, 256, batch['image'].shape, dtype=np.uint8)
    labels = (rng.random(batch['labels'].shape) < 0.2).astype(np.float32)
    fresh = {'image': jax.device_put(images, sharding), 'labels': jax.device_put(labels, sharding)}
    holder['state'], metrics = step(holder['state'], fresh)
    return float(metrics['loss'])

  return run


def _timed(fn, count):
  """[(wall seconds, CPU seconds of this process, all threads)] per call."""
  times = []
  for _ in range(count):
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    times.append((time.perf_counter() - start, time.process_time() - cpu))
  return times


def compare(
  *,
  image_size: int,
  batch_size: int,
  num_classes: int,
  repeats: int,
  steps: int,
  threads: int,
  smoke: bool,
) -> dict:
  """Alternates the two steps; returns medians, the ratio and the per-repeat ratios."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch_step = torch_step_fn(image_size, batch_size, num_classes, smoke=smoke)
  jax_step = jax_step_fn(image_size, batch_size, num_classes, smoke=smoke)
  start = time.perf_counter()
  jax_step()  # compiles
  compile_s = time.perf_counter() - start
  torch_step()
  jax_times, torch_times, ratios = [], [], []
  for _ in range(repeats):
    j = _timed(jax_step, steps)
    t = _timed(torch_step, steps)
    jax_times += j
    torch_times += t
    ratios.append(float(np.median([x[0] for x in j]) / np.median([x[0] for x in t])))
  (jax_s, jax_cpu), (torch_s, torch_cpu) = (
    np.median(np.asarray(x), axis=0) for x in (jax_times, torch_times)
  )
  return {
    'jax_step_s': round(float(jax_s), 4),
    'torch_step_s': round(float(torch_s), 4),
    'ratio': round(float(jax_s / torch_s), 3),
    'ratio_per_repeat': [round(r, 3) for r in ratios],
    'jax_cpu_s': round(float(jax_cpu), 4),
    'torch_cpu_s': round(float(torch_cpu), 4),
    'cpu_ratio': round(float(jax_cpu / torch_cpu), 3),
    'jax_compile_s': round(compile_s, 1),
    'batch_size': batch_size,
    'image_size': image_size,
    'num_classes': num_classes,
    'threads': threads,
    'model': 'tresnet_m' + (' (smoke: width 0.125, one block per stage)' if smoke else ''),
    'dtype': 'float32',
    'device': jax.devices()[0].device_kind,
    'torch': torch.__version__,
    'jax': jax.__version__,
    'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', ''),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'malloc': allocator.malloc_name(),
  }


def main(argv):
  del argv
  smoke = _SMOKE.value
  result = compare(
    image_size=64 if smoke else _SIZE.value,
    batch_size=_BATCH.value,
    num_classes=_CLASSES.value,
    repeats=1 if smoke else _REPEATS.value,
    steps=2 if smoke else _STEPS.value,
    threads=_THREADS.value or os.cpu_count(),
    smoke=smoke,
  )
  print(
    f'{result["model"]} {result["image_size"]}px batch {result["batch_size"]} float32, '
    f'{result["threads"]} threads, {jax.default_backend()}, malloc: {result["malloc"]}'
  )
  print(
    f'kmcl_jax {1e3 * result["jax_step_s"]:9.1f} ms/step   '
    f'PyTorch {1e3 * result["torch_step_s"]:9.1f} ms/step   ratio jax/torch '
    f'{result["ratio"]:.3f}  (per repeat {result["ratio_per_repeat"]})'
  )
  print(
    f'CPU time per step (all threads): kmcl_jax {result["jax_cpu_s"]:.2f} s, PyTorch '
    f'{result["torch_cpu_s"]:.2f} s, ratio {result["cpu_ratio"]:.3f}'
  )
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  allocator.run_on_tcmalloc()
  app.run(main)
