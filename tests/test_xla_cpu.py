"""crate_jax.xla_cpu's process settings: reused step buffers; single-threaded CPU devices.

The attention kernel is tested in tests/test_ops.py.
"""

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import numpy as np
import pytest

from crate_jax import xla_cpu

_REPO = Path(__file__).resolve().parents[1]

# What XLA:CPU does every step, on a worker thread: allocate a 64 MiB block, write it, free
# it. Prints the minor page faults of the second such step.
_STEP_FAULTS = """
import ctypes, ctypes.util, resource, sys, threading
from crate_jax import xla_cpu
if sys.argv[1] == "reuse":
  assert xla_cpu.reuse_freed_memory()
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


@pytest.mark.skipif(xla_cpu._glibc() is None, reason="needs glibc")
def test_reuse_freed_memory_stops_refaulting_step_buffers():
  pages = (64 << 20) // 4096
  assert _faults_in_second_step("default") > 0.9 * pages  # glibc maps the block afresh.
  assert _faults_in_second_step("reuse") < 0.01 * pages  # The first step's pages, reused.


# Computes the loss and gradients of a tiny CRATE on the devices the argument asks for and
# prints the device count, XLA_FLAGS and the result; the parent compares two such runs.
_GRADS = """
import json, sys
import numpy as np
from crate_jax import xla_cpu
count = int(sys.argv[1])
if count:
  xla_cpu.use_cpu_devices(count)
import jax, jax.numpy as jnp, os
from jax.sharding import NamedSharding, PartitionSpec as P
from crate_jax.models import crate
model = crate.Model(num_classes=3, width=16, depth=2, heads=2, patch_size=4, image_size=(8, 8))
images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
params = model.init(jax.random.PRNGKey(1), images[:1])["params"]
mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
images = jax.device_put(images, NamedSharding(mesh, P("data")))
params = jax.device_put(params, NamedSharding(mesh, P()))
loss, grads = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(model.apply({"params": p}, x)[0] ** 2)))(params, images)
flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
print(json.dumps(dict(devices=jax.device_count(), shards=len(images.addressable_shards),
                      xla_flags=os.environ.get("XLA_FLAGS", ""), loss=float(loss), grads=flat.tolist())))
"""


def _run(count: int) -> dict:
  env = dict(os.environ, PYTHONPATH=str(_REPO))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    [sys.executable, "-c", _GRADS, str(count)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_two_single_threaded_devices_compute_the_one_device_gradients():
  one, two = _run(0), _run(2)
  assert one["devices"] == 1 and two["devices"] == 2 and two["shards"] == 2
  assert "--xla_cpu_multi_thread_eigen=false" in two["xla_flags"]
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
  np.testing.assert_allclose(two["grads"], one["grads"], rtol=1e-4, atol=1e-6)


def test_too_late_or_invalid_counts_are_clear_errors():
  jax.numpy.zeros(1).block_until_ready()  # Backends are up from here on.
  with pytest.raises(RuntimeError, match="before the first JAX computation"):
    xla_cpu.use_cpu_devices(jax.device_count() + 1)
  with pytest.raises(ValueError, match="must be >= 1"):
    xla_cpu.use_cpu_devices(0)
