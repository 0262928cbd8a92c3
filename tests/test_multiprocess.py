"""`python -m crate_jax.main` as a 2-process job on localhost, against one process.

Two processes with 2 CPU devices each (gloo collectives; a hybrid mesh: fsdp 2 within
each process, data 2 across them as across slices) train a tiny CRATE for 4 steps, then
resume to 6; one process on one device trains 6 steps. The global batch is the whole (16-image) training set without augmentation, so every step sees the
same images whatever the number of processes, and the loss trajectories must agree.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 150  # Per run of the trainer; a hung collective fails the test, never the CI job.
# Compiles these tiny programs several times faster (see tests/test_sharding.py).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, steps, *, num_processes, devices_per_process, mesh, log_dir):
  """Starts the trainer (to `steps`) as `num_processes` processes; `_finish` waits for them.

  `mesh` holds the `config.mesh` overrides.
  """
  args = [
    sys.executable,
    "-m",
    "crate_jax.main",
    f"--config=configs/demo.py:steps={steps},width=16,depth=2,heads=2,patch=8",
    f"--workdir={workdir}",
    "--config.input.dataset=crate_shapes/mp",
    f"--config.input.data_dir={data_dir}",
    "--config.input.image_size=16",
    "--config.input.global_batch_size=16",
    "--config.input.eval_batch_size=8",
    "--config.input.crop=none",
    "--config.input.flip=False",
    "--config.schedule.name=constant",
    "--config.schedule.warmup_steps=0",
    "--config.log_every_steps=1",
    "--config.evals.eval.every_steps=0",
    "--config.evals.rate_reduction.num_images=8",
    "--config.checkpoint_every_steps=2",
    *mesh,
  ]
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_", "TPU_"))
  }
  env.update(
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(REPO),
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} {FAST_COMPILE}",
  )
  port = _free_port()
  procs, logs = [], []
  for i in range(num_processes):
    job = (
      [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={i}",
      ]
      if num_processes > 1
      else []
    )
    log = log_dir / f"{pathlib.Path(workdir).name}_{steps}_process_{i}.log"
    with open(log, "w") as out:
      procs.append(
        subprocess.Popen(args + job, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
      )
    logs.append(log)
  return procs, logs


def _finish(procs, logs):
  """Waits for the processes of a run (killing them on timeout); returns their logs and pids."""
  try:
    for proc in procs:
      proc.wait(timeout=TIMEOUT_S)
  finally:
    for proc in procs:
      proc.kill()
  texts = [log.read_text() for log in logs]
  for proc, text in zip(procs, texts):
    assert proc.returncode == 0, text[-5000:]
  return {"logs": texts, "pids": [p.pid for p in procs]}


def _scalars(workdir, tag) -> dict[int, float]:
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  accumulator = event_accumulator.EventAccumulator(
    str(workdir), size_guidance={event_accumulator.SCALARS: 0}
  )
  accumulator.Reload()
  return {event.step: event.value for event in accumulator.Scalars(tag)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from crate_jax.data import crate_shapes

  tmp = tmp_path_factory.mktemp("multiprocess")
  data_dir = tmp / "data"
  # Built once here: the processes then only read it.
  crate_shapes.build(
    crate_shapes.CrateShapesConfig(name="mp", image_size=16, train_size=16, test_size=8), data_dir
  )
  # FSDP within a process, data parallelism across the two as if over a DCN (hybrid mesh).
  two = dict(
    num_processes=2,
    devices_per_process=2,
    log_dir=tmp,
    mesh=[
      "--config.mesh.axes=(('data', -1), ('fsdp', 2), ('tensor', 1))",
      "--config.mesh.dcn_data=2",
    ],
  )
  one = dict(num_processes=1, devices_per_process=1, log_dir=tmp, mesh=[])
  single = _start(tmp / "one", data_dir, 6, **one)  # Alongside: the 2-process job waits a lot.
  try:
    first = _finish(*_start(tmp / "two", data_dir, 4, **two))
  finally:
    single = _finish(*single)
  resumed = _finish(*_start(tmp / "two", data_dir, 6, **two))
  return {
    "two": tmp / "two",
    "one": tmp / "one",
    "first": first,
    "resumed": resumed,
    "single": single,
  }


def test_two_processes_follow_the_single_process_losses(runs):
  two, one = _scalars(runs["two"], "train/loss"), _scalars(runs["one"], "train/loss")
  assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(
    [two[s] for s in range(1, 7)], [one[s] for s in range(1, 7)], rtol=1e-5
  )
  assert one[6] < one[1]
  two_eval, one_eval = _scalars(runs["two"], "eval/loss"), _scalars(runs["one"], "eval/loss")
  assert sorted(two_eval) == [4, 6] and sorted(one_eval) == [6]  # At the end of each run.
  np.testing.assert_allclose(two_eval[6], one_eval[6], rtol=1e-5)


def test_processes_form_one_job(runs):
  for i, log in enumerate(runs["first"]["logs"]):
    assert f"Process {i} of 2 with 2 of 4 devices" in log, log[-3000:]
    assert "4 devices, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in log


def test_only_process_zero_writes_summaries(runs):
  events = sorted(p.name for p in runs["two"].rglob("events.out.tfevents.*"))
  # One file per run, each from process 0 (TensorBoard names them ...<host>.<pid>.<n>).
  writers = [runs[run]["pids"][0] for run in ("first", "resumed")]
  assert len(events) == 2, events
  assert sorted(int(name.split(".")[-2]) for name in events) == sorted(writers)
  assert (runs["two"] / "rate_reduction.png").exists()


def test_one_checkpoint_directory_with_every_process_data_state(runs):
  checkpoints = runs["two"] / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
  assert sorted(p.name for p in (checkpoints / "6" / "data").glob("process_*.json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  assert not list(runs["two"].glob("**/*orbax-checkpoint-tmp*"))


def test_resume_continues_from_the_saved_step(runs):
  for log in runs["resumed"]["logs"]:
    assert re.search(r"Resuming at step 4\b", log), log[-3000:]
  for log in runs["first"]["logs"]:
    assert re.search(r"Starting at step 0\b", log), log[-3000:]
