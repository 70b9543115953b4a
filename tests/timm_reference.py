"""Test-only access to timm's TResNet, the PyTorch reference for the parity and import tests.

Why the `_define_missing_torchvision_ops` workaround exists: timm imports torchvision at
`import timm` (FrozenBatchNorm2d, transforms, datasets). The only torchvision wheels pip can find
for torch 2.13 (`torchvision==0.28.0` on PyPI) are built against CUDA torch; with the CPU build
`torch==2.13.0+cpu` their compiled extension `_C.so` cannot load (it links libtorch_cuda).
torchvision tolerates that for most operators, but its `_meta_registrations.py` registers fake
kernels for `torchvision::nms` and `torchvision::qnms` unconditionally, which raises
`RuntimeError: operator torchvision::nms does not exist` and aborts `import torchvision`.
The CPU wheels on download.pytorch.org would avoid this but are not reachable from CI.

So, only when the extension cannot load, we declare the schemas of those two operators (copied
from torchvision's C++ registration) before importing it; the fake-kernel registration then
succeeds. Calling nms/qnms would still fail (no kernel), but timm's TResNet uses no compiled
torchvision operator: it needs only torchvision's pure-Python modules. Nothing in `kmcl_jax`
imports torch, torchvision or timm; this file is loaded by the tests only.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import torch

_TORCHVISION_SCHEMAS = (
  'nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
  'qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
)
_fragment = None  # keeps the schema library alive for the whole test session


def _define_missing_torchvision_ops() -> None:
  global _fragment
  spec = importlib.util.find_spec('torchvision')
  if spec is None or _fragment is not None or hasattr(torch.ops.torchvision, 'nms'):
    return
  try:
    torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), '_C.so'))
    return  # a matching CPU build: nothing to work around
  except OSError:
    pass
  _fragment = torch.library.Library('torchvision', 'FRAGMENT')
  for schema in _TORCHVISION_SCHEMAS:
    _fragment.define(schema)


def import_timm():
  _define_missing_torchvision_ops()
  import timm  # pylint: disable=g-import-not-at-top

  return timm


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Random BatchNorm affine parameters and SE biases (timm zero-inits some gammas, which would
  hide layout errors), then running statistics measured on a random calibration batch.

  Calibrated statistics keep activations O(1) in inference mode, as in a trained network; random
  ones let them grow to ~1e3 in TResNet-L, where float32 cancellation (not the port) dominates.
  """
  gen = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
      elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
        module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    for norm in norms:
      norm.reset_running_stats()
      norm.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    model(torch.rand(4, 3, 64, 64, generator=gen))
    for norm in norms:
      norm.momentum = 0.1
  return model.eval()


def timm_tresnet(name: str | None = None, *, seed: int = 0, **kwargs) -> torch.nn.Module:
  """A timm TResNet with random weights: a registered `name`, or TResNet(**kwargs)."""
  timm = import_timm()
  torch.manual_seed(seed)
  if name is not None:
    model = timm.create_model(name, pretrained=False, **kwargs)
  else:
    model = timm.models.tresnet.TResNet(**kwargs)
  return randomize_(model, seed).eval()


def pooled_features(model: torch.nn.Module, images_nhwc: np.ndarray, *, train: bool) -> np.ndarray:
  """timm's pooled pre-logits features for NHWC images (float32 numpy).

  Training mode runs on a copy, so the batch-statistics update does not touch `model`.
  """
  model = copy.deepcopy(model) if train else model
  model.train(train)
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = model.forward_head(model.forward_features(x), pre_logits=True)
  return out.numpy()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
