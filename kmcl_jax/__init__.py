"""KMCL: Kernel-based Multilabel Contrastive Learning in JAX/Flax."""

import os as _os

from kmcl_jax import xla_flags as _xla_flags

# Here, because XLA reads XLA_FLAGS once, when JAX first creates a backend (kmcl_jax/xla_flags.py).
_xla_flags.add_cpu_defaults(_os.environ, _xla_flags.installed_jaxlib())
