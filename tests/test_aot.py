"""The ahead-of-time check (`crate_jax.aot`): memory and FLOPs of compiled train steps.

The compiled cases run in one fresh process with XLA:CPU flags that compile these small
programs several times faster (this file runs as a script, like tests/test_sharding.py);
the command line is run once on 4 simulated devices, alongside.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

from absl import app
import pytest

from crate_jax import aot

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
MODEL = dict(width=64, depth=2, heads=4, patch=4)
# name -> (model_name, model fields); a tiny model at 16 px (17 tokens), batch 32.
CASES = {
  "unrolled": ("crate", {}),
  "scan": ("crate", {"scan_layers": True}),
  "scan_remat": ("crate", {"scan_layers": True, "remat_policy": "full"}),
  "alpha": ("crate_alpha", {}),
}


def _config(model_name, fields):
  from configs import demo  # pylint: disable=g-import-not-at-top
  from crate_jax import config_utils  # pylint: disable=g-import-not-at-top

  config = demo.get_config(",".join(f"{k}={v}" for k, v in MODEL.items()))
  if model_name != "crate":
    config.model_name = model_name
    config.model = config_utils.model_config(
      model_name, width=64, depth=2, heads=4, patch_size=(4, 4)
    )
  config.model.update(fields)
  config.input.image_size = 16
  config.input.global_batch_size = 32
  return config


def _worker(out_path: str) -> None:
  import dataclasses  # pylint: disable=g-import-not-at-top

  reports = {name: dataclasses.asdict(aot.analyze(_config(*case))) for name, case in CASES.items()}
  pathlib.Path(out_path).write_text(json.dumps(reports))


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE, **extra)
  return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("aot") / "reports.json"
  # Does not fit in 1 MiB: exit status 1 after the report.
  cli = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "crate_jax.aot",
      "--config=configs/demo.py:width=64,depth=1,heads=4,patch=4",
      "--num_devices=4",
      "--config.mesh.axes=(('data', 2), ('fsdp', 2), ('tensor', 1))",
      "--config.input.global_batch_size=32",
      "--device_memory_gb=0.001",
    ],
    cwd=REPO,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    worker = subprocess.run(
      [sys.executable, __file__, str(out)],
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=400,
    )
    cli_output = cli.communicate(timeout=200)[0]
  finally:
    cli.kill()
  assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
  reports = {k: aot.Report(**v) for k, v in json.loads(out.read_text()).items()}
  return {"reports": reports, "cli_output": cli_output, "cli_status": cli.returncode}


def test_remat_reduces_temporaries(runs):
  reports = runs["reports"]
  scan, remat = reports["scan"], reports["scan_remat"]
  assert remat.temp_bytes < 0.7 * scan.temp_bytes
  assert remat.argument_bytes == scan.argument_bytes  # Same state and batch.


def test_scan_compiles_one_layer_body(runs):
  reports = runs["reports"]
  assert reports["scan"].hlo_instructions < 0.85 * reports["unrolled"].hlo_instructions
  assert reports["scan"].num_params == reports["unrolled"].num_params
  # XLA counts a loop body once: no misleading FLOPs for scanned layers.
  assert reports["scan"].compiled_flops is None and "scan_layers" in reports["scan"].flops_note


@pytest.mark.parametrize("name", ["unrolled", "alpha"])
def test_analytic_flops_match_the_compiled_count(runs, name):
  report = runs["reports"][name]
  # The compiled count adds normalisations, softmax and the optimizer to the matmuls.
  assert 1.0 <= report.compiled_flops / report.model_flops < 1.25, report


def test_command_reports_and_fails_when_it_does_not_fit(runs):
  output = runs["cli_output"]
  assert runs["cli_status"] == 1, output[-3000:]
  assert "4 cpu devices" in output and "mesh data 2 x fsdp 2 x tensor 1" in output, output
  assert "XLA's CPU compiler: approximate" in output
  for field in ("arguments", "outputs", "aliased", "temporaries", "total"):
    assert f"  {field} " in output
  assert "DOES NOT FIT" in output and "--device_memory_gb" in output


def test_fits_compares_the_total_with_device_memory():
  report = aot.Report(
    description="",
    num_params=1,
    mesh={"data": 1},
    platform="tpu",
    device_kind="TPU v4",
    argument_bytes=10,
    output_bytes=5,
    alias_bytes=5,
    temp_bytes=20,
    code_bytes=0,
    peak_bytes=None,
    compiled_flops=None,
    flops_note="",
    model_flops=None,
    compile_seconds=0.0,
    hlo_instructions=1,
  )
  assert report.total_bytes == 30 and report.fits is None
  assert aot.Report(**{**vars(report), "device_memory_bytes": 30}).fits
  assert not aot.Report(**{**vars(report), "device_memory_bytes": 29}).fits


def test_device_memory_from_stats_table_or_flag():
  def device(kind, platform="tpu", stats=None):
    return types.SimpleNamespace(device_kind=kind, platform=platform, memory_stats=lambda: stats)

  gib = aot.GiB
  assert (
    aot.device_memory(device("NVIDIA H100 80GB HBM3", "gpu", {"bytes_limit": 7 * gib}))[0]
    == 7 * gib
  )
  assert aot.device_memory(device("TPU v5 lite"))[0] == 16 * gib
  assert aot.device_memory(device("TPU v5"))[0] == 95 * gib
  assert aot.device_memory(device("TPU v4"))[0] == 32 * gib
  assert aot.device_memory(device("cpu", "cpu"))[0] is None
  assert aot.device_memory(device("cpu", "cpu"), override_gb=2)[0] == 2 * gib


@pytest.mark.parametrize(
  "name, topology, wrap",
  [
    ("v4-32", "v4:2x2x4", (False,) * 3),
    ("v5p-128", "v5:4x4x4", (True,) * 3),
    ("v5p-2048", "v5:8x8x16", (True,) * 3),
    ("v5e-256", "v5e:16x16", (True, True, False)),
    ("v6e-64", "v6e:8x8", (False,) * 3),
  ],
)
def test_tpu_slice_shapes(name, topology, wrap):
  args = aot.tpu_slice(name)
  assert args["topology_name"] == topology and args["wrap"] == wrap


def test_topology_without_libtpu_says_what_to_install():
  import importlib.util  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed")
  with pytest.raises(app.UsageError, match=r"jax\[tpu\].*--num_devices"):
    aot.tpu_topology("v5p-128")
  with pytest.raises(app.UsageError, match="accelerator type"):
    aot.tpu_slice("v5p")


def test_topology_compiles_with_the_tpu_compiler_without_a_tpu():
  """Where libtpu is installed (not in CI): the real TPU compiler, nothing run on a device."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("needs libtpu (pip install libtpu, the version jax pins)")
  result = subprocess.run(
    [sys.executable, "-m", "crate_jax.aot", "--config=configs/demo.py", "--topology=v5e-4"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env={k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4 tpu devices" in result.stdout and ": fits" in result.stdout, result.stdout


if __name__ == "__main__":
  _worker(sys.argv[1])
