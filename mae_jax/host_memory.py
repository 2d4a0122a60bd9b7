"""Keep freed host memory in the process instead of handing it back to the kernel each step.

Why: XLA:CPU allocates each execution's temporaries as large blocks (1.1 GiB for the ViT-S MAE
step of docs/benchmarks.md) and frees them when the step ends. glibc serves every request above its
mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with `munmap`, so every step
touches all of that memory for the first time again: ~340,000 page faults and ~0.6 s of kernel CPU
time per step, ~13 % of the step's CPU time on 2 cores. Keeping freed blocks in malloc's heap makes the next step
reuse them with no fault at all, the caching that GPU allocators do by design.

`keep_freed_memory()` sets this through glibc's `mallopt` (no environment variable, nothing to
install): one malloc arena (`M_ARENA_MAX = 1`, so that blocks XLA's worker threads allocate come
from the same heap), no mmap for large blocks (`M_MMAP_MAX = 0`; glibc still falls back to mmap
where its heap cannot grow) and no trimming of the heap top (`M_TRIM_THRESHOLD`). It must run before
threads exist: `mae_jax.main` calls it first thing (MAE_JAX_HOST_MALLOC=system leaves malloc alone),
and so do the benchmarks (`--host-malloc`). The cost is that the process keeps its peak heap size
until it exits, as any caching allocator does. It changes no numbers, only where memory comes from.
Not glibc (macOS, musl): a no-op that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_state = {"mode": "system"}


def _libc():
  if platform.system() != "Linux":
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()  # only glibc has it
    return libc
  except (OSError, AttributeError):
    return None


def keep_freed_memory() -> bool:
  """Makes malloc keep freed blocks for reuse (see the module docstring). True if applied."""
  libc = _libc()
  if libc is None:
    logging.info("host memory: not glibc, leaving malloc as it is")
    return False
  ok = (bool(libc.mallopt(_M_ARENA_MAX, 1)) and bool(libc.mallopt(_M_MMAP_MAX, 0))
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1)))  # -1: never trim (mallopt(3))
  if ok:
    _state["mode"] = "keep"
  return ok


def mode() -> str:
  return _state["mode"]


def apply(setting: str) -> str:
  """`setting` as in the config/flag: 'keep', or 'system' (malloc left untouched: glibc's own
  defaults, including its dynamic mmap threshold, which any `mallopt` call would switch off).
  Returns the mode in effect."""
  if setting == "keep":
    keep_freed_memory()
  elif setting != "system":
    raise ValueError(f"host malloc setting {setting!r} (MAE_JAX_HOST_MALLOC, --host-malloc): expected 'keep' or 'system'")
  return mode()
