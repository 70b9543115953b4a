"""Parameter count and forward cost of an encoder or KMCL model, without allocating its weights.

    python -m kmcl_jax.models.summary --model tresnet_m --image-size 224
    python -m kmcl_jax.models.summary --model tresnet_l --image-size 448 --num-classes 20

Parameters are counted on `nnx.eval_shape` (shapes only). The forward cost is XLA's own
estimate: the inference forward (running BatchNorm statistics) is lowered and compiled for
abstract inputs and `cost_analysis()['flops'] / 2` is reported as MACs. XLA counts every
floating-point operation (BatchNorm, activations, pooling, SE gates too), so the figure is a
little above the published convolution/linear-only MAC counts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kmcl_jax.models import ENCODERS, KMCLModel, create_encoder


def parameter_count(module_fn: Callable[[], nnx.Module]) -> int:
  """Number of trainable parameters (BatchNorm statistics excluded) of `module_fn()`."""
  abstract = nnx.eval_shape(module_fn)
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def forward_macs(module_fn: Callable[[], nnx.Module], image_size: int, batch: int = 1) -> float:
  """Inference-forward multiply-accumulates per image, from XLA's compiled cost analysis."""
  abstract = nnx.eval_shape(module_fn)
  abstract.eval()
  graphdef, state = nnx.split(abstract)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0]
  return cost['flops'] / 2 / batch


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog='python -m kmcl_jax.models.summary', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--model', default='tresnet_m', choices=sorted(ENCODERS))
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument(
    '--num-classes',
    type=int,
    default=0,
    help='> 0: the full KMCL model (isotropic Bhattacharyya KMM); 0: encoder',
  )
  args = parser.parse_args(argv)

  if args.num_classes > 0:

    def build():
      return KMCLModel(args.model, args.num_classes, rngs=nnx.Rngs(0))

    what = f'KMCL {args.model} ({args.num_classes} classes)'
  else:

    def build():
      return create_encoder(args.model, rngs=nnx.Rngs(0))

    what = f'{args.model} encoder (no classifier)'
  params = parameter_count(build)
  macs = forward_macs(build, args.image_size)
  print(
    f'{what} at {args.image_size} px: {params:,} parameters ({params / 1e6:.2f} M), '
    f'{macs / 1e9:.2f} GMAC forward (XLA flops / 2)'
  )


if __name__ == '__main__':
  main()
