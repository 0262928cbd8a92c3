"""glibc malloc settings under which XLA:CPU steps reuse their memory instead of faulting it in.

XLA:CPU allocates one block per execution for all of a step's temporaries, mostly the
activations kept for the backward pass: 600 MB for a CRATE of width 192 and depth 6 on a
batch of 128 32-px images. glibc serves a request that large with a fresh `mmap` and
gives it back with `munmap` when the step ends (from a thread's arena, whatever
`M_MMAP_THRESHOLD` says), so every step page-faults its whole working set again. Measured
on 2 cores: 148,000 minor faults and 0.6 s of kernel time per 1.3 s train step.

`reuse_freed_memory()` makes every thread allocate from the main heap, never by `mmap`,
and keeps freed memory there, so the next step gets the same, already mapped, pages: no
faults, and that step took 0.9 s. The cost is that the process keeps its peak heap size
instead of returning memory to the system, which is what a training process wants.

It must run before JAX starts its threads (before the first computation); `crate_jax.main`
calls it first thing (`--reuse_host_memory=false` turns it off). It does nothing where the
C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from absl import logging

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):
    return None  # Not glibc (musl, macOS): other allocators, nothing to set.
  return libc


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed memory: one arena, no `mmap`, no trimming.

  Returns:
    True if the settings were applied (glibc), False otherwise.
  """
  libc = _glibc()
  if libc is None:
    logging.info("Not glibc: leaving the host allocator as it is.")
    return False
  settings = {
    "M_ARENA_MAX": (_M_ARENA_MAX, 1),
    "M_MMAP_MAX": (_M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, _INT_MAX),
  }
  failed = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
  if failed:
    logging.warning("mallopt refused %s; step buffers may be page-faulted in every step.", failed)
    return False
  return True
