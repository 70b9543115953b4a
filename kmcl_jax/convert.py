"""Import PyTorch TResNet and KMCL weights into kmcl_jax, checking that every key is accounted for.

ImageNet TResNet weights and the authors' KMCL checkpoints exist only as PyTorch files. This module
reads them without executing code from the file, maps every tensor onto the Flax model and refuses
anything it cannot explain, so that a silently half-loaded model (PyTorch's `strict=False`
habit) cannot happen.

Sources (`--source`):
  timm  timm / Hugging Face hub files (`model.safetensors`, `pytorch_model.bin`): keys like
        `body.layer2.0.conv1.conv.weight`; BatchNorm weights are plain BN.
  miil  MIIL TResNet / ASL / ImageNet-21K-P files: `['model']` or `['state_dict']` wrapper, keys
        like `body.layer2.0.conv1.0.0.weight`; InPlace-ABN weights become gamma = |w| + 1e-5.
  kmcl  the authors' KMCL checkpoints: `encoder.*` (MIIL keys), optional anisotropic
        `downsampler.*`, and the KMM head `kmm.{pi,mean,var}.*`; optional `module.` prefix.

Documented drops (counted in the sidecar, never silently mixed with real weights):
`num_batches_tracked`, saved blur filters (`*.filt`, a fixed filter recomputed here) and the
ImageNet classifier `head.*` (KMCL replaces it with the KMM; its class count is recorded). Any
other unexpected or missing key, or any shape mismatch, stops the import with a message listing
them.

Output of `python -m kmcl_jax.convert`: a directory with an orbax checkpoint `state/` holding
`{'encoder': ..., 'kmm': ...}` (pure nested dicts of float32 arrays, parameters and BatchNorm
statistics) and the JSON sidecar `kmcl_convert.json`. `load_pretrained` reads it into a
`KMCLModel` (the trainer's `config.init_from`).

    python -m kmcl_jax.convert --input model.safetensors --source timm --model tresnet_m \
        --output weights/tresnet_m_in21k
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kmcl_jax.models import KernelMixtureModule, KMCLModel, TResNet, create_encoder
from kmcl_jax.models.kmm import KINDS

SOURCES = ('timm', 'miil', 'kmcl')
SIDECAR = 'kmcl_convert.json'
STATE_DIR = 'state'
ABN_EPS = 1e-5  # InPlace-ABN stores a signed weight; the BN gamma is |w| + eps.
INPUT_NOTE = (
  'timm / MIIL ImageNet weights were trained on [0, 1] RGB input without mean/std '
  'normalisation; the KMCL authors normalise with ImageNet mean/std anyway.'
)

# Flax leaf name -> PyTorch parameter/buffer name.
_TORCH_LEAF = {
  'kernel': 'weight',
  'scale': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
}
# KMM attribute -> name in the authors' checkpoint.
_KMM_TORCH = {'pi': 'kmm.pi', 'mu': 'kmm.mean', 'var': 'kmm.var', 'reduce': 'downsampler'}
_MAX_LISTED = 25


class CheckpointMismatchError(ValueError):
  """A checkpoint's keys or shapes do not match the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# Reading files.


def read_torch_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a `.safetensors` or PyTorch pickle checkpoint into numpy arrays.

  Returns (tensors, extras): the state dict after unwrapping `['model']` / `['state_dict']`, and
  the wrapper's other entries (e.g. ASL's `num_classes`, `idx_to_class`). Floating tensors are
  returned as float32.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Checkpoint file not found: {path}')
  if path.endswith('.safetensors'):
    import safetensors.numpy  # pylint: disable=g-import-not-at-top

    try:
      tensors = safetensors.numpy.load_file(path)
    except Exception as e:  # safetensors raises several error types for bad headers
      raise ValueError(f'{path} is not a readable safetensors file: {e}') from e
    return {k: _as_float32(v) for k, v in tensors.items()}, {}
  return _read_pickle(path)


def _as_float32(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def _read_pickle(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      f'Reading {path} needs PyTorch: install it with `pip install -e .[torch]`, or convert the '
      'file to .safetensors on a machine that has torch (safetensors needs no torch).'
    ) from e
  try:
    # weights_only: the unpickler accepts tensors and plain containers only, never code.
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises pickle, runtime and zip errors for bad files
    raise ValueError(
      f'{path} could not be read by torch.load(weights_only=True): the file is '
      f'corrupted, or pickles objects other than tensors. Cause: {e}'
    ) from e
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path}: expected a state dict (names -> tensors), got {type(obj).__name__}.')
  extras: dict[str, Any] = {}
  for wrapper in ('model', 'state_dict'):
    if isinstance(obj.get(wrapper), Mapping):
      extras = {k: v for k, v in obj.items() if k != wrapper}
      obj = obj[wrapper]
      break
  tensors, not_tensors = {}, []
  for key, value in obj.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      tensors[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
    else:
      not_tensors.append(key)
  if not_tensors:
    raise ValueError(f'{path}: state dict entries that are not tensors: {_listing(not_tensors)}')
  return tensors, extras


# ----------------------------------------------------------------------------------------------
# Key mapping: every source key is canonicalised to timm's names, or dropped for a stated reason.


@dataclasses.dataclass
class SplitCheckpoint:
  encoder: dict[str, np.ndarray]  # canonical timm keys ('body.layer1.0.conv1.conv.weight')
  head: dict[str, np.ndarray]  # KMCL head keys ('downsampler.weight', 'kmm.pi.bias', ...)
  dropped: dict[str, int]  # reason -> count
  classifier_classes: int | None  # classes of a dropped ImageNet `head.fc`


def _miil_to_timm(key: str) -> str:
  """MIIL names (nn.Sequential indices) -> timm names. A blurred conv is ((conv, abn), blur)."""
  key = re.sub(r'\.(conv\d)\.0\.0\.', r'.\1.conv.', key)
  key = re.sub(r'\.(conv\d)\.0\.1\.', r'.\1.bn.', key)
  key = re.sub(r'\.(conv\d)\.0\.', r'.\1.conv.', key)
  key = re.sub(r'\.(conv\d)\.1\.', r'.\1.bn.', key)
  key = re.sub(r'\.downsample\.\d+\.0\.', '.downsample.conv.', key)
  return re.sub(r'\.downsample\.\d+\.1\.', '.downsample.bn.', key)


def split_checkpoint(tensors: Mapping[str, np.ndarray], source: str, path: str) -> SplitCheckpoint:
  """Canonicalises keys of a `source` checkpoint; see the module docstring for the formats."""
  if source not in SOURCES:
    raise ValueError(f'Unknown source {source!r}; valid sources: {SOURCES}.')
  keys = list(tensors)
  if keys and all(k.startswith('module.') for k in keys):  # saved from DistributedDataParallel
    tensors = {k[len('module.') :]: v for k, v in tensors.items()}
  _check_format(tensors, source, path)

  encoder, head, dropped = {}, {}, {}
  classifier_classes = None

  def drop(reason: str):
    dropped[reason] = dropped.get(reason, 0) + 1

  for key, value in tensors.items():
    if source == 'kmcl':
      if key.startswith(('downsampler.', 'kmm.')):
        head[key] = value
        continue
      if not key.startswith('encoder.'):
        encoder[key] = value  # reported as unexpected by the encoder check
        continue
      key = key[len('encoder.') :]
    if key.endswith('num_batches_tracked'):
      drop('num_batches_tracked')
    elif key.endswith('.filt'):
      drop('blur filter')
    elif key.startswith('head.'):
      drop('ImageNet classifier head')
      if key.endswith('.weight') and value.ndim == 2:
        classifier_classes = int(value.shape[0])  # last Linear of the head: its class count
    else:
      if source != 'timm':
        key = _miil_to_timm(key)
        if key.endswith('.bn.weight'):
          value = np.abs(value) + ABN_EPS
      else:
        key = re.sub(r'\.downsample\.\d+\.(conv|bn)\.', r'.downsample.\1.', key)
      encoder[key] = value
  return SplitCheckpoint(encoder, head, dropped, classifier_classes)


def _check_format(tensors: Mapping[str, np.ndarray], source: str, path: str) -> None:
  """Stops a file read with the wrong --source (e.g. ABN conversion applied to timm BN weights)."""
  prefix = 'encoder.' if source == 'kmcl' else ''
  timm_stem, miil_stem = 'body.conv1.conv.weight', 'body.conv1.0.weight'
  if prefix + (timm_stem if source == 'timm' else miil_stem) in tensors:
    return
  found = [
    f'{fmt} ({k})'
    for fmt, k in (('timm', timm_stem), ('miil', miil_stem), ('kmcl', 'encoder.' + miil_stem))
    if k in tensors
  ]
  looks = f'it looks like a {found[0]} checkpoint' if found else 'it has no TResNet stem key'
  raise ValueError(
    f'{path} is not a {source!r} TResNet checkpoint: {looks}. '
    f'Pass the matching --source (one of {SOURCES}).'
  )


# ----------------------------------------------------------------------------------------------
# Writing arrays into modules, failing on any mismatch.


def _listing(items: Sequence[Any]) -> str:
  items = list(items)
  shown = ', '.join(str(i) for i in items[:_MAX_LISTED])
  more = f', ... ({len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else ''
  return f'[{shown}{more}]'


def _mismatch_message(what: str, missing, unexpected, shapes) -> str:
  lines = [f'{what}: the checkpoint does not match the model.']
  if missing:
    lines.append(f'  missing keys ({len(missing)}): {_listing(sorted(missing))}')
  if unexpected:
    lines.append(f'  unexpected keys ({len(unexpected)}): {_listing(sorted(unexpected))}')
  if shapes:
    lines.append(f'  shape mismatches ({len(shapes)}): {_listing(shapes)}')
  return '\n'.join(lines)


def _set_flat(module: nnx.Module, values: Mapping[tuple, np.ndarray]) -> None:
  """Writes {state path: array} into `module` (every variable must be present), in place."""
  state = nnx.state(module)
  pure = nnx.to_pure_dict(state)
  for path, variable in nnx.to_flat_state(state):
    node = pure
    for part in path[:-1]:
      node = node[part]
    old = variable.get_value()  # a jax.Array, or a ShapeDtypeStruct of an nnx.eval_shape module
    new = np.asarray(values[path], dtype=old.dtype)
    # Keep the placement of an initialised model (e.g. replicated by the trainer).
    node[path[-1]] = (
      jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else jnp.asarray(new)
    )
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(module, state)


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax kernel shape -> the PyTorch shape it comes from (for error messages)."""
  if len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))


def _from_torch(x: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax: conv OIHW -> HWIO; Conv1d (O, I, 1) and Linear (O, I) -> (I, O)."""
  if x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  if x.ndim == 3 and x.shape[2] == 1:
    return x[:, :, 0].T
  return x.T if x.ndim == 2 else x  # any other shape is reported as a mismatch


def assign_torch(
  module: nnx.Module,
  tensors: Mapping[str, np.ndarray],
  torch_key: Callable[[tuple], str],
  what: str,
) -> int:
  """Writes PyTorch-layout `tensors` (keyed like `torch_key(flax path)`) into `module`.

  Raises CheckpointMismatchError listing missing keys, unexpected keys and shape mismatches (key,
  file shape, model shape, both in PyTorch layout). Returns the number of tensors written.
  """
  expected = {
    torch_key(path): (path, var.get_value().shape)
    for path, var in nnx.to_flat_state(nnx.state(module))
  }
  missing = [k for k in expected if k not in tensors]
  unexpected = [k for k in tensors if k not in expected]
  shapes, values = [], {}
  for key, (path, shape) in expected.items():
    if key not in tensors:
      continue
    value = np.asarray(tensors[key])
    converted = _from_torch(value)
    if converted.shape != shape:
      shapes.append(f'{key}: file {tuple(value.shape)} vs model {_torch_layout(shape)}')
      continue
    values[path] = converted
  if missing or unexpected or shapes:
    raise CheckpointMismatchError(_mismatch_message(what, missing, unexpected, shapes))
  _set_flat(module, values)
  return len(values)


def _encoder_torch_key(path: tuple) -> str:
  return 'body.' + '.'.join(str(p) for p in path[:-1]) + '.' + _TORCH_LEAF[path[-1]]


def _kmm_torch_key(path: tuple) -> str:
  return f'{_KMM_TORCH[path[0]]}.{_TORCH_LEAF[path[-1]]}'


# ----------------------------------------------------------------------------------------------
# Public API.


def encoder_from_torch(path: str | os.PathLike, name: str, *, source: str, **overrides) -> TResNet:
  """Returns `create_encoder(name, **overrides)` holding the weights of a PyTorch checkpoint."""
  encoder, _, _ = _import(os.fspath(path), name, source=source, kind=None, **overrides)
  return encoder


def kmm_from_torch(
  head: Mapping[str, np.ndarray], in_features: int, *, kind: str | None, what: str
) -> tuple[KernelMixtureModule, dict[str, Any]]:
  """Builds the KMM head of an authors' checkpoint; infers classes, kind and the anisotropic case.

  The kind is read from the variance layer's width (K or K*D: Bhattacharyya; M or D: Mahalanobis;
  1: Gaussian); pass `kind` when that is ambiguous (K = 1 or K = M).
  """
  if 'kmm.pi.weight' not in head:
    raise CheckpointMismatchError(f'{what}: no KMM head (kmm.pi.weight) in a kmcl checkpoint.')
  num_classes = int(head['kmm.pi.weight'].shape[0])
  anisotropic = 'downsampler.weight' in head
  reduced_dim = int(head['downsampler.weight'].shape[0]) if anisotropic else 128
  width = reduced_dim if anisotropic else in_features
  asl_only = 'kmm.mean.weight' not in head and 'kmm.var.weight' not in head
  if asl_only:
    kind = kind or 'bhattacharyya'  # irrelevant without mu/var layers
  else:
    if 'kmm.var.weight' not in head:
      raise CheckpointMismatchError(f'{what}: kmm.mean.weight present but kmm.var.weight missing.')
    out = head['kmm.var.weight'].shape[0]
    per_dim = width if anisotropic else 1
    fits = [
      k
      for k, n in (
        ('bhattacharyya', num_classes * per_dim),
        ('mahalanobis', width),
        ('gaussian', 1),
      )
      if n == out
    ]
    if kind is not None and kind not in fits:
      raise CheckpointMismatchError(
        f'{what}: kmm.var.weight has {out} outputs, which does not fit kind {kind!r} '
        f'(fits: {fits or "none"}).'
      )
    if kind is None:
      if len(fits) != 1:
        raise CheckpointMismatchError(
          f'{what}: cannot tell the KMM kind from kmm.var.weight with {out} outputs '
          f'(fits: {fits or "none"}); pass --kind.'
        )
      kind = fits[0]
  kmm = nnx.eval_shape(
    lambda: KernelMixtureModule(
      in_features,
      num_classes,
      kind=kind,
      anisotropic=anisotropic,
      reduced_dim=reduced_dim,
      asl_only=asl_only,
      rngs=nnx.Rngs(0),
    )
  )
  assign_torch(kmm, head, _kmm_torch_key, f'{what} (KMM head)')
  settings = dict(
    num_classes=num_classes,
    kind=kind,
    anisotropic=anisotropic,
    reduced_dim=reduced_dim if anisotropic else None,
    asl_only=asl_only,
  )
  return kmm, settings


def _import(path: str, name: str, *, source: str, kind: str | None, **overrides):
  tensors, extras = read_torch_file(path)
  split = split_checkpoint(tensors, source, path)
  # Abstract construction: every variable is overwritten, so skip the (slow, eager) random init.
  encoder = nnx.eval_shape(lambda: create_encoder(name, rngs=nnx.Rngs(0), **overrides))
  n_encoder = assign_torch(
    encoder, split.encoder, _encoder_torch_key, f'{path} ({source}) into {name}'
  )
  kmm, kmm_settings = None, None
  if source == 'kmcl':
    kmm, kmm_settings = kmm_from_torch(
      split.head, encoder.num_features, kind=kind, what=f'{path} ({source})'
    )
  class_names = None
  if isinstance(extras.get('idx_to_class'), Mapping):
    idx = extras['idx_to_class']
    class_names = [str(idx[i]) for i in sorted(idx)]
  info = dict(
    tensors_in_file=len(tensors),
    encoder_tensors=n_encoder,
    head_tensors=len(split.head),
    dropped=split.dropped,
    classifier_classes=split.classifier_classes,
    extras_num_classes=(int(extras['num_classes']) if 'num_classes' in extras else None),
    class_names=class_names,
    kmm_head=kmm_settings,
  )
  return encoder, kmm, info


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _nested_str_dict(module: nnx.Module) -> dict:
  """Module state as nested dicts with string keys (orbax-friendly), numpy float32 leaves."""
  out: dict = {}
  for path, var in nnx.to_flat_state(nnx.state(module)):
    node = out
    for part in path[:-1]:
      node = node.setdefault(str(part), {})
    node[str(path[-1])] = np.asarray(var.get_value())
  return out


def convert(
  input_path: str | os.PathLike,
  output_dir: str | os.PathLike,
  name: str,
  *,
  source: str,
  kind: str | None = None,
  overwrite: bool = False,
  **overrides,
) -> dict[str, Any]:
  """Converts a PyTorch checkpoint to `output_dir/{state/, kmcl_convert.json}`; returns sidecar."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  input_path, output_dir = os.path.abspath(input_path), os.path.abspath(output_dir)
  if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
    raise FileExistsError(f'Output directory {output_dir} is not empty; pass --overwrite.')
  encoder, kmm, info = _import(input_path, name, source=source, kind=kind, **overrides)
  state = {'encoder': _nested_str_dict(encoder)}
  if kmm is not None:
    state['kmm'] = _nested_str_dict(kmm)
  os.makedirs(output_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(output_dir, STATE_DIR), state, force=True)
  classes = (
    info['kmm_head']['num_classes']
    if info['kmm_head']
    else (info['classifier_classes'] or info['extras_num_classes'])
  )
  meta = dict(
    format='kmcl_jax.convert/1',
    source_file=input_path,
    source_sha256=_sha256(input_path),
    source_format=source,
    variant=name,
    encoder_overrides={k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
    num_features=encoder.num_features,
    keys=dict(
      in_file=info['tensors_in_file'],
      encoder=info['encoder_tensors'],
      kmm_head=info['head_tensors'],
      dropped=info['dropped'],
    ),
    num_classes=classes,
    class_names=info['class_names'],
    kmm_head=info['kmm_head'],
    input_note=INPUT_NOTE,
  )
  with open(os.path.join(output_dir, SIDECAR), 'w') as f:
    json.dump(meta, f, indent=2)
  return meta


def _flat_tree(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat_tree(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _load_tree(module: nnx.Module, tree: Mapping, what: str) -> None:
  """Writes a restored nested-dict state into `module`, failing on any key or shape mismatch."""
  saved = _flat_tree(tree)
  expected = {
    tuple(str(p) for p in path): (path, var.get_value().shape)
    for path, var in nnx.to_flat_state(nnx.state(module))
  }
  dotted = '.'.join
  missing = [dotted(k) for k in expected if k not in saved]
  unexpected = [dotted(k) for k in saved if k not in expected]
  shapes = [
    f'{dotted(k)}: checkpoint {tuple(np.shape(saved[k]))} vs model {shape}'
    for k, (_, shape) in expected.items()
    if k in saved and np.shape(saved[k]) != shape
  ]
  if missing or unexpected or shapes:
    raise CheckpointMismatchError(_mismatch_message(what, missing, unexpected, shapes))
  _set_flat(module, {path: saved[k] for k, (path, _) in expected.items()})


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
  sidecar = os.path.join(os.fspath(path), SIDECAR)
  if not os.path.isfile(sidecar):
    raise FileNotFoundError(
      f'{sidecar} not found: {path} is not a directory written by `python -m kmcl_jax.convert`.'
    )
  with open(sidecar) as f:
    return json.load(f)


def load_pretrained(model: KMCLModel, path: str | os.PathLike, *, load_head: bool) -> dict:
  """Loads a converted checkpoint (`config.init_from`) into `model` in place; returns its sidecar.

  The encoder is always loaded; the KMM head only when `load_head` (then the file must hold one
  with the same classes / kind / anisotropic layout), otherwise a head in the file is ignored.
  Raises CheckpointMismatchError naming keys and shapes on any mismatch.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.fspath(path))
  meta = read_sidecar(path)
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(path, STATE_DIR))
  tree = jax.tree.map(np.asarray, tree)
  _load_tree(
    model.encoder,
    tree['encoder'],
    f'{path} (encoder {meta.get("variant")}) into {model.encoder_name}',
  )
  if load_head:
    if 'kmm' not in tree:
      raise CheckpointMismatchError(
        f'{path} has no KMM head (converted from a {meta.get("source_format")} file); '
        'load it with load_head=False.'
      )
    _load_tree(model.kmm, tree['kmm'], f'{path} (KMM head {meta.get("kmm_head")}) into the model')
  return meta


# ----------------------------------------------------------------------------------------------
# Command line.


def _parse_layers(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(','))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
    prog='python -m kmcl_jax.convert',
    description='Convert a PyTorch TResNet / KMCL checkpoint to a kmcl_jax orbax checkpoint.',
  )
  parser.add_argument('--input', required=True, help='.safetensors, .pth, .pt or .bin file')
  parser.add_argument('--output', required=True, help='output directory')
  parser.add_argument('--model', required=True, help="encoder name, e.g. 'tresnet_m'")
  parser.add_argument('--source', required=True, choices=SOURCES, help='checkpoint format')
  parser.add_argument(
    '--kind',
    default=None,
    choices=KINDS,
    help='KMM kind of a kmcl checkpoint when it cannot be inferred',
  )
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
  parser.add_argument(
    '--layers',
    type=_parse_layers,
    default=None,
    help='override blocks per stage, e.g. 1,1,1,1 (small test models)',
  )
  parser.add_argument(
    '--width-factor', type=float, default=None, help='override the width factor (small test models)'
  )
  args = parser.parse_args(argv)
  overrides = {
    k: v for k, v in (('layers', args.layers), ('width_factor', args.width_factor)) if v is not None
  }
  meta = convert(
    args.input,
    args.output,
    args.model,
    source=args.source,
    kind=args.kind,
    overwrite=args.overwrite,
    **overrides,
  )
  print(
    f'Wrote {args.output}: {meta["variant"]} from {meta["source_format"]} file '
    f'{meta["source_file"]}; keys {meta["keys"]}; KMM head: {meta["kmm_head"]}'
  )
  return meta


def run() -> None:
  """The `kmcl-convert` command: `main` with a one-line error message instead of a traceback."""
  try:
    main()
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  run()
