"""crate_jax.host_memory: large buffers freed by one step are reused, not faulted in again."""

from pathlib import Path
import subprocess
import sys

import pytest

from crate_jax import host_memory

_REPO = Path(__file__).resolve().parents[1]

# What XLA:CPU does every step, on a worker thread: allocate a 64 MiB block, write it, free
# it. Prints the minor page faults of the second such step.
_STEP_FAULTS = """
import ctypes, ctypes.util, resource, sys, threading
from crate_jax import host_memory
if sys.argv[1] == "reuse":
  assert host_memory.reuse_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []

def step():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(2):
  worker = threading.Thread(target=step)
  worker.start()
  worker.join()
print(faults[-1])
"""


def _faults_in_second_step(mode: str) -> int:
  out = subprocess.run(
    [sys.executable, "-c", _STEP_FAULTS, mode],
    cwd=_REPO,
    check=True,
    capture_output=True,
    text=True,
  )
  return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc")
def test_reuse_freed_memory_stops_refaulting_step_buffers():
  pages = (64 << 20) // 4096
  assert _faults_in_second_step("default") > 0.9 * pages  # glibc maps the block afresh.
  assert _faults_in_second_step("reuse") < 0.01 * pages  # The first step's pages, reused.
