"""mae_jax.host_memory: with `keep`, a large block freed and requested again comes back without a
page fault; with glibc's defaults the same request faults on every page (the closed form: one fault
per 4 KiB page of a fresh mmap). Each case runs in its own interpreter, since the setting is
process-wide and must come before threads exist. Elsewhere than Linux/glibc `keep` is a no-op, and
the first test checks it reports so."""

import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import resource, sys
from mae_jax import host_memory
mode = host_memory.apply(sys.argv[1])
import numpy as np
n = 64 * 2**20  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
a = np.ones(n, np.uint8); del a          # first use: faults everywhere, then freed
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(n, np.uint8)                 # the same size again
f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(mode, f1 - f0, n // resource.getpagesize())
"""


def _probe(mode: str):
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                       timeout=120, check=True)
  applied, faults, pages = out.stdout.split()
  return applied, int(faults), int(pages)


def test_keep_reuses_a_freed_block_without_page_faults():
  applied, faults, pages = _probe("keep")
  if platform.system() != "Linux":  # not glibc: `keep` must say it did nothing
    assert applied == "system"
    return
  assert applied == "keep"
  assert faults < pages // 100, (faults, pages)


def test_system_default_faults_on_every_page_again():
  applied, faults, pages = _probe("system")
  assert applied == "system"
  # Transparent huge pages would fault once per 2 MiB; this machine's default (madvise) is per page.
  assert faults >= pages // 512, (faults, pages)


def test_bad_setting_names_the_variable():
  from mae_jax import host_memory
  with pytest.raises(ValueError, match="MAE_JAX_HOST_MALLOC"):
    host_memory.apply("fast")
