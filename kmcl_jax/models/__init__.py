"""Models: the TResNet encoders, the Kernel Mixture Module and the full KMCL model.

Encoders are chosen by name through the explicit `ENCODERS` dict (no string imports), so a typo
fails with the list of valid names and every variant can be found by reading this file.
"""

import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from kmcl_jax.models.kmm import KernelMixtureModule
from kmcl_jax.models.tresnet import TResNet

# model.dtype names -> computation dtypes (parameters and BatchNorm statistics stay float32).
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# TResNet constructor arguments of the published variants (timm `tresnet_m`, ... `tresnet_v2_l`).
ENCODERS: dict[str, dict] = {
  'tresnet_m': dict(layers=(3, 4, 11, 3), width_factor=1.0),
  'tresnet_l': dict(layers=(4, 5, 18, 3), width_factor=1.2),
  'tresnet_xl': dict(layers=(4, 5, 24, 3), width_factor=1.3),
  'tresnet_v2_l': dict(layers=(3, 4, 23, 3), width_factor=1.0, v2=True),
}


def create_encoder(
  name: str, *, rngs: nnx.Rngs, dtype: DTypeLike = jnp.float32, **overrides
) -> TResNet:
  """Builds encoder `name`; `overrides` replace TResNet arguments (e.g. layers, width_factor)."""
  if name not in ENCODERS:
    raise ValueError(f'Unknown encoder {name!r}; valid names: {sorted(ENCODERS)}.')
  return TResNet(**{**ENCODERS[name], **overrides}, dtype=dtype, rngs=rngs)


# KMCLModel builds its encoder through create_encoder, so it is imported after it is defined.
from kmcl_jax.models.kmcl import KMCLModel  # noqa: E402

__all__ = [
  'COMPUTE_DTYPES',
  'ENCODERS',
  'KMCLModel',
  'KernelMixtureModule',
  'TResNet',
  'create_encoder',
]
