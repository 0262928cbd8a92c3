"""Tests for crate_jax.distributed: decisions, errors and a 2-process job."""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

from absl import flags
import jax
import pytest

from crate_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
SRUN_ENV = {
  "SLURM_JOB_ID": "42",
  "SLURM_NTASKS": "16",
  "SLURM_PROCID": "3",
  "SLURM_LOCALID": "3",
  "SLURM_STEP_NODELIST": "gpu[001-002]",
}
EXPLICIT = dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)


def test_plain_machine_runs_single_process():
  assert distributed.resolve({}, on_cloud_tpu=False) is None
  one_task = {**SRUN_ENV, "SLURM_NTASKS": "1"}
  assert distributed.resolve(one_task, on_cloud_tpu=False) is None
  pod_not_job = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
  assert distributed.resolve(pod_not_job, on_cloud_tpu=False) is None


def test_explicit_flags_win_over_environment():
  plan = distributed.resolve(SRUN_ENV, on_cloud_tpu=True, **EXPLICIT, local_device_ids=[0, 1])
  assert plan == ("flags", {**EXPLICIT, "local_device_ids": [0, 1]})


@pytest.mark.parametrize(
  "env, on_cloud_tpu, source",
  [
    ({}, True, "Cloud TPU"),
    (SRUN_ENV, False, "SLURM"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, False, "Open MPI"),
    ({"KUBERNETES_SERVICE_HOST": "h", "JOB_COMPLETION_INDEX": "0"}, False, "Kubernetes"),
  ],
)
def test_detects_cluster(env, on_cloud_tpu, source):
  assert distributed.resolve(env, on_cloud_tpu) == (source, {})


def test_local_device_ids_pass_through_to_detected_cluster():
  assert distributed.resolve(SRUN_ENV, False, local_device_ids=(2,)) == (
    "SLURM",
    {"local_device_ids": [2]},
  )


@pytest.mark.parametrize(
  "kwargs, env, message",
  [
    (dict(process_id=0), {}, "missing --coordinator_address, --num_processes"),
    (dict(EXPLICIT, num_processes=None), {}, "missing --num_processes"),
    (dict(EXPLICIT, process_id=2), {}, r"--process_id must be in \[0, 2\)"),
    (dict(EXPLICIT, process_id=-1), {}, r"--process_id must be in \[0, 2\)"),
    (dict(EXPLICIT, num_processes=0), {}, "--num_processes must be >= 1"),
    (dict(EXPLICIT, coordinator_address="10.0.0.1"), {}, "HOST:PORT"),
    (dict(EXPLICIT, coordinator_address="host:0"), {}, "HOST:PORT"),
    (dict(EXPLICIT, coordinator_address="host:65536"), {}, "HOST:PORT"),
    (dict(EXPLICIT, coordinator_address="::1:1234"), {}, "HOST:PORT"),
    (dict(EXPLICIT, local_device_ids=[0, 0]), {}, "distinct non-negative"),
    (dict(EXPLICIT, local_device_ids=[-1]), {}, "distinct non-negative"),
    (dict(local_device_ids=[0]), {}, "needs a multi-process job"),
    ({}, {**SRUN_ENV, "SLURM_STEP_NODELIST": None}, "not started by srun"),
    ({}, {"OMPI_COMM_WORLD_SIZE": "four"}, "OMPI_COMM_WORLD_SIZE must be an"),
  ],
)
def test_rejects_inconsistent_arguments(kwargs, env, message):
  env = {k: v for k, v in env.items() if v is not None}
  with pytest.raises(ValueError, match=message):
    distributed.resolve(env, on_cloud_tpu=False, **kwargs)


@pytest.mark.parametrize("address", ["localhost:1", "[::1]:65535", "node-7.cluster.internal:8476"])
def test_accepts_coordinator_addresses(address):
  plan = distributed.resolve({}, False, **dict(EXPLICIT, coordinator_address=address))
  assert plan.kwargs["coordinator_address"] == address


def test_flags_reach_initialize(monkeypatch):
  flag_values = flags.FlagValues()
  distributed.define_flags(flag_values)
  flag_values(
    [
      "prog",
      "--coordinator_address=h:1",
      "--num_processes=2",
      "--process_id=1",
      "--local_device_ids=0,1",
    ]
  )
  calls = []
  monkeypatch.setattr(distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  distributed.initialize_from_flags(flag_values)
  assert calls == [
    dict(coordinator_address="h:1", num_processes=2, process_id=1, local_device_ids=[0, 1])
  ]

  flag_values(["prog", "--local_device_ids=0,gpu1"])
  with pytest.raises(ValueError, match="comma-separated integers"):
    distributed.initialize_from_flags(flag_values)


def test_explains_a_cluster_jax_cannot_configure(monkeypatch):
  def jax_initialize(**kwargs):
    del kwargs
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", jax_initialize)
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
  with pytest.raises(
    RuntimeError,
    match="Open MPI environment found, but JAX could not configure itself .* Pass --coordinator",
  ):
    distributed.initialize()


def test_cloud_tpu_hosts_are_told_by_their_pci_devices(tmp_path, monkeypatch):
  for name, vendor in (("0000:00:04.0", "0x1ae0"), ("0000:00:05.0", "0x8086")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "vendor").write_text(vendor + "\n")
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # libtpu present.
  assert distributed._on_cloud_tpu_vm(str(tmp_path))
  (tmp_path / "0000:00:04.0" / "vendor").write_text("0x10de\n")  # A GPU, not a TPU.
  assert not distributed._on_cloud_tpu_vm(str(tmp_path))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  assert not distributed._on_cloud_tpu_vm(str(tmp_path))


_WORKER = """
from absl import app
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from crate_jax import distributed

distributed.define_flags()

def main(_):
  distributed.initialize_from_flags()
  distributed.initialize_from_flags()  # A second call is a no-op.
  mesh = Mesh(np.array(jax.devices()), ('data',))
  local = np.full((1,), jax.process_index() + 1.0, np.float32)
  x = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P('data')), local)
  total = jax.jit(lambda a: a.sum())(x)
  print(f'RESULT {jax.process_count()} {jax.device_count()} {float(total)}')

app.run(main)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_job(argvs, envs):
  """Runs one _WORKER per argv/env; returns their stdouts."""
  base = {
    k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_", "XLA_"))
  }
  base.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, *argv],
      env={**base, **env},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for argv, env in zip(argvs, envs)
  ]
  try:
    outs = [p.communicate(timeout=60)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


@pytest.mark.parametrize("launcher", ["flags", "slurm"])
def test_two_process_job_on_localhost(launcher):
  port = _free_port()
  if launcher == "flags":
    argvs = [
      [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
      for i in range(2)
    ]
    envs = [{}, {}]
  else:  # What `srun --ntasks=2` sets, with JAX's coordinator port override.
    argvs = [[], []]
    envs = [
      dict(
        SLURM_JOB_ID="1",
        SLURM_NTASKS="2",
        SLURM_PROCID=str(i),
        SLURM_LOCALID=str(i),
        SLURM_STEP_NODELIST="localhost",
        JAX_COORDINATOR_PORT=str(port),
      )
      for i in range(2)
    ]
  for out in _run_job(argvs, envs):
    # 2 processes, 2 global devices, and 1 + 2 summed across processes.
    assert "RESULT 2 2 3.0" in out, out
