"""XLA flags kmcl_jax sets by default, before JAX creates its backends (at `import kmcl_jax`).

One today, for CPUs: XLA:CPU (jaxlib 0.10 and 0.11) sends matmuls, reductions and convolutions
with 32 or more channels to YNNPACK. YNNPACK's 3x3 convolutions are up to 2x slower than XLA's
Eigen ones on TResNet's shapes (56x56x64, batch 8, 2 cores: 21.8 ms forward against 12.0 ms),
while its matmuls and reductions are the fastest this jaxlib has. Keeping YNNPACK for those two
only makes the TResNet-M train step about 12% faster on CPU (BENCHMARKS.md, 'Train step, CPU').
The flag concerns the CPU backend only; GPU and TPU computations are unaffected.

A flag the user sets in XLA_FLAGS always wins, and nothing is added for a jaxlib not listed in
`_CHECKED_JAXLIBS`: XLA aborts on a flag it does not know, so a new jaxlib is added there only
once its library is seen to hold the flag (and, ideally, the step measured with and without).
"""

from __future__ import annotations

from collections.abc import MutableMapping

# YNNPACK for matmuls and reductions; convolutions fall back to XLA's Eigen kernels.
CPU_DEFAULTS = {
  'xla_cpu_experimental_ynn_fusion_type': (
    'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'
  ),
}
# The pinned jaxlibs (requirements.txt). Both hold the flag (in libjax_common.so's flag table);
# the speed-up was measured on 0.10.2 (Python 3.11), not yet on 0.11.2 (Python 3.12).
_CHECKED_JAXLIBS = ('0.10.2', '0.11.2')


def add_cpu_defaults(environ: MutableMapping[str, str], jaxlib_version: str | None) -> None:
  """Appends each `CPU_DEFAULTS` flag to environ['XLA_FLAGS'] unless it is already set there."""
  if jaxlib_version not in _CHECKED_JAXLIBS:
    return
  flags = environ.get('XLA_FLAGS', '')
  added = [f'--{name}={value}' for name, value in CPU_DEFAULTS.items() if f'--{name}=' not in flags]
  if added:
    environ['XLA_FLAGS'] = ' '.join([flags, *added]).strip()


def installed_jaxlib() -> str | None:
  # jaxlib's own version module: 5 ms, where importlib.metadata took 80 ms of every start-up.
  try:
    import jaxlib.version  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return jaxlib.version.__version__
