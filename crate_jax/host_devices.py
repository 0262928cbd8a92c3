"""A CPU host as several single-threaded XLA devices: data parallelism across its cores.

By default XLA:CPU is one device that spreads each op over all cores. On a small host that
wastes cores twice: ops it runs on one thread (the batched matmuls of attention, one small
`(N, p) x (p, N)` product per image and head) leave the other cores idle, and every
multi-threaded op pays a split and a join. `use_cpu_devices(n)` makes the host `n` XLA
devices instead, each running its ops on one thread. The trainer's mesh then spans them
and shards the batch over its `data` axis as in any data-parallel job: each core computes
the whole step on its share of the batch, and only the gradients are summed across cores.

Measured on 2 cores (small CRATE, batch 128): the train step takes 1.0 s on one core and
0.75-0.8 s on both as one device; two single-threaded devices were 8-14% faster than one
device in a jax-only A/B, and level with it in the interleaved runs of
`benchmarks/crate_vs_torch.py` (details in `benchmarks/README.md`).

Call it before JAX initialises its backends (before the first computation);
`python -m crate_jax.main --cpu_devices=N` does. The global batch must divide by `n`
(the trainer checks). Other platforms are unaffected: only the CPU backend reads these settings.
"""

from __future__ import annotations

import os

import jax

_SINGLE_THREADED = "--xla_cpu_multi_thread_eigen=false"


def use_cpu_devices(count: int) -> None:
  """Makes XLA:CPU `count` devices that each run single-threaded.

  Args:
    count: number of CPU devices; one per physical core is the natural choice.

  Raises:
    ValueError: `count < 1`.
    RuntimeError: JAX's backends are already initialised (too late to change devices).
  """
  if count < 1:
    raise ValueError(f"cpu_devices must be >= 1, got {count}.")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:
    raise RuntimeError(
      f"Cannot make {count} CPU devices: JAX has already initialised its backends. Call "
      "crate_jax.host_devices.use_cpu_devices() before the first JAX computation."
    ) from e
  flags = os.environ.get("XLA_FLAGS", "")
  if _SINGLE_THREADED not in flags.split():
    os.environ["XLA_FLAGS"] = f"{flags} {_SINGLE_THREADED}".strip()
