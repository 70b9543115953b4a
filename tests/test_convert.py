"""Weight import: timm / MIIL / KMCL files on disk -> CLI -> orbax -> model, checked against torch.

Small random TResNets keep this fast; the key mapping of the full-size variants is covered by the
parity tests in test_tresnet.py, which import through the same code.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm_reference
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import save_file

from kmcl_jax import convert
from kmcl_jax.models import KMCLModel

TINY = dict(layers=[1, 2, 1, 1], width_factor=0.25)  # F = 16 * 8 * 4 = 512
TINY_ARGS = ['--layers', '1,2,1,1', '--width-factor', '0.25']
RTOL = 1e-4


@pytest.fixture(scope='module')
def reference():
  return timm_reference.timm_tresnet(None, seed=10, **TINY)


@pytest.fixture(scope='module')
def timm_state(reference):
  return timm_reference.state_dict_numpy(reference)


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(10).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)


def _to_miil(model: torch.nn.Module, state: dict, seed: int = 0) -> dict:
  """timm keys -> MIIL keys (nn.Sequential indices; blurred convs nest (conv, abn), blur), with
  BN weights stored as signed InPlace-ABN weights w, |w| + 1e-5 = gamma."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, value in state.items():
    parts = key.split('.')
    if 'downsample' in parts:
      i = parts.index('downsample')
      parts[i + 2] = {'conv': '0', 'bn': '1'}[parts[i + 2]]
    elif len(parts) > 2 and parts[-2] in ('conv', 'bn') and parts[-3].startswith('conv'):
      owner = model.get_submodule('.'.join(parts[:-2]))
      index = {'conv': '0', 'bn': '1'}[parts[-2]]
      parts[-2:-1] = ['0', index] if owner.aa is not None else [index]
    if parts[-1] == 'weight' and key.endswith('bn.weight'):
      value = (value - 1e-5) * rng.choice([-1.0, 1.0], size=value.shape).astype(np.float32)
    out['.'.join(parts)] = value
  return out


def _save_pth(path, obj):
  torch.save(jax.tree.map(lambda x: torch.from_numpy(np.array(x)), obj), path)


def _kmcl_model(**kwargs):
  return KMCLModel('tresnet_m', kwargs.pop('num_classes', 5), rngs=nnx.Rngs(0), **TINY, **kwargs)


def _forward(model, images):
  model.eval()
  return jax.tree.map(np.asarray, nnx.jit(lambda m, x: m(x))(model, images))


def _assert_close(got, expected):
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() <= RTOL * np.abs(expected).max()


def test_miil_fixture_agrees_with_timms_own_filter(reference, timm_state):
  # timm's checkpoint_filter_fn is an independent implementation of MIIL -> timm.
  timm = timm_reference.import_timm()
  filtered = timm.models.tresnet.checkpoint_filter_fn(
    {k: torch.from_numpy(v) for k, v in _to_miil(reference, timm_state).items()}, None
  )
  assert sorted(filtered) == sorted(timm_state)
  for key, value in filtered.items():
    np.testing.assert_allclose(value.numpy(), timm_state[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('fmt', ['safetensors', 'pth'])
def test_timm_round_trip_through_cli(tmp_path, reference, timm_state, images, fmt):
  src = tmp_path / f'model.{fmt}'
  if fmt == 'safetensors':
    save_file(timm_state, str(src))
  else:
    _save_pth(src, timm_state)
  out = tmp_path / 'converted'
  meta = convert.main(
    [
      '--input',
      str(src),
      '--output',
      str(out),
      '--model',
      'tresnet_m',
      '--source',
      'timm',
      *TINY_ARGS,
    ]
  )
  sidecar = json.loads((out / convert.SIDECAR).read_text())
  assert sidecar == json.loads(json.dumps(meta))
  assert sidecar['source_format'] == 'timm' and sidecar['variant'] == 'tresnet_m'
  assert sidecar['num_classes'] == 1000 and sidecar['kmm_head'] is None
  n_bn = sum(k.endswith('num_batches_tracked') for k in timm_state)
  assert sidecar['keys']['dropped'] == {'num_batches_tracked': n_bn, 'ImageNet classifier head': 2}
  assert sidecar['keys']['encoder'] == len(timm_state) - n_bn - 2

  model = _kmcl_model()
  convert.load_pretrained(model, out, load_head=False)
  expected = timm_reference.pooled_features(reference, images, train=False)
  _assert_close(_forward(model.encoder, images), expected)


@pytest.mark.parametrize('wrapper', ['model', 'state_dict'])
def test_miil_round_trip(tmp_path, reference, timm_state, images, wrapper):
  miil = _to_miil(reference, timm_state, seed=1)
  miil['body.layer2.0.conv1.1.op.filt'] = np.full((32, 1, 3, 3), 1 / 16, np.float32)  # saved blur
  src = tmp_path / 'miil.pth'
  obj = {wrapper: miil}
  if wrapper == 'model':  # ASL-style wrapper with classes
    obj.update(num_classes=1000, idx_to_class={i: f'class{i}' for i in range(1000)})
  torch.save(
    {k: (jax.tree.map(torch.from_numpy, v) if k == wrapper else v) for k, v in obj.items()}, src
  )
  encoder = convert.encoder_from_torch(src, 'tresnet_m', source='miil', **TINY)
  expected = timm_reference.pooled_features(reference, images, train=False)
  _assert_close(_forward(encoder, images), expected)
  meta = convert.convert(src, tmp_path / 'out', 'tresnet_m', source='miil', **TINY)
  assert meta['keys']['dropped']['blur filter'] == 1
  if wrapper == 'model':
    assert meta['class_names'][:2] == ['class0', 'class1'] and len(meta['class_names']) == 1000


def _kmcl_state(reference, timm_state, *, classes, anisotropic, kind, seed):
  """An authors'-format KMCL state dict: encoder (MIIL keys, 9-class fc), downsampler, kmm."""
  rng = np.random.default_rng(seed)
  f, d = 512, 8
  width = d if anisotropic else f
  per_dim = width if anisotropic else 1
  var_out = {'bhattacharyya': classes * per_dim, 'mahalanobis': width, 'gaussian': 1}[kind]
  state = {
    'encoder.' + k: v
    for k, v in _to_miil(reference, timm_state, seed=seed).items()
    if not k.startswith('head.')
  }
  state['encoder.head.fc.weight'] = rng.normal(size=(classes, f)).astype(np.float32)
  state['encoder.head.fc.bias'] = rng.normal(size=(classes,)).astype(np.float32)
  if anisotropic:
    state['downsampler.weight'] = rng.normal(0, 0.05, (d, f, 1)).astype(np.float32)
    state['downsampler.bias'] = rng.normal(0, 0.05, (d,)).astype(np.float32)
  for name, out in (('pi', classes), ('mean', classes * per_dim), ('var', var_out)):
    state[f'kmm.{name}.weight'] = rng.normal(0, 0.05, (out, width)).astype(np.float32)
    state[f'kmm.{name}.bias'] = rng.normal(0, 0.05, (out,)).astype(np.float32)
  return state


def _kmcl_torch_reference(state, pooled, *, classes, anisotropic, kind):
  """The authors' forward (Kmcl_Class.py) on timm's pooled features, written with torch ops."""
  t = {k: torch.from_numpy(v) for k, v in state.items()}
  feat = torch.from_numpy(pooled)
  if anisotropic:
    feat = F.conv1d(feat[:, :, None], t['downsampler.weight'], t['downsampler.bias'])[:, :, 0]
  pi = F.linear(feat, t['kmm.pi.weight'], t['kmm.pi.bias'])
  mu = F.linear(feat, t['kmm.mean.weight'], t['kmm.mean.bias'])
  var = 1e-7 + 2 + F.elu(F.linear(feat, t['kmm.var.weight'], t['kmm.var.bias']))
  n = feat.shape[0]
  if anisotropic:  # the loss reads [N, D, K]; kmcl_jax keeps [N, K, D]
    mu = mu.reshape(n, -1, classes).transpose(1, 2)
    if kind == 'bhattacharyya':
      var = var.reshape(n, -1, classes).transpose(1, 2)
    else:
      var = var[:, None, :]
  elif kind == 'mahalanobis':
    var = var[:, None, :]
  return {'features': feat.numpy(), 'pi_logits': pi.numpy(), 'mu': mu.numpy(), 'var': var.numpy()}


@pytest.mark.parametrize(
  'anisotropic,kind,prefix',
  [(True, 'bhattacharyya', 'module.'), (False, 'mahalanobis', ''), (True, 'gaussian', '')],
)
def test_kmcl_round_trip_with_head(
  tmp_path, reference, timm_state, images, anisotropic, kind, prefix
):
  classes = 9
  state = _kmcl_state(
    reference, timm_state, classes=classes, anisotropic=anisotropic, kind=kind, seed=2
  )
  src = tmp_path / 'kmcl.pth'
  _save_pth(src, {prefix + k: v for k, v in state.items()})
  out = tmp_path / 'converted'
  convert.main(
    [
      '--input',
      str(src),
      '--output',
      str(out),
      '--model',
      'tresnet_m',
      '--source',
      'kmcl',
      *TINY_ARGS,
    ]
  )
  model = _kmcl_model(num_classes=classes, anisotropic=anisotropic, kind=kind, reduced_dim=8)
  meta = convert.load_pretrained(model, out, load_head=True)
  assert meta['kmm_head'] == dict(
    num_classes=classes,
    kind=kind,
    anisotropic=anisotropic,
    reduced_dim=8 if anisotropic else None,
    asl_only=False,
  )
  assert meta['keys']['dropped']['ImageNet classifier head'] == 2
  pooled = timm_reference.pooled_features(reference, images, train=False)
  expected = _kmcl_torch_reference(
    state, pooled, classes=classes, anisotropic=anisotropic, kind=kind
  )
  got = _forward(model, images)
  assert sorted(got) == sorted(expected)
  for key in expected:
    _assert_close(got[key], expected[key])


def test_cli_subprocess_and_error_exit(tmp_path, timm_state):
  src = tmp_path / 'model.safetensors'
  save_file(timm_state, str(src))
  base = [
    sys.executable,
    '-m',
    'kmcl_jax.convert',
    '--input',
    str(src),
    '--model',
    'tresnet_m',
    *TINY_ARGS,
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  ok = subprocess.run(
    base + ['--output', str(tmp_path / 'a'), '--source', 'timm'],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  assert ok.returncode == 0, ok.stderr
  assert (tmp_path / 'a' / convert.SIDECAR).is_file()
  bad = subprocess.run(
    base + ['--output', str(tmp_path / 'b'), '--source', 'miil'],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  assert bad.returncode == 1
  assert "not a 'miil' TResNet checkpoint: it looks like a timm" in bad.stderr


# ------------------------------------------------------------------------------ failures


def _encoder(path, source='timm'):
  return convert.encoder_from_torch(path, 'tresnet_m', source=source, **TINY)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.safetensors'):
    _encoder(tmp_path / 'nope.safetensors')


def test_corrupted_files(tmp_path):
  garbage = np.random.default_rng(0).bytes(4096)
  for name, match in (
    ('bad.safetensors', 'not a readable safetensors file'),
    ('bad.pth', r'torch.load\(weights_only=True\)'),
  ):
    (tmp_path / name).write_bytes(garbage)
    with pytest.raises(ValueError, match=match) as error:
      _encoder(tmp_path / name)
    assert name in str(error.value)


class _Payload:
  """Pickling this would run code on load without weights_only."""

  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_pickled_code_is_refused(tmp_path, timm_state):
  state = {k: torch.from_numpy(v) for k, v in timm_state.items()}
  state['extra'] = _Payload()
  torch.save(state, tmp_path / 'evil.pth')
  with pytest.raises(ValueError, match='weights_only'):
    _encoder(tmp_path / 'evil.pth')


def test_missing_unexpected_and_misshapen_keys(tmp_path, timm_state):
  state = dict(timm_state)
  del state['body.layer3.0.conv2.bn.running_var']
  state['body.layer1.0.extra.weight'] = np.zeros(3, np.float32)
  state['body.layer2.1.se.fc1.weight'] = np.zeros((64, 33, 1, 1), np.float32)
  save_file(state, str(tmp_path / 'm.safetensors'))
  with pytest.raises(convert.CheckpointMismatchError) as error:
    _encoder(tmp_path / 'm.safetensors')
  message = str(error.value)
  assert 'missing keys (1): [body.layer3.0.conv2.bn.running_var]' in message
  assert 'unexpected keys (1): [body.layer1.0.extra.weight]' in message
  assert 'body.layer2.1.se.fc1.weight: file (64, 33, 1, 1) vs model (64, 32, 1, 1)' in message


def test_wrong_source_format(tmp_path, reference, timm_state):
  save_file(timm_state, str(tmp_path / 't.safetensors'))
  with pytest.raises(ValueError, match='looks like a timm'):
    _encoder(tmp_path / 't.safetensors', source='miil')
  _save_pth(tmp_path / 'm.pth', {'model': _to_miil(reference, timm_state)})
  with pytest.raises(ValueError, match="not a 'timm' TResNet checkpoint: it looks like a miil"):
    _encoder(tmp_path / 'm.pth', source='timm')


def test_pth_without_torch_gives_install_hint(tmp_path, monkeypatch):
  (tmp_path / 'x.pth').write_bytes(b'0')
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch -> ImportError
  with pytest.raises(ImportError, match=r'pip install -e \.\[torch\]'):
    convert.read_torch_file(tmp_path / 'x.pth')


def test_output_directory_not_overwritten(tmp_path, timm_state):
  save_file(timm_state, str(tmp_path / 't.safetensors'))
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('x')
  with pytest.raises(FileExistsError, match='--overwrite'):
    convert.convert(
      tmp_path / 't.safetensors', tmp_path / 'out', 'tresnet_m', source='timm', **TINY
    )


@pytest.fixture(scope='module')
def converted_kmcl(tmp_path_factory, reference, timm_state):
  tmp = tmp_path_factory.mktemp('kmcl')
  state = _kmcl_state(
    reference, timm_state, classes=9, anisotropic=False, kind='bhattacharyya', seed=3
  )
  save_file(state, str(tmp / 'kmcl.safetensors'))
  convert.convert(tmp / 'kmcl.safetensors', tmp / 'out', 'tresnet_m', source='kmcl', **TINY)
  return tmp / 'out', state


def test_load_pretrained_without_head_ignores_it(converted_kmcl, reference, images):
  path, _ = converted_kmcl
  model = _kmcl_model(num_classes=4)  # a different class count: fine when the head is not loaded
  head_before = jax.tree.map(np.array, nnx.state(model.kmm))
  meta = convert.load_pretrained(model, path, load_head=False)
  assert meta['kmm_head']['num_classes'] == 9
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model.kmm), head_before)
  expected = timm_reference.pooled_features(reference, images, train=False)
  _assert_close(_forward(model.encoder, images), expected)


def test_load_pretrained_failures(converted_kmcl, tmp_path, timm_state):
  path, _ = converted_kmcl
  with pytest.raises(
    convert.CheckpointMismatchError, match=r'pi\.kernel: checkpoint \(512, 9\) vs model \(512, 4\)'
  ):
    convert.load_pretrained(_kmcl_model(num_classes=4), path, load_head=True)
  with pytest.raises(
    convert.CheckpointMismatchError, match=r'unexpected keys \(\d+\): \[layer2\.1'
  ):
    convert.load_pretrained(
      KMCLModel('tresnet_m', 9, rngs=nnx.Rngs(0), layers=(1, 1, 1, 1), width_factor=0.25),
      path,
      load_head=False,
    )
  with pytest.raises(convert.CheckpointMismatchError, match='shape mismatches'):
    convert.load_pretrained(
      KMCLModel('tresnet_m', 9, rngs=nnx.Rngs(0), layers=(1, 2, 1, 1), width_factor=0.5),
      path,
      load_head=False,
    )
  save_file(timm_state, str(tmp_path / 't.safetensors'))
  convert.convert(tmp_path / 't.safetensors', tmp_path / 'timm', 'tresnet_m', source='timm', **TINY)
  with pytest.raises(convert.CheckpointMismatchError, match='has no KMM head'):
    convert.load_pretrained(_kmcl_model(num_classes=9), tmp_path / 'timm', load_head=True)
  with pytest.raises(FileNotFoundError, match=convert.SIDECAR):
    convert.load_pretrained(_kmcl_model(), tmp_path, load_head=False)
