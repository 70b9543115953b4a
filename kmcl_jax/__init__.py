"""KMCL: Kernel-based Multilabel Contrastive Learning in JAX/Flax."""
