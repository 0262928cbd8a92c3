"""crate_jax.host_devices: a CPU host as several single-threaded devices, data parallel."""

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import numpy as np
import pytest

from crate_jax import host_devices

_REPO = Path(__file__).resolve().parents[1]

# Computes the loss and gradients of a tiny CRATE on the devices the argument asks for and
# prints the device count, XLA_FLAGS and the result; the parent compares two such runs.
_GRADS = """
import json, sys
import numpy as np
from crate_jax import host_devices
count = int(sys.argv[1])
if count:
  host_devices.use_cpu_devices(count)
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
    host_devices.use_cpu_devices(jax.device_count() + 1)
  with pytest.raises(ValueError, match="must be >= 1"):
    host_devices.use_cpu_devices(0)
