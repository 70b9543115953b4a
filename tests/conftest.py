"""Test session set-up that must happen before JAX or grain start."""

import os

# Eight CPU devices so the sharding and data-parallel tests see a real mesh. Must be set before
# JAX initialises its backends; single-device tests are unaffected.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pytest imports tracemalloc only when it describes an unraisable exception. If that first
# import happens inside TFDS's lazy-import hook it fails, and the test errors with an opaque
# 'Failed to process unraisable exception' instead of showing the warning.
import tracemalloc  # noqa: E402, F401

from absl import flags  # noqa: E402

# grain's multiprocess workers read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
