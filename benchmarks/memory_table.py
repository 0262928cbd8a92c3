r"""The per-device memory tables of docs/scaling.md, from `crate_jax.aot` on simulated devices.

Compiles the train step of `configs/imagenet.py` (Lion, float32, global batch 2048 at
224 px) on simulated CPU devices, without running it, and prints two Markdown tables:

1. CRATE-B/16 and CRATE-L/16 under data-parallel, FSDP and mixed meshes, remat none/full
   (layers scanned: XLA's CPU compiler realises remat's saving only inside the loop).
2. CRATE-B/16 on the FSDP mesh: scan_layers x remat_policy, with the program size.

XLA's CPU compiler produces these numbers; TPU and GPU compilers fuse and schedule
differently, so take them as estimates.

    python benchmarks/memory_table.py [--num_devices=16] [--batch_size=2048]

Takes about 15 minutes on 2 cores.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # The config files import `configs.common`.

from configs import imagenet  # noqa: E402  # After the sys.path change above.
from crate_jax import aot  # noqa: E402

_NUM_DEVICES = flags.DEFINE_integer("num_devices", 16, "Simulated CPU devices.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2048, "Global batch.")


def _gib(num_bytes: int) -> str:
  return f"{num_bytes / aot.GiB:.2f}"


def _analyze(variant: str, axes, **model_fields) -> aot.Report:
  config = imagenet.get_config(f"variant={variant},batch_size={_BATCH_SIZE.value}")
  config.mesh.axes = axes
  config.model.update(model_fields)
  return aot.analyze(config)


def main(argv: list[str]) -> None:
  del argv
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _NUM_DEVICES.value)
  n = _NUM_DEVICES.value
  meshes = {
    f"dp {n}": (("data", n), ("fsdp", 1), ("tensor", 1)),
    f"fsdp {n}": (("data", 1), ("fsdp", n), ("tensor", 1)),
    f"dp {n // 4} x fsdp 2 x tp 2": (("data", n // 4), ("fsdp", 2), ("tensor", 2)),
  }
  print(
    f"Lion, float32, global batch {_BATCH_SIZE.value} at 224 px, {n} simulated CPU "
    "devices; GiB per device; layers scanned.\n"
  )
  print("| model | mesh | remat | arguments (state + batch) | temporaries | total |")
  print("|---|---|---|---|---|---|")
  notes = []
  for variant in ("B/16", "L/16"):
    for mesh_name, axes in meshes.items():
      for remat in ("none", "full"):
        report = _analyze(variant, axes, remat_policy=remat, scan_layers=True)
        print(
          f"| CRATE-{variant} | {mesh_name} | {remat} | {_gib(report.argument_bytes)} | "
          f"{_gib(report.temp_bytes)} | {_gib(report.total_bytes)} |",
          flush=True,
        )
    notes.append(
      f"CRATE-{variant}: {report.num_params:,} parameters, "
      f"{report.model_flops / 1e12:.0f} model TFLOP per step."
    )
  print("\n" + "\n".join(notes))

  print(f"\nCRATE-B/16, fsdp {n}:\n")
  print("| scan_layers | remat | temporaries | total | HLO instructions | compile s |")
  print("|---|---|---|---|---|---|")
  for scan in (False, True):
    for remat in ("none", "dots", "full"):
      report = _analyze("B/16", meshes[f"fsdp {n}"], remat_policy=remat, scan_layers=scan)
      print(
        f"| {scan} | {remat} | {_gib(report.temp_bytes)} | {_gib(report.total_bytes)} | "
        f"{report.hlo_instructions:,} | {report.compile_seconds:.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
