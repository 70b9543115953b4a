"""Models: the TResNet encoders, the Kernel Mixture Module and the full KMCL model."""

from kmcl_jax.models.kmm import KernelMixtureModule

__all__ = ['KernelMixtureModule']
