"""Chooses the JAX build for this machine and prints its pip requirement.

    python3 tools/select_jax.py           # detected build's requirement, e.g. jax[cuda13]
    python3 tools/select_jax.py cpu       # the requirement of a named build (the override)
    python3 tools/select_jax.py --name    # the detected build's name: cpu, cuda12, cuda13, tpu

The Makefile installs `-r requirements.txt <requirement>` in one pip command, so the requirement
names only the extra: jax's version comes from the pins. Standard library only: it runs with
the system Python before the virtual environment exists.

Detection, first match wins:
  1. NVIDIA GPU: `nvidia-smi --query-gpu=driver_version --format=csv,noheader` succeeds. A driver
     >= 580 runs CUDA 13 -> cuda13; >= 525 runs CUDA 12 -> cuda12; an older one -> cpu, with a
     warning on stderr.
  2. Cloud TPU VM: a PCI device with Google's vendor id and a TPU device id (the table JAX itself
     uses), or TPU device nodes /dev/accel0, /dev/accel1, ... (TPU v2-v4 and v5e). Chips bound to
     vfio (/dev/vfio/<n>, TPU v5p and v6e) are found by their PCI ids.
  3. Otherwise cpu.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

BUILDS = {'cpu': 'jax[cpu]', 'cuda12': 'jax[cuda12]', 'cuda13': 'jax[cuda13]', 'tpu': 'jax[tpu]'}
# Oldest driver branch of each CUDA major version (CUDA 13.0 needs 580.65, CUDA 12.0 525.60).
MIN_DRIVER = (('cuda13', 580), ('cuda12', 525))
GOOGLE_PCI_VENDOR = '0x1ae0'
# TPU v2/v3, plc, v4, v5p, v5e, v6e, 7x (jax/_src/hardware_utils.py). Other Google PCI devices,
# such as the gVNIC network card of every GCE VM, must not count.
TPU_PCI_DEVICES = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')


def nvidia_driver_major() -> int | None:
  """Major version of the NVIDIA driver that `nvidia-smi` reports; None without a usable GPU."""
  try:
    result = subprocess.run(
      ['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
      capture_output=True,
      text=True,
      timeout=30,
      check=False,
    )
  except (OSError, subprocess.TimeoutExpired):
    return None
  lines = result.stdout.split()
  if result.returncode != 0 or not lines:
    return None
  try:
    return int(lines[0].split('.')[0])
  except ValueError:
    return None


def has_tpu(pci_dir: str = '/sys/bus/pci/devices', dev_dir: str = '/dev') -> bool:
  """True on a Cloud TPU VM (see the module docstring)."""
  for vendor_path in glob.glob(os.path.join(pci_dir, '*', 'vendor')):
    try:
      with open(vendor_path) as f:
        vendor = f.read().strip()
      if vendor != GOOGLE_PCI_VENDOR:
        continue
      with open(os.path.join(os.path.dirname(vendor_path), 'device')) as f:
        if f.read().strip() in TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return bool(glob.glob(os.path.join(dev_dir, 'accel[0-9]*')))


def detect(pci_dir: str = '/sys/bus/pci/devices', dev_dir: str = '/dev') -> str:
  """The build for this machine: 'cuda13', 'cuda12', 'tpu' or 'cpu'."""
  driver = nvidia_driver_major()
  if driver is not None:
    for build, minimum in MIN_DRIVER:
      if driver >= minimum:
        return build
    print(
      f'select_jax: NVIDIA driver {driver} is older than {MIN_DRIVER[-1][1]}, which CUDA 12 '
      'needs; installing the CPU build of JAX.',
      file=sys.stderr,
    )
  if has_tpu(pci_dir, dev_dir):
    return 'tpu'
  return 'cpu'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument(
    'build',
    nargs='?',
    choices=sorted(BUILDS),
    help='print the requirement of this build instead of detecting one',
  )
  parser.add_argument(
    '--name', action='store_true', help='print the build name, not the requirement'
  )
  args = parser.parse_args(argv)
  build = args.build or detect()
  print(build if args.name else BUILDS[build])
  return 0


if __name__ == '__main__':
  sys.exit(main())
