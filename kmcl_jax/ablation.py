"""Table 4 of the paper on a config (default: the synthetic set): ASL only and the four KMCL
similarity / kernel cases, same budget, several seeds each.

    python -m kmcl_jax.ablation --workdir=runs/ablation [--seeds=3] [--epochs=3]
        [--config=configs/synthetic.py]

Each (case, seed) trains into WORKDIR/<case>/seed<i> with `train.train_and_evaluate`; a run
whose results.json exists is not trained again, so an interrupted table resumes. The figure per
run is the test mAP of the exported weights (model or EMA, chosen on the selection split).
WORKDIR/ablation.md holds mean and std over seeds, parameters and forward GMAC per case;
WORKDIR/ablation.json the per-run numbers.

Cases (model.kind and loss.kind always set together; Mahalanobis and Gaussian use the isotropic
mean, as in the paper's Table 4 where they have no case):
  asl_only                    loss.asl_only (pi head and L_ASL alone)
  bhattacharyya_isotropic     the paper's default
  bhattacharyya_anisotropic   per-dimension kernels in the learned D-dimensional space
  mahalanobis                 one variance per feature dimension shared by the classes
  gaussian                    one variance shared by classes and dimensions
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from kmcl_jax import allocator, experiment, train
from kmcl_jax.models import summary

CASES: dict[str, dict[str, object]] = {
  'asl_only': {'loss.asl_only': True},
  'bhattacharyya_isotropic': {'model.kind': 'bhattacharyya', 'model.anisotropic': False},
  'bhattacharyya_anisotropic': {'model.kind': 'bhattacharyya', 'model.anisotropic': True},
  'mahalanobis': {'model.kind': 'mahalanobis', 'model.anisotropic': False},
  'gaussian': {'model.kind': 'gaussian', 'model.anisotropic': False},
}


def case_config(base, case: str, seed: int, epochs: float):
  """The base config with one case's settings, the seed and the common budget."""
  config = base.copy_and_resolve_references()
  for key, value in CASES[case].items():
    section, leaf = key.split('.')
    config[section][leaf] = value
  config.loss.kind = config.model.kind
  config.seed = seed
  config.num_epochs = epochs
  config.num_train_steps = -1
  # One evaluation on the selection split, at the end: same selection rule for every case.
  config.eval_every_epochs = epochs
  return config


def cost(config, num_classes: int) -> tuple[int, float]:
  """(parameters, forward GMAC per image) of the model a config builds."""
  build = functools.partial(experiment.create_model, config, num_classes, 0)
  return summary.parameter_count(build), summary.forward_macs(build, config.model.image_size) / 1e9


def exported_map(results: dict) -> float:
  """Test mAP of the weights the run exported."""
  return float(results['test'][results['exported_weights']]['mAP'])


def format_table(rows: list[dict], *, epochs: float, seeds: int, dataset: str) -> str:
  """ablation.md: one row per case (mean and std of the test mAP over seeds, cost)."""
  lines = [
    f'# Ablation (paper Table 4) on `{dataset}`',
    '',
    f'{epochs:g} epochs per run, seeds 0..{seeds - 1}; test mAP of the exported weights '
    '(model or EMA, chosen on the selection split); std over seeds (ddof=1).',
    '',
    '| case | mAP mean | mAP std | runs | params (M) | GMAC |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for r in rows:
    std = f'{r["std"]:.2f}' if r['std'] is not None else '-'
    lines.append(
      f'| {r["case"]} | {r["mean"]:.2f} | {std} | {len(r["maps"])} | '
      f'{r["params"] / 1e6:.3f} | {r["gmac"]:.4f} |'
    )
  return '\n'.join(lines) + '\n'


def run_ablation(base, workdir: str, *, cases, seeds: int, epochs: float) -> list[dict]:
  """Trains the missing runs, then writes ablation.md and ablation.json; returns the rows."""
  experiment.validate_config(base)
  num_classes = len(experiment.open_split(base, base.dataset.test_split).class_names)
  rows = []
  for case in cases:
    maps = []
    for seed in range(seeds):
      config = case_config(base, case, seed, epochs)
      run_dir = os.path.join(workdir, case, f'seed{seed}')
      results_path = os.path.join(run_dir, 'results.json')
      if os.path.exists(results_path):
        with open(results_path) as f:
          results = json.load(f)
      else:
        print(f'[ablation] training {case} seed {seed} -> {run_dir}', file=sys.stderr, flush=True)
        results = train.train_and_evaluate(config, run_dir)
      maps.append(exported_map(results))
    params, gmac = cost(case_config(base, case, 0, epochs), num_classes)
    rows.append(
      {
        'case': case,
        'maps': maps,
        'mean': float(np.mean(maps)),
        'std': float(np.std(maps, ddof=1)) if len(maps) > 1 else None,
        'params': int(params),
        'gmac': float(gmac),
      }
    )
    _write(workdir, rows, epochs=epochs, seeds=seeds, dataset=base.dataset.name)
  return rows


def _write(workdir, rows, *, epochs, seeds, dataset):
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write(format_table(rows, epochs=epochs, seeds=seeds, dataset=dataset))
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump(rows, f, indent=1)


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Directory of the runs and ablation.md.')
  flags.DEFINE_integer('seeds', 3, 'Seeds per case (0, 1, ...).')
  flags.DEFINE_float('epochs', 3.0, 'Training epochs of every run (one budget).')
  flags.DEFINE_list('cases', list(CASES), f'Subset of {list(CASES)}.')
  config_flags.DEFINE_config_file(
    'config', 'configs/synthetic.py', 'Base configuration of every run.', lock_config=True
  )
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  unknown = sorted(set(f.cases) - set(CASES))
  if unknown:
    sys.exit(f'--cases: unknown {unknown}; expected some of {list(CASES)}.')
  if f.seeds < 1 or f.epochs <= 0:
    sys.exit('--seeds must be >= 1 and --epochs > 0.')
  os.makedirs(f.workdir, exist_ok=True)
  try:
    run_ablation(f.config, f.workdir, cases=f.cases, seeds=f.seeds, epochs=f.epochs)
  except experiment.ConfigError as e:
    sys.exit(str(e))
  with open(os.path.join(f.workdir, 'ablation.md')) as fh:
    print(fh.read())


if __name__ == '__main__':
  allocator.run_on_tcmalloc()
  _define_flags()
  app.run(main)
