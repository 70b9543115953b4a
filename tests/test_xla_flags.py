"""The XLA flags `import kmcl_jax` adds: when, how they meet the user's, and what they change."""

import os

import run_helpers

from kmcl_jax import xla_flags

FLAG = 'xla_cpu_experimental_ynn_fusion_type'
DEFAULT = f'--{FLAG}={xla_flags.CPU_DEFAULTS[FLAG]}'


def test_the_default_is_added_to_an_empty_or_unrelated_xla_flags():
  environ = {}
  xla_flags.add_cpu_defaults(environ, '0.10.2')
  assert environ == {'XLA_FLAGS': DEFAULT}
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  xla_flags.add_cpu_defaults(environ, '0.11.2')
  assert environ['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {DEFAULT}'


def test_a_flag_the_user_set_wins():
  mine = f'--{FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT --xla_cpu_enable_fast_math=true'
  environ = {'XLA_FLAGS': mine}
  xla_flags.add_cpu_defaults(environ, '0.10.2')
  assert environ['XLA_FLAGS'] == mine


def test_nothing_is_added_for_a_jaxlib_not_checked():
  # XLA aborts on flags it does not know, so an unmeasured jaxlib gets none.
  for version in ('0.12.0', '0.4.38', None):
    environ = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
    xla_flags.add_cpu_defaults(environ, version)
    assert environ == {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}


def test_this_environment_gets_the_default():
  # Fails when requirements.txt moves jaxlib to a version not yet checked: see that its library
  # holds the flag, time the train_step benchmark with and without it, then add it to the list.
  assert xla_flags.installed_jaxlib() in xla_flags._CHECKED_JAXLIBS
  assert DEFAULT in os.environ['XLA_FLAGS']  # conftest's flags, then `import kmcl_jax`'s


_COMPILE = """
import kmcl_jax
import jax, jax.numpy as jnp
x, w = jnp.ones((1, 8, 8, 32)), jnp.ones((3, 3, 32, 32))  # YNNPACK skips < 32 channels
for name, f, args in (('conv', lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')), (x, w)),
    ('dot', lambda a, b: a @ b, (jnp.ones((64, 64)), jnp.ones((64, 64))))):
  print(name, '__ynn_fusion' in jax.jit(f).lower(*args).compile().as_text())
"""


def _library_of_each_op(xla_flags_value):
  env = run_helpers.env_without_forced_devices(XLA_FLAGS=xla_flags_value, JAX_PLATFORMS='cpu')
  out = run_helpers.python_stdout('-c', _COMPILE, env=env, timeout=120)
  return dict(line.split() for line in out.splitlines())


def test_convolutions_leave_ynnpack_and_matmuls_stay():
  assert _library_of_each_op('') == {'conv': 'False', 'dot': 'True'}
  # The user's choice (here jaxlib's own default) is kept: convolutions go to YNNPACK again.
  jaxlib_default = f'--{FLAG}=' + ','.join(
    f'LIBRARY_FUSION_TYPE_{kind}' for kind in ('INDIVIDUAL_DOT', 'INDIVIDUAL_CONVOLUTION', 'REDUCE')
  )
  assert _library_of_each_op(jaxlib_default) == {'conv': 'True', 'dot': 'True'}
