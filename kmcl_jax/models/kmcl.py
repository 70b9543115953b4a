"""The full KMCL model: a TResNet encoder followed by the Kernel Mixture Module head.

The KMM holds the anisotropic case's learned M -> D reduction (`kmm.reduce`, the authors' 1x1
Conv1d `downsampler`) and the 'ASL only' baseline (pi layer only), so this module only wires the
two together. Images are expected already normalised: normalisation is a per-dataset choice made
in the input pipeline / train step (docs/datasets.md), not a model property.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from kmcl_jax.models import create_encoder
from kmcl_jax.models.kmm import KernelMixtureModule


class KMCLModel(nnx.Module):
  """Encoder + KMM: images [N, H, W, 3] -> the KMM output dict.

  Output keys: 'features' [N, F] (or [N, D] after the anisotropic reduction), 'pi_logits' [N, K],
  and 'mu', 'var' (shapes in `kmcl_jax.models.kmm`) unless `asl_only`.

  Args:
    encoder_name: a key of `kmcl_jax.models.ENCODERS`, e.g. 'tresnet_m'.
    num_classes: K.
    kind, anisotropic, reduced_dim, asl_only: KMM settings (see KernelMixtureModule).
    dtype: computation dtype of encoder and head; parameters stay float32.
    rngs: initialisation RNG.
    **encoder_overrides: TResNet argument overrides (layers, width_factor) for small models.
  """

  def __init__(
    self,
    encoder_name: str,
    num_classes: int,
    *,
    kind: str = 'bhattacharyya',
    anisotropic: bool = False,
    reduced_dim: int = 128,
    asl_only: bool = False,
    dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
    **encoder_overrides,
  ):
    self.encoder_name = encoder_name
    self.encoder = create_encoder(encoder_name, rngs=rngs, dtype=dtype, **encoder_overrides)
    self.kmm = KernelMixtureModule(
      self.encoder.num_features,
      num_classes,
      kind=kind,
      anisotropic=anisotropic,
      reduced_dim=reduced_dim,
      asl_only=asl_only,
      dtype=dtype,
      rngs=rngs,
    )

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    return self.kmm(self.encoder(images))
