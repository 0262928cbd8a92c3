r"""Ahead-of-time check of a config: compiles its train step, reports memory and FLOPs.

    python -m crate_jax.aot --config=configs/imagenet.py:variant=B/16 [--config.FIELD=VALUE ...]

Compiles the train step for the configured mesh without running it or allocating the
state (abstract state from `jax.eval_shape`, inputs as `jax.ShapeDtypeStruct`s with their
shardings, `jax.jit(...).lower(...).compile()`), then prints the per-device memory of
`compiled.memory_analysis()`, the FLOPs per step of `compiled.cost_analysis()` next to an
analytic count, and whether the step fits the device. Exits with status 1 when it does
not. The devices it compiles for:

  (default)          the local devices (memory limit from `device.memory_stats()`).
  --num_devices=N    N simulated CPU devices: examine a 64-device mesh on a laptop. The
                     numbers are those of XLA's CPU compiler, which fuses and schedules
                     differently from the TPU and GPU compilers: a guide, not a promise.
                     Set --device_memory_gb to the target device's memory for a verdict.
  --topology=v5p-128 a TPU slice (v4-N, v5p-N, v5e-N, v6e-N; N as in the accelerator
                     type), compiled by the real TPU compiler through JAX's topology API;
                     needs libtpu (`pip install 'jax[tpu]'`), but no TPU. With
                     `config.mesh.dcn_data = S` it compiles for S such slices.

For example, CRATE-L/16 at batch 2048 on 16 simulated devices with FSDP and remat:

    python -m crate_jax.aot --config=configs/imagenet.py:variant=L/16 --num_devices=16 \
        --config.mesh.axes="(('data', 1), ('fsdp', 16), ('tensor', 1))" \
        --config.model.remat_policy=full --device_memory_gb=40
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import importlib.util
import math
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from crate_jax import config_utils
from crate_jax import optim
from crate_jax import sharding
from crate_jax import tasks
from crate_jax import train_state
from crate_jax.models import get_model

GiB = 1024**3

# HBM per device (GiB) by `device_kind`, first match; used where `memory_stats()` is not
# available (e.g. the compile-only devices of a topology).
KNOWN_DEVICE_MEMORY_GIB = (
  (r"TPU v4", 32),
  (r"TPU v5 ?(lite|e)", 16),
  (r"TPU v5", 95),
  (r"TPU v6", 32),
  (r"H200", 141),
  (r"H100", 80),
  (r"A100.*80", 80),
  (r"A100", 40),
)
# Accelerator-type prefix -> (topology generation, TensorCores per chip, torus dimensions).
_TPU_GENERATIONS = {
  "v4": ("v4", 2, 3),
  "v5p": ("v5", 2, 3),
  "v5e": ("v5e", 1, 2),
  "v5litepod": ("v5e", 1, 2),
  "v6e": ("v6e", 1, 2),
}


@dataclasses.dataclass
class Report:
  """What `analyze` found; memory in bytes per device, FLOPs per step over all devices."""

  description: str
  num_params: int
  mesh: dict[str, int]
  platform: str  # 'cpu', 'gpu', 'tpu'.
  device_kind: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  peak_bytes: int | None  # The compiler's own peak estimate, where it reports one.
  compiled_flops: float | None  # XLA's count, summed over devices; includes remat recompute.
  flops_note: str  # Why `compiled_flops` is missing, if it is.
  model_flops: float | None  # Analytic: 3 x forward matmul FLOPs of the global batch.
  compile_seconds: float  # Tracing, lowering and compiling.
  hlo_instructions: int  # Size of the optimised per-device program.
  device_memory_bytes: int | None = None
  device_memory_source: str = ""

  @property
  def total_bytes(self) -> int:
    """Live at once: arguments + outputs - donated (aliased) buffers + temporaries + code."""
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )

  @property
  def required_bytes(self) -> int:
    return max(self.total_bytes, self.peak_bytes or 0)

  @property
  def fits(self) -> bool | None:
    if self.device_memory_bytes is None:
      return None
    return self.required_bytes <= self.device_memory_bytes


def tpu_slice(name: str) -> dict[str, Any]:
  """`get_topology_desc` arguments of one TPU slice of accelerator type `name` ('v5p-128')."""
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not match:
    raise app.UsageError(
      f"--topology={name!r}: expected an accelerator type like v4-32, "
      f"v5p-128, v5e-256 or v6e-64 (prefixes {sorted(_TPU_GENERATIONS)})."
    )
  generation, cores_per_chip, rank = _TPU_GENERATIONS[match.group(1)]
  chips = int(match.group(2)) // cores_per_chip
  if chips < 4 or chips & (chips - 1):
    raise app.UsageError(
      f"--topology={name!r}: {chips} chips; only slices of 4, 8, 16, ... "
      "chips (a power of two) are supported."
    )
  # Slices grow by doubling the last of their smallest dimensions: 2x2x1, 2x2x2, 2x2x4,
  # 2x4x4, 4x4x4, ... and 2x2, 2x4, 4x4, 4x8, ... (the standard Cloud TPU shapes).
  dims = [2, 2, 1][:rank]
  while math.prod(dims) < chips:
    smallest = min(dims)
    dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
  # Wrap-around links: full 3-D tori from 4x4x4, 2-D ones along dimensions of 16.
  wrap = (
    tuple(min(dims) >= 4 for _ in dims) if rank == 3 else tuple(d == 16 for d in dims) + (False,)
  )
  return dict(
    topology_name=f"{generation}:{'x'.join(map(str, dims))}",
    chip_config_name="megacore" if cores_per_chip == 2 else "default",
    chips_per_host_bounds=(2, 2, 1),
    wrap=wrap,
  )


def tpu_topology(name: str, num_slices: int = 1) -> list[Any]:
  """Compile-only devices of `num_slices` TPU slices of type `name`; needs libtpu."""
  args = tpu_slice(name)
  if importlib.util.find_spec("libtpu") is None:
    raise app.UsageError(
      f"--topology={name} compiles with the TPU compiler, which comes with libtpu: "
      "`pip install 'jax[tpu]'` (no TPU needed). libtpu is not installed here; use "
      "--num_devices=N to examine an N-device mesh with the CPU compiler instead."
    )
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  return list(topologies.get_topology_desc(platform="tpu", num_slices=num_slices, **args).devices)


def device_memory(device: Any, override_gb: float | None = None) -> tuple[int | None, str]:
  """`(bytes, where the number comes from)` for one device; `(None, ...)` when unknown."""
  if override_gb:
    return int(override_gb * GiB), "--device_memory_gb"
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  # Compile-only devices, some backends.
    limit = None
  if limit:
    return int(limit), f"{device.device_kind} memory_stats()['bytes_limit']"
  for pattern, gib in KNOWN_DEVICE_MEMORY_GIB:
    if device.platform != "cpu" and re.search(pattern, device.device_kind):
      return gib * GiB, f"{device.device_kind}: {gib} GiB (table)"
  return None, f"unknown for {device.device_kind}; pass --device_memory_gb"


def analytic_flops_per_step(config: ml_collections.ConfigDict) -> float:
  """Model FLOPs of one train step: 3 x the forward matmuls (no remat recompute).

  The forward count is the model family's own (`Model.forward_flops`).
  """
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  return 3 * model.forward_flops(config.input.global_batch_size)


def analyze(
  config: ml_collections.ConfigDict,
  devices: Sequence[Any] | None = None,
  *,
  device_memory_gb: float | None = None,
) -> Report:
  """Compiles the train step of `config` for `devices` (default: all) and measures it."""
  config_utils.validate(config)
  devices = list(jax.devices() if devices is None else devices)
  mesh, rules = sharding.create_mesh(config, devices), sharding.logical_rules(config)
  config_utils.validate_batch(config, sharding.batch_divisor(mesh, rules))
  batch_size, image_size = config.input.global_batch_size, config.input.image_size
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  # The schedule's length changes no buffer: a nominal one avoids reading the dataset size.
  schedule = optim.create_schedule(config.schedule.name, base_lr=config.optimizer.lr, total_steps=1)
  start = time.perf_counter()
  # Shapes and logical specs outside the mesh: optax builds its state template with
  # concrete arrays, which must land on the host, not on a compile-only TPU mesh.
  abstract_params = train_state.abstract_params(model, image_size)
  tx = optim.create_optimizer(config.optimizer, schedule, abstract_params)
  abstract, specs = train_state.abstract_train_state(model, tx, image_size)
  with sharding.use_mesh(mesh, rules):
    shardings = sharding.state_shardings(specs, abstract, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    compiled = train_state.compile_train_step(
      tasks.get_task(config),
      model,
      tx,
      schedule,
      abstract,
      shardings,
      batch_sharding,
      batch_size=batch_size,
      grad_accum_steps=config.grad_accum_steps,
    )
  compile_seconds = time.perf_counter() - start

  memory = compiled.memory_analysis()
  flops, flops_note = train_state.compiled_flops(compiled), "not reported by this backend"
  if config.model.scan_layers:  # XLA's count takes a loop body once, not once per layer.
    flops, flops_note = None, "not comparable with scan_layers (the layer loop counts once)"
  dims = model.dims()
  description = (
    f"{config.model_name} width {dims['width']}, depth {dims['depth']}, "
    f"{dims['heads']} heads, patch {dims['patch_size'][0]}; global batch "
    f"{batch_size} at {image_size} px; remat_policy={config.model.remat_policy}, "
    f"scan_layers={config.model.scan_layers}, "
    f"grad_accum_steps={config.grad_accum_steps}, dtype={config.model.dtype}"
  )
  limit, source = device_memory(devices[0], device_memory_gb)
  return Report(
    description=description,
    num_params=sum(x.size for x in jax.tree.leaves(abstract.params)),
    mesh=dict(mesh.shape),
    platform=devices[0].platform,
    device_kind=devices[0].device_kind,
    argument_bytes=memory.argument_size_in_bytes,
    output_bytes=memory.output_size_in_bytes,
    alias_bytes=memory.alias_size_in_bytes,
    temp_bytes=memory.temp_size_in_bytes,
    code_bytes=memory.generated_code_size_in_bytes,
    # XLA:CPU's peak is not comparable (it leaves out the temporaries).
    peak_bytes=(
      getattr(memory, "peak_memory_in_bytes", 0) or None if devices[0].platform != "cpu" else None
    ),
    compiled_flops=flops * len(devices) if flops else None,
    flops_note=flops_note,
    model_flops=analytic_flops_per_step(config),
    compile_seconds=compile_seconds,
    hlo_instructions=sum(" = " in line for line in compiled.as_text().splitlines()),
    device_memory_bytes=limit,
    device_memory_source=source,
  )


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / GiB:8.3f} GiB"


def format_report(report: Report) -> str:
  lines = [
    report.description,
    f"{report.num_params:,} parameters; {math.prod(report.mesh.values())} {report.platform} "
    f"devices ({report.device_kind}), mesh "
    + " x ".join(f"{name} {size}" for name, size in report.mesh.items()),
    f"compiled in {report.compile_seconds:.1f} s to {report.hlo_instructions:,} HLO "
    "instructions per device",
    "",
    "Per-device memory of one train step"
    + (" (XLA's CPU compiler: approximate for TPU/GPU):" if report.platform == "cpu" else ":"),
    f"  arguments       {_gib(report.argument_bytes)}  state shards and batch shard",
    f"  outputs         {_gib(report.output_bytes)}  new state and metrics",
    f"  aliased         {_gib(-report.alias_bytes)}  donated state reused for the outputs",
    f"  temporaries     {_gib(report.temp_bytes)}  activations, gradients, collectives",
    f"  generated code  {_gib(report.code_bytes)}",
    f"  total           {_gib(report.total_bytes)}",
  ]
  if report.peak_bytes:
    lines.append(f"  compiler peak   {_gib(report.peak_bytes)}")
  flops = [
    f"{report.compiled_flops:.3e} compiled (XLA cost analysis, all devices; counts remat recompute)"
    if report.compiled_flops
    else f"compiled: {report.flops_note}"
  ]
  if report.model_flops:
    flops.append(f"{report.model_flops:.3e} analytic model FLOPs (3 x forward matmuls)")
  lines += ["", "FLOPs per step: " + "; ".join(flops), ""]
  if report.fits is None:
    lines.append(f"Device memory {report.device_memory_source}: cannot tell whether it fits.")
  else:
    verdict = "fits" if report.fits else "DOES NOT FIT"
    lines.append(
      f"Device memory {_gib(report.device_memory_bytes).strip()} "
      f"({report.device_memory_source}): {verdict}, "
      f"{report.required_bytes / report.device_memory_bytes:.0%} needed."
    )
  return "\n".join(lines)


def define_flags() -> None:
  """The command's flags; not defined on import, so that scripts can import this module."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with an argument: configs/imagenet.py:variant=B/16.",
    lock_config=True,
  )
  flags.DEFINE_string("topology", None, "Compile for a TPU slice, e.g. v5p-128 (needs libtpu).")
  flags.DEFINE_integer("num_devices", None, "Compile for this many simulated CPU devices.")
  flags.DEFINE_float(
    "device_memory_gb",
    None,
    "Memory per device in GiB (default: from the device or a table of known ones).",
  )
  flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  args = flags.FLAGS
  if args.topology and args.num_devices:
    raise app.UsageError("Pass --topology or --num_devices, not both.")
  devices = None
  if args.num_devices:  # Must precede the first use of a backend.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.num_devices)
  elif args.topology:
    devices = tpu_topology(args.topology, args.config.mesh.dcn_data)
  report = analyze(args.config, devices, device_memory_gb=args.device_memory_gb)
  print(format_report(report), flush=True)
  if report.fits is False:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
