"""TResNet encoders (M, L, XL, L-V2) in Flax NNX, NHWC, numerically matching timm's `tresnet`.

The port is exact so that ImageNet weights and the authors' KMCL checkpoints (PyTorch only) can be
imported by `kmcl_jax.convert` and give the same features: parity with timm is tested to
1e-4 x max|output| in float32, in inference and training mode.

Architecture (Ridnik et al., "TResNet", 2021; timm `tresnet.py`):
  SpaceToDepth(4) -> 3x3 conv-BN-leaky(0.01) -> four stages -> global average pool.
  Stages 1-2 are BasicBlocks (L-V2: Bottlenecks), stages 3-4 Bottlenecks; SE in stages 1-3.
  Every stride-2 point is a stride-1 conv followed by a fixed [1,2,1]x[1,2,1]/16 blur with
  reflect padding and stride 2 (anti-aliasing), and its shortcut is a 2x2 ceil-mode average pool
  (padding not counted) then a 1x1 conv-BN. No convolution has stride > 1.

Module and attribute names follow timm's state-dict keys (`conv1.conv`, `layer3[0].conv2.bn`,
`layer2[0].downsample.conv`, `se.fc1`), so the converter maps keys by renaming leaves only.

Precision: `dtype` is the computation dtype (e.g. jnp.bfloat16); parameters and BatchNorm
statistics are always float32 and BatchNorm reduces in float32. The pooled feature is returned
in float32 (the KMM head and the losses work in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Layout, with_layout_constraint
from jax.typing import DTypeLike

from kmcl_jax.models import initializers

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # torch momentum 0.1
STEM_SLOPE = 1e-2  # leaky ReLU slope of the stem
BLOCK_SLOPE = 1e-3  # leaky ReLU slope inside the blocks

# Convolutions: kaiming normal over fan_out (torch `kaiming_normal_(mode='fan_out')`, gain sqrt 2).
_conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def space_to_depth(x: jax.Array, block: int = 4) -> jax.Array:
  """[N, H, W, C] -> [N, H/4, W/4, 16C], channel index (bh*4 + bw)*C + c as in timm."""
  n, h, w, c = x.shape
  if h % block or w % block:
    raise ValueError(f'TResNet input height and width must be multiples of {block}, got {h}x{w}.')
  x = x.reshape(n, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // block, w // block, block * block * c)


def blur_downsample(x: jax.Array) -> jax.Array:
  """Anti-aliased stride-2 downsampling: reflect pad 1, [1,2,1]x[1,2,1]/16 filter, stride 2.

  The filter is separable, so it is applied as two strided 1-D passes (cheaper than a depthwise
  3x3 conv; identical up to float rounding). Output size is ceil(H/2) x ceil(W/2).
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  ho, wo = (x.shape[1] - 1) // 2, (x.shape[2] - 1) // 2
  x = (x[:, 0 : 2 * ho : 2] + 2 * x[:, 1 : 2 * ho + 1 : 2] + x[:, 2 : 2 * ho + 2 : 2]) * 0.25
  return (
    x[:, :, 0 : 2 * wo : 2] + 2 * x[:, :, 1 : 2 * wo + 1 : 2] + x[:, :, 2 : 2 * wo + 2 : 2]
  ) * 0.25


def avg_pool_ceil(x: jax.Array) -> jax.Array:
  """2x2 stride-2 average pool, ceil mode, padding excluded from the count (torch semantics)."""
  n, h, w, c = x.shape
  ph, pw = h % 2, w % 2
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  ho, wo = (h + ph) // 2, (w + pw) // 2
  total = x.reshape(n, ho, 2, wo, 2, c).sum(axis=(2, 4))
  rows = np.full(ho, 2.0)
  cols = np.full(wo, 2.0)
  rows[-1] -= ph  # the last window of an odd size covers one row only
  cols[-1] -= pw
  return total / jnp.asarray(np.outer(rows, cols)[None, :, :, None], x.dtype)


def apply_conv(layer: nnx.Conv, x: jax.Array) -> jax.Array:
  """`layer(x)`, with 1x1 convolutions computed as a matmul over the channels.

  Same parameters and result; but XLA:CPU computes a 1x1 convolution's weight gradient as a
  convolution over the batch, transposing every activation gradient to [C, H, W, N] first
  (a fifth of the TResNet-M train step, BENCHMARKS.md), where a matmul contracts N, H, W
  directly. On CPU the matmul's backward also pins its operands' layouts (`_matmul_pinned`).
  """
  if layer.kernel_size != (1, 1):
    return layer(x)
  kernel = layer.kernel[...]
  x, kernel = x.astype(layer.dtype), kernel.reshape(kernel.shape[-2:]).astype(layer.dtype)
  y = _matmul_pinned(x, kernel) if pin_layouts() else jnp.matmul(x, kernel)
  return y + layer.bias[...].astype(layer.dtype) if layer.bias is not None else y


def pin_layouts() -> bool:
  """Whether `apply_conv` and the blocks pin layouts: on XLA:CPU, whose choices they correct."""
  return jax.default_backend() == 'cpu'


def _row_major(x: jax.Array) -> jax.Array:
  return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


def block_output(y: jax.Array) -> jax.Array:
  """A residual block's output, pinned row-major on CPU so that XLA computes it once.

  Left alone, XLA:CPU fuses the chain of residual adds and ReLUs of all the earlier blocks of a
  stage into every consumer of a block's output, recomputing it there: fusions of up to 60
  inputs in layer3 of TResNet-M, 19% of that stage's forward and backward. The pin is a
  materialisation point the fusion passes respect (`lax.optimization_barrier` is not: XLA:CPU
  removes it first). BENCHMARKS.md, 'Train step, CPU'.
  """
  return _row_major(y) if pin_layouts() else y


@jax.custom_vjp
def _matmul_pinned(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x @ kernel` whose backward keeps the activation and its gradient row-major.

  Left alone, XLA:CPU's layout assignment feeds the weight-gradient matmul (contracting N, H, W)
  a transposed copy of one operand, written by the fusion that produces it: the BatchNorm
  backward, or the chain of residual adds and ReLUs recomputed from several blocks back. Such a
  fusion reads all its inputs with a stride of C and ran 5-40x slower than the same fusion
  written row-major. Pinned, each operand is written once in its natural layout and the matmul
  reads it transposed itself (BENCHMARKS.md, 'Train step, CPU').
  """
  return jnp.matmul(x, kernel)


def _matmul_pinned_fwd(x, kernel):
  return jnp.matmul(x, kernel), (x, kernel)


def _matmul_pinned_bwd(residuals, dy):
  x, kernel = residuals
  x, dy = _row_major(x), _row_major(dy)
  return jnp.matmul(dy, kernel.T), jnp.einsum('...c,...d->cd', x, dy)


_matmul_pinned.defvjp(_matmul_pinned_fwd, _matmul_pinned_bwd)


class ConvNormAct(nnx.Module):
  """Conv (no bias) -> BatchNorm -> optional leaky ReLU -> optional anti-aliased stride 2."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    slope: float | None,
    blur: bool = False,
    zero_scale: bool = False,
    dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      in_channels,
      out_channels,
      (kernel_size, kernel_size),
      padding=kernel_size // 2,
      use_bias=False,
      dtype=dtype,
      kernel_init=_conv_init,
      rngs=rngs,
    )
    # Two-pass variance: E[x^2]-E[x]^2 loses digits that the 1e-4 parity budget needs.
    self.bn = nnx.BatchNorm(
      out_channels,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPS,
      dtype=dtype,
      use_fast_variance=False,
      scale_init=(nnx.initializers.zeros if zero_scale else nnx.initializers.ones),
      rngs=rngs,
    )
    self.slope = slope
    self.blur = blur

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.bn(apply_conv(self.conv, x))
    if self.slope is not None:
      x = jax.nn.leaky_relu(x, self.slope)
    return blur_downsample(x) if self.blur else x


class Shortcut(nnx.Module):
  """Projection shortcut: [2x2 ceil-mode avg pool when strided] -> 1x1 conv -> BN."""

  def __init__(
    self, in_channels: int, out_channels: int, *, pool: bool, dtype: DTypeLike, rngs: nnx.Rngs
  ):
    self.conv = nnx.Conv(
      in_channels,
      out_channels,
      (1, 1),
      use_bias=False,
      dtype=dtype,
      kernel_init=_conv_init,
      rngs=rngs,
    )
    self.bn = nnx.BatchNorm(
      out_channels,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPS,
      dtype=dtype,
      use_fast_variance=False,
      rngs=rngs,
    )
    self.pool = pool

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool:
      x = avg_pool_ceil(x)
    return self.bn(apply_conv(self.conv, x))


class SqueezeExcite(nnx.Module):
  """Spatial mean -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate (both convs with bias)."""

  def __init__(self, channels: int, hidden: int, *, dtype: DTypeLike, rngs: nnx.Rngs):
    self.fc1 = nnx.Conv(
      channels,
      hidden,
      (1, 1),
      dtype=dtype,
      kernel_init=_conv_init,
      bias_init=initializers.torch_default_uniform(channels),
      rngs=rngs,
    )
    self.fc2 = nnx.Conv(
      hidden,
      channels,
      (1, 1),
      dtype=dtype,
      kernel_init=_conv_init,
      bias_init=initializers.torch_default_uniform(hidden),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    s = x.mean(axis=(1, 2), keepdims=True)
    s = apply_conv(self.fc2, jax.nn.relu(apply_conv(self.fc1, s)))
    return x * jax.nn.sigmoid(s)


class BasicBlock(nnx.Module):
  """3x3 conv-BN-leaky [blur] -> 3x3 conv-BN -> SE -> + shortcut -> ReLU."""

  expansion = 1

  def __init__(
    self, inplanes: int, planes: int, *, stride: int, use_se: bool, dtype: DTypeLike, rngs: nnx.Rngs
  ):
    self.downsample = _shortcut(inplanes, planes * self.expansion, stride, dtype, rngs)
    self.conv1 = ConvNormAct(
      inplanes, planes, 3, slope=BLOCK_SLOPE, blur=stride == 2, dtype=dtype, rngs=rngs
    )
    self.conv2 = ConvNormAct(planes, planes, 3, slope=None, zero_scale=True, dtype=dtype, rngs=rngs)
    self.se = (
      SqueezeExcite(planes, max(planes // 4, 64), dtype=dtype, rngs=rngs) if use_se else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.conv2(self.conv1(x))
    if self.se is not None:
      out = self.se(out)
    return block_output(jax.nn.relu(out + shortcut))


class Bottleneck(nnx.Module):
  """1x1 conv-BN-leaky -> 3x3 conv-BN-leaky [blur] -> SE -> 1x1 conv-BN -> + shortcut -> ReLU."""

  expansion = 4

  def __init__(
    self, inplanes: int, planes: int, *, stride: int, use_se: bool, dtype: DTypeLike, rngs: nnx.Rngs
  ):
    width = planes * self.expansion
    self.downsample = _shortcut(inplanes, width, stride, dtype, rngs)
    self.conv1 = ConvNormAct(inplanes, planes, 1, slope=BLOCK_SLOPE, dtype=dtype, rngs=rngs)
    self.conv2 = ConvNormAct(
      planes, planes, 3, slope=BLOCK_SLOPE, blur=stride == 2, dtype=dtype, rngs=rngs
    )
    self.se = SqueezeExcite(planes, max(width // 8, 64), dtype=dtype, rngs=rngs) if use_se else None
    self.conv3 = ConvNormAct(planes, width, 1, slope=None, zero_scale=True, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.conv2(self.conv1(x))
    if self.se is not None:
      out = self.se(out)
    return block_output(jax.nn.relu(self.conv3(out) + shortcut))


def _shortcut(
  inplanes: int, outplanes: int, stride: int, dtype: DTypeLike, rngs: nnx.Rngs
) -> Shortcut | None:
  if stride == 1 and inplanes == outplanes:
    return None
  return Shortcut(inplanes, outplanes, pool=stride == 2, dtype=dtype, rngs=rngs)


class TResNet(nnx.Module):
  """TResNet encoder: NHWC images [N, H, W, 3] (H, W multiples of 4) -> pooled features [N, F].

  Args:
    layers: blocks per stage, e.g. (3, 4, 11, 3) for TResNet-M.
    width_factor: planes = int(64 * width_factor) (M 1.0, L 1.2, XL 1.3); small values give
      tiny test models.
    v2: TResNet-V2 layout (Bottleneck blocks in all stages, planes rounded down to a multiple of 8).
    in_channels: image channels.
    dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    rngs: parameter initialisation RNG.
  """

  def __init__(
    self,
    layers: Sequence[int],
    *,
    width_factor: float = 1.0,
    v2: bool = False,
    in_channels: int = 3,
    dtype: DTypeLike = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if len(layers) != 4 or min(layers) < 1:
      raise ValueError(f'TResNet layers must be four positive block counts, got {layers}.')
    planes = int(64 * width_factor)
    if v2:
      planes = planes // 8 * 8
    if planes < 1:
      raise ValueError(f'TResNet width_factor {width_factor} gives no channels.')
    self.dtype = dtype
    early = Bottleneck if v2 else BasicBlock
    self.conv1 = ConvNormAct(in_channels * 16, planes, 3, slope=STEM_SLOPE, dtype=dtype, rngs=rngs)
    inplanes = planes
    stages = []
    for i, (block, n_blocks) in enumerate(zip((early, early, Bottleneck, Bottleneck), layers)):
      stage_planes = planes * 2**i
      blocks = []
      for j in range(n_blocks):
        blocks.append(
          block(
            inplanes,
            stage_planes,
            stride=2 if (i > 0 and j == 0) else 1,
            use_se=i < 3,
            dtype=dtype,
            rngs=rngs,
          )
        )
        inplanes = stage_planes * block.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.num_features = inplanes

  def __call__(
    self, images: jax.Array, *, return_feature_map: bool = False
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Pooled features [N, F] (float32, or float64 for a float64 dtype); with `return_feature_map`
    also the last feature map [N, ceil(H/32), ceil(W/32), F] in the computation dtype."""
    x = self.conv1(space_to_depth(images.astype(self.dtype)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    pooled = x.astype(jnp.promote_types(x.dtype, jnp.float32)).mean(axis=(1, 2))
    return (pooled, x) if return_feature_map else pooled
