"""Initialisers shared by the encoder and the KMM head (Flax signature: key, shape, dtype)."""

import math

import jax
import jax.numpy as jnp
from jax.nn.initializers import Initializer
from jax.typing import DTypeLike


def uniform(low: float, high: float) -> Initializer:
  """U(low, high); e.g. the paper's Table 6 U(0, 0.1) for the pi and mu weights."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=low, maxval=high)

  return init


def torch_default_uniform(fan_in: int) -> Initializer:
  """U(+-1/sqrt(fan_in)): torch's default for Linear/Conv biases and Conv1d weights, kept where
  the reference models do not re-initialise (TResNet SE biases, the KMCL downsampler)."""
  bound = 1.0 / math.sqrt(fan_in)
  return uniform(-bound, bound)
