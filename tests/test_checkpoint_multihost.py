"""Two processes (one CPU device each, gloo collectives) restoring a checkpoint that only one of
them can tell is bad: both must restore the same, previous, step (crate_jax.checkpointing).

The state's array `w` is sharded over the two processes; each process writes its half into its
own OCDBT sub-database (`state/ocdbt.process_<i>/`) and reads only that half back, so damage to
`ocdbt.process_1/` is seen by process 1 alone: a digest mismatch for random bytes, a read error
for a truncated file.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 60  # Per job; a hung collective fails the test, never the CI job.

_WORKER = """
import sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

phase, directory, port, index = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(index))
from crate_jax import checkpointing

mesh = Mesh(np.array(jax.devices()), ("x",))

def state(step):
  # Random bits: zstd stores them raw, so damage to them changes values without a read error.
  w = np.random.default_rng(step).integers(0, 2**32, (2, 16384), dtype=np.uint32)
  return {
    "w": jax.make_array_from_callback(w.shape, NamedSharding(mesh, P("x")), lambda i: w[i]),
    "step": jax.make_array_from_callback((), NamedSharding(mesh, P()), lambda i: np.int32(step)),
  }

checkpointer = checkpointing.Checkpointer(directory, max_to_keep=3)
if phase == "save":
  for step in (1, 2):
    checkpointer.save(step, state(step))
else:
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
  restored = checkpointer.restore_latest(abstract)
  step = int(np.asarray(restored["step"].addressable_data(0)))
  mine = np.asarray(restored["w"].addressable_data(0))
  same = np.array_equal(mine, np.asarray(state(step)["w"].addressable_data(0)))
  print(f"RESTORED process={index} step={step} same={same}", flush=True)
checkpointer.close()
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_job(phase: str, directory: pathlib.Path) -> list[str]:
  """Runs `_WORKER` as 2 processes; returns their outputs (stdout and stderr)."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_", "TPU_"))
  }
  env.update(
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(REPO),
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, phase, str(directory), str(port), str(i)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-5000:]
  return outs


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
  """Steps 1 and 2 saved by a 2-process job (copied by each test before damaging it)."""
  directory = tmp_path_factory.mktemp("multihost_saved") / "checkpoints"
  _run_job("save", directory)
  assert sorted(os.listdir(directory / "2" / "state" / "ocdbt.process_1" / "d"))
  return directory


def _random_bytes(files):
  """64 random bytes in the middle half of each file: array values, not headers or indices."""
  rng = np.random.default_rng(0)
  for f in files:
    size = os.path.getsize(f)
    with open(f, "r+b") as out:
      for offset in rng.integers(size // 4, 3 * size // 4, 64):
        out.seek(int(offset))
        out.write(bytes([int(rng.integers(256))]))


def _truncated(files):
  for f in files:
    os.truncate(f, os.path.getsize(f) // 3)


@pytest.mark.parametrize(
  "damage, process_1_sees",
  [(_random_bytes, "CorruptCheckpointError"), (_truncated, "Error reading")],
)
def test_both_processes_restore_the_previous_step_when_one_sees_damage(
  saved, tmp_path, damage, process_1_sees
):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved, directory)
  damage(sorted((directory / "2" / "state" / "ocdbt.process_1" / "d").iterdir()))

  outs = _run_job("restore", directory)

  for i, out in enumerate(outs):
    assert f"RESTORED process={i} step=1 same=True" in out, out[-3000:]
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    (warning,) = [line for line in out.splitlines() if "is unreadable" in line]
    assert "/checkpoints/2 is unreadable on process(es) [1] (" in warning, warning
  assert "(read fine here)" in outs[0]  # Process 0 read its half fine, and still fell back.
  assert process_1_sees in outs[1], outs[1][-3000:]
  (moved,) = os.listdir(tmp_path / "unreadable_checkpoints")  # By process 0, once.
  assert moved.startswith("2-")
  assert sorted(os.listdir(directory)) == ["1"]
