"""Kernel Mixture Module (KMM): per-class mixture weight, kernel mean and variance.

docs/method.md (paper Eq. 4, 16, 17). Three dense layers on the feature f:

  pi_logits = a_pi(f)                 [N, K]    pi = sigmoid(pi_logits) is the classifier
  mu        = a_mu(f)                 see below
  var       = ELU(a_var(f)) + 2 + 1e-7  (so var >= 1 + 1e-7)

Output shapes per case, as consumed by `kmcl_jax.losses` (M = feature width the kernels live in,
i.e. the encoder width, or D after the learned reduction in the anisotropic case):

| kind          | anisotropic=False       | anisotropic=True            |
|---------------|-------------------------|-----------------------------|
| bhattacharyya | mu [N,K], var [N,K]     | mu [N,K,D], var [N,K,D]     |
| mahalanobis   | mu [N,K], var [N,1,M]   | mu [N,K,D], var [N,1,D]     |
| gaussian      | mu [N,K], var [N,1]     | mu [N,K,D], var [N,1,1]     |

Mahalanobis shares one variance per feature dimension across classes; Gaussian (RBF) shares a
single variance across classes and dimensions (paper Corollary 1).

Anisotropic case: f is first reduced M -> D by a learned linear layer (the authors' 1x1 Conv1d
`downsampler`), and the kernels live in that D-dimensional space. The returned `features` are the
ones the reconstruction loss compares with the kernels (reduced or not). The mu/var layers of
width K*D are laid out dimension-major (output index d*K + k) like the authors' reshape to
[N, D, K], so their checkpoints import without permuting rows.

Initialisation (paper Table 6): pi and mu weights ~ U(0, 0.1), var weights = 1, biases 0; the
reduction layer keeps torch's Conv1d default (U(+-1/sqrt(fan_in)) for weight and bias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from kmcl_jax.models import initializers

KINDS = ('bhattacharyya', 'mahalanobis', 'gaussian')
VAR_OFFSET = 2.0 + 1e-7  # var = ELU(a) + 2 + eps >= 1 + eps


class KernelMixtureModule(nnx.Module):
  """Maps pooled features [N, M] to the KMM head dict (see module docstring).

  Args:
    in_features: M, the encoder's pooled width.
    num_classes: K.
    kind: 'bhattacharyya' (default), 'mahalanobis' or 'gaussian'; decides the variance shape.
    anisotropic: per-dimension kernels in a learned D-dimensional space.
    reduced_dim: D for the anisotropic case (paper: 128).
    asl_only: build only the pi layer (the 'ASL only' baseline of Tables 1-3).
    dtype: computation dtype of the dense layers; outputs are always float32.
  """

  def __init__(
    self,
    in_features: int,
    num_classes: int,
    *,
    kind: str = 'bhattacharyya',
    anisotropic: bool = False,
    reduced_dim: int = 128,
    asl_only: bool = False,
    dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if kind not in KINDS:
      raise ValueError(f'KMM kind must be one of {KINDS}, got {kind!r}.')
    if in_features < 1 or num_classes < 1 or reduced_dim < 1:
      raise ValueError(
        'KMM in_features, num_classes and reduced_dim must be positive, got '
        f'{in_features}, {num_classes}, {reduced_dim}.'
      )
    self.num_classes = num_classes
    self.kind = kind
    self.anisotropic = anisotropic
    self.asl_only = asl_only
    dense = dict(dtype=dtype, bias_init=nnx.initializers.zeros, rngs=rngs)

    if anisotropic and not asl_only:
      torch_default = initializers.torch_default_uniform(in_features)
      self.reduce = nnx.Linear(
        in_features,
        reduced_dim,
        dtype=dtype,
        kernel_init=torch_default,
        bias_init=torch_default,
        rngs=rngs,
      )
      width = reduced_dim
    else:
      self.reduce = None
      width = in_features
    self.kernel_dim = width

    table6 = initializers.uniform(0.0, 0.1)
    self.pi = nnx.Linear(width, num_classes, kernel_init=table6, **dense)
    if asl_only:
      self.mu = self.var = None
      return
    per_dim = width if anisotropic else 1
    self.mu = nnx.Linear(width, num_classes * per_dim, kernel_init=table6, **dense)
    var_out = {'bhattacharyya': num_classes * per_dim, 'mahalanobis': width, 'gaussian': 1}[kind]
    self.var = nnx.Linear(width, var_out, kernel_init=nnx.initializers.ones, **dense)

  def __call__(self, features: jax.Array) -> dict[str, jax.Array]:
    if self.reduce is not None:
      features = self.reduce(features)
    features = features.astype(jnp.float32)
    out = {'features': features, 'pi_logits': self.pi(features).astype(jnp.float32)}
    if self.asl_only:
      return out
    n, k = features.shape[0], self.num_classes
    mu = self.mu(features).astype(jnp.float32)
    var = jax.nn.elu(self.var(features).astype(jnp.float32)) + VAR_OFFSET
    if self.anisotropic:
      d = self.kernel_dim
      # Dimension-major layout of the authors' checkpoints: [N, D, K] -> [N, K, D].
      mu = mu.reshape(n, d, k).swapaxes(1, 2)
      var = {
        'bhattacharyya': lambda v: v.reshape(n, d, k).swapaxes(1, 2),
        'mahalanobis': lambda v: v[:, None, :],
        'gaussian': lambda v: v[:, None, :],
      }[self.kind](var)
    elif self.kind == 'mahalanobis':
      var = var[:, None, :]
    out.update(mu=mu, var=var)
    return out
