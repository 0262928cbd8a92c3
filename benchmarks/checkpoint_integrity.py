r"""Cost of the checkpoint integrity digests: save and restore seconds without and with them.

    python benchmarks/checkpoint_integrity.py [--states=demo,crate_b16] [--repeats=3]

For each state, saves and restores it with `crate_jax.checkpointing.Checkpointer`
(`integrity=False` and `True`, alternating round by round so that a change of machine load
hits both), after one untimed round per setting (warming orbax's and TensorStore's caches).
Prints the median seconds of `--repeats` rounds:

* save: `save()` until it returns (the training loop waits this long) and until the
  checkpoint is committed (`wait()`);
* restore: `restore_latest` in a new `Checkpointer`, including the verification;
* digests alone: computing them (dispatch and fetch), the first time (it compiles the
  digest programs, once per array shape and sharding in a process) and then.

The states are float32 CRATE parameter trees of the sizes named (synthetic: shapes of the
model's layers, random values, so that zstd cannot shrink them) plus Adam's two moments:

* `demo`: configs/demo.py's CRATE, width 128, 4 layers, 8x8 patches, 10 classes:
  227,210 parameters, 0.68M floats with the moments;
* `crate_b16`: CRATE-B/16, width 768, 12 layers, 16x16 patches, 1000 classes:
  22,820,584 parameters, 68.5M floats with the moments.

Recorded numbers: benchmarks/README.md.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from crate_jax import checkpointing

_STATES = flags.DEFINE_list("states", ["demo", "crate_b16"], "States to time: demo, crate_b16.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per state and setting.")
_DIR = flags.DEFINE_string("dir", None, "Where to write the checkpoints (default: a temp dir).")

# (width, depth, patch size, tokens, classes)
SIZES = {"demo": (128, 4, 8, 17, 10), "crate_b16": (768, 12, 16, 197, 1000)}


def param_shapes(width, depth, patch, tokens, classes) -> dict[str, tuple[int, ...]]:
  """CRATE's parameter shapes: patch embedding, per layer MSSA (qkv, out) and ISTA, head."""
  shapes = {
    "embed/kernel": (patch * patch * 3, width),
    "embed/bias": (width,),
    "cls": (1, 1, width),
    "pos_embedding": (1, tokens, width),
    "final_norm/scale": (width,),
    "final_norm/bias": (width,),
    "head/kernel": (width, classes),
    "head/bias": (classes,),
  }
  for layer in range(depth):
    for name in ("norm1/scale", "norm1/bias", "norm2/scale", "norm2/bias"):
      shapes[f"layer{layer}/{name}"] = (width,)
    for name in ("mssa/qkv", "mssa/out", "ista/dictionary"):
      shapes[f"layer{layer}/{name}"] = (width, width)
  return shapes


def make_state(name: str) -> dict:
  shapes = param_shapes(*SIZES[name])
  rng = np.random.default_rng(0)

  def tree():
    return {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}

  return {
    "step": jnp.asarray(1, jnp.int32),
    "params": tree(),
    "opt_state": {"mu": tree(), "nu": tree()},
    "rng": jax.random.PRNGKey(0),
  }


def time_round(directory: str, state, abstract, integrity: bool) -> dict[str, float]:
  checkpointer = checkpointing.Checkpointer(directory, max_to_keep=1, integrity=integrity)
  start = time.perf_counter()
  checkpointer.save(1, state)
  returned = time.perf_counter() - start
  checkpointer.wait()
  committed = time.perf_counter() - start
  checkpointer.close()
  checkpointer = checkpointing.Checkpointer(directory, max_to_keep=1, integrity=integrity)
  start = time.perf_counter()
  restored = checkpointer.restore_latest(abstract)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - start
  checkpointer.close()
  assert int(restored["step"]) == 1
  return {"save_returned": returned, "save_committed": committed, "restore": restore}


def time_digests(state) -> float:
  start = time.perf_counter()
  checkpointing._digest_record(checkpointing._dispatch_digests(state))  # pylint: disable=protected-access
  return time.perf_counter() - start


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  root = _DIR.value or tempfile.mkdtemp(prefix="checkpoint_integrity_")
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
    f"load average {os.getloadavg()[0]:.1f}; checkpoints in {root}"
  )
  rows = []
  for name in _STATES.value:
    state = make_state(name)
    floats = sum(x.size for x in jax.tree.leaves(state))
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    first_digest = time_digests(state)  # Compiles the digest programs of these shapes.
    times = {False: [], True: []}
    for round_ in range(_REPEATS.value + 1):
      for integrity in (False, True) if round_ % 2 else (True, False):
        directory = os.path.join(root, f"{name}_{integrity}_{round_}")
        result = time_round(directory, state, abstract, integrity)
        shutil.rmtree(directory)
        if round_:  # Round 0 warms orbax's and TensorStore's caches.
          times[integrity].append(result)
    digest = statistics.median(time_digests(state) for _ in range(_REPEATS.value))

    medians = [
      statistics.median(r[key] for r in times[integrity])
      for key in ("save_returned", "save_committed", "restore")
      for integrity in (False, True)
    ]
    rows.append((name, floats, *medians, first_digest, digest))
  header = (
    "| state | floats | save returns off / on (s) | save committed off / on (s) "
    "| restore off / on (s) | digests alone: first / then (s) |"
  )
  print(header)
  print("|---|---|---|---|---|---|")
  for name, floats, r0, r1, c0, c1, s0, s1, first, digest in rows:
    print(
      f"| {name} | {floats / 1e6:.2f}M | {r0:.3f} / {r1:.3f} | {c0:.3f} / {c1:.3f} "
      f"| {s0:.3f} / {s1:.3f} | {first:.3f} / {digest:.3f} |"
    )
  if not _DIR.value:
    shutil.rmtree(root)


if __name__ == "__main__":
  app.run(main)
