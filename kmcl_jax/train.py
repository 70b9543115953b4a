"""The training loop: `train_and_evaluate(config, workdir)` and the pure `train_step`.

Shape of a run (docs/training.md):
  1. Validate the config and open the data sources (`kmcl_jax.experiment`), before anything is
     compiled.
  2. One mesh over all devices; the batch is sharded on 'data', parameters are replicated, and
     each process feeds only its shard of the global batch. The contrastive loss sees the
     global batch (XLA gathers the kernels across devices).
  3. State: resume from workdir/checkpoints/latest if present, else `init_from` weights, else
     from scratch. Initialisation goes through `jax.eval_shape` and `jax.jit(out_shardings=...)`.
  4. A jitted, donated, pure train step; non-finite loss or gradients leave the state unchanged
     and count a skipped step (as the authors' code does).
  5. Every `eval_every_epochs`: model and EMA on the selection split (`kmcl_jax.evaluate`),
     checkpoints (latest, and best by selection-split mAP, recording whether model or EMA won).
  6. At the end: the selected weights on the test split -> results.json, and export/.

Only process 0 writes logs and files; every process runs the same program.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from kmcl_jax import (
  checkpoint as checkpoint_lib,
  distributed,
  evaluate as evaluate_lib,
  experiment,
  export as export_lib,
  losses,
  optim,
  workdir as workdir_lib,
)
from kmcl_jax.data import augment_device, pipeline
from kmcl_jax.models import KMCLModel
from kmcl_jax.writer import MetricWriter

# Re-exported: the trainer's entry points raise it and main.py catches it.
ConfigError = experiment.ConfigError


# ------------------------------------------------------------------------------ steps


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def train_step(
  state: dict[str, Any],
  batch: dict[str, jax.Array],
  *,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  loss_config: losses.LossConfig,
  ema_decay: float,
  mean: Sequence[float],
  std: Sequence[float],
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One optimisation step on a (global) batch; returns (new_state, metrics).

  `augment(images_uint8, step)`, when given, augments the batch on the device before it is
  normalised (dataset.augment_device; kmcl_jax.data.augment_device.sharded_augment).
  """
  images = batch['image']
  if augment is not None:
    images = augment(images, state['step'])
  images = pipeline.normalize(images, mean, std)

  def loss_fn(params):
    # copy: fresh Variables at this trace level, so BatchNorm may update its statistics.
    model = nnx.merge(graphdef, params, state['batch_stats'], copy=True)
    out = model(images)
    loss, aux = losses.kmcl_objective(
      features=out['features'], head=out, labels=batch['labels'], config=loss_config
    )
    return loss, (aux, nnx.state(model, nnx.BatchStat))

  (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  grad_norm = _global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(old):
    updates, opt_state = optimizer.update(grads, old['opt_state'], old['params'])
    params = optax.apply_updates(old['params'], updates)
    return dict(
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      ema_params=optim.ema_update(old['ema_params'], params, ema_decay),
      ema_batch_stats=optim.ema_update(old['ema_batch_stats'], batch_stats, ema_decay),
    )

  # A cond rather than a where per array: the update then writes the donated buffers in place,
  # where keeping both versions alive made XLA copy the state every step (BENCHMARKS.md).
  kept = ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats')
  new_state = dict(
    state, **jax.lax.cond(finite, update, lambda old: old, {k: state[k] for k in kept})
  )
  new_state['step'] = state['step'] + 1
  new_state['skipped'] = state['skipped'] + (~finite).astype(jnp.int32)
  hparams = optim.current_hparams(new_state['opt_state'])
  metrics = dict(
    aux,
    grad_norm=grad_norm,
    param_norm=_global_norm(new_state['params']),
    learning_rate=hparams['learning_rate'],
    beta1=hparams['beta1'],
    skipped_steps=new_state['skipped'],
  )
  return new_state, metrics


# ------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class _Run:
  """What the loop needs besides the state: compiled steps, shardings, data, writers."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  data_sharding: NamedSharding
  train_step: Any
  predict_fn: Any
  class_names: tuple[str, ...]

  def evaluate(self, state, source, *, desc: str) -> dict[str, dict[str, Any]]:
    """Reports of the model and its EMA on `source`."""
    c = self.config
    weights = {
      'model': (state['params'], state['batch_stats']),
      'ema': (state['ema_params'], state['ema_batch_stats']),
    }
    return evaluate_lib.evaluate(
      self.predict_fn,
      weights,
      source,
      data_sharding=self.data_sharding,
      batch_size=c.eval_batch_size,
      image_size=c.model.image_size,
      threshold=c.eval.threshold,
      top_k=c.eval.top_k,
      with_auc=c.eval.with_auc,
      class_names=self.class_names,
      desc=desc,
    )


def _to_global(run: _Run, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return evaluate_lib.to_global(run.data_sharding, local_batch)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  allow_config_change: bool = False,
  resume_fallback: bool = False,
) -> dict[str, Any]:
  """Trains, evaluates and exports as the config says; returns the results.json content.

  Before anything is compiled or written: the settings are checked, the workdir is checked to
  be usable, free (its lock) and made with the same config (`kmcl_jax.workdir`; deliberate
  changes need `allow_config_change`), and every split is opened and its image files checked.
  `resume_fallback`: a checkpoint that cannot be restored is set aside and the next newest one
  used, instead of stopping with its name.
  """
  experiment.validate_config(config)
  _use_compilation_cache(config.compilation_cache_dir)
  lock, refusal = None, None
  if jax.process_index() == 0:
    try:
      workdir_lib.check_usable(workdir)
      # Read-only, so that a refused run leaves the workdir as it was.
      workdir_lib.check_config(workdir, config, allow_change=allow_config_change)
      lock = workdir_lib.Lock.acquire(workdir)
    except workdir_lib.WorkdirError as e:
      refusal = e
  if jax.process_count() > 1:  # the other processes stop too, instead of waiting on process 0
    refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if int(refused) and refusal is None:
      raise workdir_lib.WorkdirError(f'process 0 refused workdir {workdir} (its log says why).')
  if refusal is not None:
    raise refusal
  try:
    return _train_and_evaluate(
      config, workdir, allow_config_change=allow_config_change, resume_fallback=resume_fallback
    )
  finally:
    if lock is not None:
      lock.release()


def _use_compilation_cache(path: str) -> None:
  """Turns on XLA's persistent compilation cache in `path` ('' leaves it off)."""
  if path:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))


def _open_checked_sources(config: ml_collections.ConfigDict):
  """(train, val, test, {split: records dropped}) after `pipeline.preflight` of each split."""
  try:
    train, val, test = experiment.open_sources(config)
  except ConfigError:
    raise
  except ValueError as e:  # an annotation file, split or option the source rejects
    raise pipeline.InputError(f'dataset {config.dataset.name!r}: {e}') from e
  skip = config.dataset.skip_unreadable
  dropped = {}
  train, dropped['train'] = pipeline.preflight(train, split='train', skip_unreadable=skip)
  test, dropped['test'] = pipeline.preflight(test, split='test', skip_unreadable=skip)
  if skip:  # records that exist but do not decode come out masked and counted
    test = pipeline.SkipUnreadable(test)
  if config.dataset.select_on_test:
    val, dropped['val'] = test, dropped['test']
  elif val is not None:
    val, dropped['val'] = pipeline.preflight(val, split='val', skip_unreadable=skip)
    val = pipeline.SkipUnreadable(val) if skip else val
  return train, val, test, dropped


def _train_and_evaluate(config, workdir, *, allow_config_change, resume_fallback):
  """`train_and_evaluate` once the workdir is this process's (process 0) or checked."""
  train_src, val_src, test_src, dropped = _open_checked_sources(config)
  class_names = tuple(train_src.class_names)
  num_steps, steps_per_epoch = experiment.total_steps(config, len(train_src))
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  is_main = jax.process_index() == 0
  if is_main:
    # Under the lock: the record is written only by the run that holds the workdir.
    changes = workdir_lib.check_config(workdir, config, allow_change=allow_config_change)
    workdir_lib.record_config(workdir, config, changes)

  mesh = distributed.data_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  optimizer = experiment.make_optimizer(config, num_steps)
  model_fn = functools.partial(experiment.create_model, config, len(class_names), config.seed)

  abstract_model = nnx.eval_shape(model_fn)
  abstract_model.train()
  train_graphdef = nnx.graphdef(abstract_model)
  abstract_model.eval()
  eval_graphdef = nnx.graphdef(abstract_model)
  abstract_state = jax.eval_shape(functools.partial(experiment.init_state, model_fn, optimizer))
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sharding
  )

  if config.init_from:
    # A mismatching checkpoint is a config error: find it on the abstract model, before any
    # compilation (load_pretrained checks every key and shape).
    try:
      _pretrained(config, nnx.eval_shape(model_fn))
    except ValueError as e:
      raise ConfigError(f'config error: init_from={config.init_from!r}: {e}') from e

  mean, std = pipeline.NORMALIZATION[config.dataset.normalization]
  loss_config = losses.LossConfig.from_mapping(config.loss.to_dict())
  # dataset.augment_device: the host only resizes, the step runs the augmentations.
  on_device = augment_device.enabled(config.dataset.augment_device)
  device_augment = (
    augment_device.sharded_augment(kind=config.dataset.augment, seed=config.seed, mesh=mesh)
    if on_device and config.dataset.augment != 'none'
    else None
  )
  run = _Run(
    config=config,
    mesh=mesh,
    data_sharding=data_sharding,
    class_names=class_names,
    train_step=jax.jit(
      functools.partial(
        train_step,
        graphdef=train_graphdef,
        optimizer=optimizer,
        loss_config=loss_config,
        ema_decay=config.ema_decay,
        mean=mean,
        std=std,
        augment=device_augment,
      ),
      out_shardings=(state_sharding, replicated),
      donate_argnums=0,
    ),
    predict_fn=evaluate_lib.make_predict_fn(
      eval_graphdef, mean=mean, std=std, data_sharding=data_sharding
    ),
  )

  per_process_batch = config.batch_size // jax.process_count()
  train_iter = pipeline.train_iterator(
    train_src,
    batch_size=per_process_batch,
    image_size=config.model.image_size,
    augment='none' if on_device else config.dataset.augment,
    seed=config.seed,
    difficult_as_positive=config.dataset.difficult_as_positive,
    worker_count=config.dataset.worker_count,
    skip_unreadable=config.dataset.skip_unreadable,
    to_device=lambda batch: _to_global(run, batch),
    device_prefetch=config.dataset.device_prefetch,
  )

  ckpt = checkpoint_lib.Checkpoints(workdir)
  # Resume order: this workdir's newest checkpoint -> init_from weights -> from scratch.
  try:
    state = ckpt.resume(abstract_state, train_iter, fallback=resume_fallback)
  except checkpoint_lib.CheckpointError:
    ckpt.close()
    train_iter.close()
    raise
  if state is not None:
    logging.info('Resumed from step %d of %s.', int(state['step']), workdir)
  else:
    state = jax.jit(
      functools.partial(experiment.init_state, model_fn, optimizer), out_shardings=state_sharding
    )()
    if config.init_from:
      state = _load_init_from(config, state, train_graphdef, optimizer, state_sharding)

  # Drops what a killed run logged after its last checkpoint: each step once.
  writer = MetricWriter(workdir, enabled=is_main, start_step=int(state['step']))
  stop = distributed.StopSignals(mesh)  # SIGTERM/SIGINT: checkpoint, then exit
  stop.install()
  try:
    state = _train_loop(
      run,
      state,
      train_iter,
      ckpt,
      writer,
      val_src,
      stop=stop,
      num_steps=num_steps,
      steps_per_epoch=steps_per_epoch,
      eval_every=eval_every,
    )
    results = _finish(
      run,
      state,
      abstract_state,
      ckpt,
      test_src,
      val_src,
      workdir,
      writer,
      dropped=dropped,
      train_iter=train_iter,
    )
  finally:
    stop.restore()
    writer.close()
    ckpt.close()
    train_iter.close()  # stops the prefetch thread and the grain workers
    gc.unfreeze()  # the loop froze the objects alive after its first step
  return results


def _train_loop(
  run, state, train_iter, ckpt, writer, val_src, *, stop, num_steps, steps_per_epoch, eval_every
):
  """Steps from the state's step to num_steps, logging, evaluating and checkpointing."""
  config = run.config
  step = int(state['step'])
  bar = _epoch_bar(step, num_steps, steps_per_epoch, enabled=writer.enabled)
  window_start, window_images = time.perf_counter(), 0
  first_step, first_step_s = step + 1, None
  while step < num_steps:
    batch = next(train_iter)  # global device arrays (pipeline.train_iterator's to_device)
    if step + 1 == first_step:
      distributed.compile_together(run.train_step, state, batch)
    state, metrics = run.train_step(state, batch)
    step += 1
    if step == first_step:
      # The first call compiles (or loads from the compilation cache): timed on its own and
      # kept out of images/s.
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - window_start
      if writer.enabled:
        logging.info('First train step (compilation included): %.1f s.', first_step_s)
      # What is alive now (model, compiled step, JAX's caches) lives until the run ends. Out of
      # the collector's generations, full collections stop walking it each time: they paused
      # the demo for up to 310 ms, 1.9 s per minute (BENCHMARKS.md). Undone at the end.
      gc.collect()
      gc.freeze()
      window_start = time.perf_counter()
    else:
      window_images += config.batch_size
    bar.update(1)
    if step % config.log_every_steps == 0 or step == num_steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - window_start
      line = {f'train/{k}': float(v) for k, v in metrics.items()}
      if window_images:
        line['train/images_per_sec'] = window_images / max(elapsed, 1e-9)
      if first_step_s is not None:
        line['train/first_step_seconds'], first_step_s = first_step_s, None
      line['train/epoch'] = step / steps_per_epoch
      writer.write(step, line)
      bar.set_postfix(
        loss=f'{line["train/loss"]:.4f}', img_s=f'{line.get("train/images_per_sec", 0):.0f}'
      )
      window_start, window_images = time.perf_counter(), 0
    if step % eval_every == 0 or step == num_steps:
      state = _evaluate_and_select(run, state, val_src, ckpt, train_iter, writer, step)
    elif step % config.checkpoint_every_steps == 0:
      ckpt.save_latest(step, state, train_iter)
    signum = stop.agreed()
    if signum:  # every process stops here, at the same step, with one checkpoint
      bar.close()
      ckpt.save_latest(step, state, train_iter)
      ckpt.wait()
      if writer.enabled:
        logging.warning(
          '%s: saved the checkpoint of step %d and stopped; the same command resumes from it.',
          signal.Signals(signum).name,
          step,
        )
      raise SystemExit(128 + signum)
    if bar.n >= bar.total and step < num_steps:
      bar.close()
      bar = _epoch_bar(step, num_steps, steps_per_epoch, enabled=writer.enabled)
  bar.close()
  ckpt.save_latest(step, state, train_iter)
  ckpt.wait()
  return state


def _epoch_bar(step: int, num_steps: int, steps_per_epoch: int, *, enabled: bool):
  """A progress bar over the steps of the epoch that contains `step` (the last epoch when a
  resumed run has no step left)."""
  epoch = min(step, num_steps - 1) // steps_per_epoch
  start = epoch * steps_per_epoch
  total = min(start + steps_per_epoch, num_steps) - start
  return tqdm.tqdm(
    total=total,
    initial=step - start,
    disable=not enabled,
    dynamic_ncols=True,
    desc=f'epoch {epoch + 1}/{math.ceil(num_steps / steps_per_epoch)}',
  )


def _evaluate_and_select(run, state, val_src, ckpt, train_iter, writer, step):
  """Evaluate on the selection split, log, and checkpoint (latest; best when it improves)."""
  if val_src is not None:
    reports = run.evaluate(state, val_src, desc=f'eval@{step}')
    writer.write(
      step,
      {
        f'eval/{name}/{k}': v
        for name, r in reports.items()
        for k, v in evaluate_lib.scalars(r).items()
      },
    )
    ema_won = reports['ema']['mAP'] >= reports['model']['mAP']
    val_map = max(reports['model']['mAP'], reports['ema']['mAP'])
    if val_map > float(state['best_val_map']):
      replicated = NamedSharding(run.mesh, P())
      state = dict(
        state,
        best_val_map=jax.device_put(np.float32(val_map), replicated),
        best_is_ema=jax.device_put(np.int32(ema_won), replicated),
      )
      ckpt.save_best(step, state, train_iter, val_map)
  ckpt.save_latest(step, state, train_iter)
  return state


def _finish(
  run, state, abstract_state, ckpt, test_src, val_src, workdir, writer, *, dropped, train_iter
):
  """Test evaluation of the selected checkpoint, results.json and export/.

  Model selection uses the selection split only: the best checkpoint by its mAP, and model or
  EMA weights as recorded when that checkpoint was saved. Without a selection split, the final
  state and (for export_weights='best') its EMA weights. The test split is only reported.
  `dropped`: per split, the records `pipeline.preflight` dropped (skip_unreadable).
  """
  config = run.config
  ckpt.wait()
  best_step = ckpt.best_step() if val_src is not None else None
  if best_step is not None and best_step != int(state['step']):
    selected = ckpt.restore('best', abstract_state)
  else:
    selected, best_step = state, int(state['step'])
  if config.export_weights != 'best':
    chosen = config.export_weights
  elif val_src is None:
    chosen = 'ema'
  else:
    chosen = 'ema' if int(selected['best_is_ema']) else 'model'
  reports = run.evaluate(selected, test_src, desc='test')
  writer.write(
    int(state['step']),
    {
      f'test/{name}/{k}': v
      for name, r in reports.items()
      for k, v in evaluate_lib.scalars(r).items()
    },
  )
  results = {
    'best_step': int(best_step),
    'eval_split': config.dataset.val_split or config.dataset.test_split,
    'test_split': config.dataset.test_split,
    'exported_weights': chosen,
    'skipped_steps': int(state['skipped']),
    'skipped_unreadable': _skipped_unreadable(dropped, train_iter, val_src, test_src),
    'test': reports,
  }
  prefix = 'ema_' if chosen == 'ema' else ''
  weights = {'params': selected[prefix + 'params'], 'batch_stats': selected[prefix + 'batch_stats']}
  export_lib.write_export(
    os.path.join(workdir, 'export'),
    weights,
    experiment.export_info(config, run.class_names, weights=chosen, step=best_step),
  )
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=1)
    print(evaluate_lib.format_table(reports, f'{config.dataset.test_split} results'), flush=True)
  return results


def _skipped_unreadable(dropped, train_iter, val_src, test_src) -> dict[str, int]:
  """Unreadable records skipped per split, over all processes: those preflight dropped, plus
  those that failed to decode (train: counted in the checkpointed iterator state)."""
  local = {'train': pipeline.skipped_count(train_iter)}
  for name, source in (('val', val_src), ('test', test_src)):
    if source is not None:
      local[name] = source.skipped if isinstance(source, pipeline.SkipUnreadable) else 0
  counts = multihost_utils.process_allgather(np.array(list(local.values())))
  totals = np.asarray(counts).reshape(-1, len(local)).sum(axis=0)
  skipped = {name: int(n) + dropped.get(name, 0) for name, n in zip(local, totals)}
  if any(skipped.values()):
    logging.warning('Unreadable images skipped per split: %s.', skipped)
  return skipped


def _pretrained(config, model: KMCLModel) -> dict:
  """Writes the `init_from` weights into `model` in place; fails loudly on any mismatch."""
  from kmcl_jax import convert  # only needed here; keeps start-up light

  return convert.load_pretrained(model, config.init_from, load_head=config.init_head)


def _load_init_from(config, state, graphdef, optimizer, state_sharding):
  """A fresh train state whose parameters (and EMA) start from the `init_from` weights."""
  model = nnx.merge(graphdef, state['params'], state['batch_stats'])
  info = _pretrained(config, model)
  logging.info('Initialised from %s (%s).', config.init_from, info.get('variant'))
  params, batch_stats = nnx.state(model, nnx.Param, nnx.BatchStat)
  loaded = dict(
    state,
    params=params,
    batch_stats=batch_stats,
    ema_params=params,
    ema_batch_stats=batch_stats,
    opt_state=jax.jit(optimizer.init)(params),
  )
  return jax.device_put(loaded, state_sharding)
