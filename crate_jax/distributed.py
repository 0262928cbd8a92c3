"""Joins this process to a multi-process (multi-host) JAX job.

`crate_jax.main` calls `define_flags()` at import time and
`initialize_from_flags()` first thing in `main()`, before any JAX computation.

Flags:
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
      An explicit job: all three or none.
  --local_device_ids=0,1
      The local accelerators this process uses (default: all of them; one per
      process under SLURM and Open MPI on GPUs).

Without the first three flags, the environment decides:
  * Cloud TPU VM (single- or multi-host, multislice, GKE): JAX configures
    itself from the TPU metadata. Worth it even on one host, for preemption
    notices and multi-host checkpoint coordination.
  * SLURM job step with SLURM_NTASKS > 1 (started by `srun`), Open MPI with
    OMPI_COMM_WORLD_SIZE > 1, or an indexed Kubernetes Job: JAX's cluster
    auto-detection.
  * Anything else: a single process; jax.distributed is not initialised.
"""

from collections.abc import Mapping
from collections.abc import Sequence
import glob
import importlib.util
import os
import re
from typing import Any
from typing import NamedTuple

from absl import flags
from absl import logging

_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d{1,5})")


class Plan(NamedTuple):
  """How this process joins the job."""

  source: str  # 'flags', or the name of the detected cluster environment.
  kwargs: dict[str, Any]  # Arguments for jax.distributed.initialize.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the flags described in the module docstring."""
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of the coordinator service that process 0 starts. Leave "
    "unset on Cloud TPU, SLURM (srun) and Open MPI, where it is detected.",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "num_processes", None, "Number of processes in the job.", flag_values=flag_values
  )
  flags.DEFINE_integer(
    "process_id", None, "Index of this process, in [0, num_processes).", flag_values=flag_values
  )
  flags.DEFINE_list(
    "local_device_ids",
    None,
    "Comma-separated ids of the local accelerators this process uses "
    "(default: all; one per process under SLURM and Open MPI).",
    flag_values=flag_values,
  )


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Calls `initialize` with the flags from `define_flags`."""
  ids = flag_values.local_device_ids
  try:
    ids = None if ids is None else [int(i) for i in ids]
  except ValueError:
    raise ValueError(f"--local_device_ids must be comma-separated integers, got {ids}.") from None
  initialize(
    coordinator_address=flag_values.coordinator_address,
    num_processes=flag_values.num_processes,
    process_id=flag_values.process_id,
    local_device_ids=ids,
  )


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
) -> None:
  """Initialises jax.distributed when this is a multi-process job.

  Must run before anything that initialises a JAX backend (computations,
  `jax.devices()`, ...). Safe to call more than once.

  Args:
    coordinator_address: HOST:PORT of process 0's coordinator service.
    num_processes: Number of processes in the job.
    process_id: Index of this process.
    local_device_ids: Local accelerators this process uses.

  Raises:
    ValueError: Inconsistent arguments or environment.
    RuntimeError: A cluster was detected but JAX could not configure itself.
  """
  import jax  # pylint: disable=g-import-not-at-top  # Here: defining the flags needs no JAX.

  if jax.distributed.is_initialized():
    logging.info("jax.distributed is already initialised.")
    return
  plan = resolve(
    os.environ, _on_cloud_tpu_vm(), coordinator_address, num_processes, process_id, local_device_ids
  )
  if plan is None:
    logging.info("No multi-process flags or cluster found: single process.")
  else:
    logging.info("Initialising jax.distributed (%s): %s", plan.source, plan.kwargs)
    try:
      jax.distributed.initialize(**plan.kwargs)
    except ValueError as e:
      if plan.source == "flags":
        raise
      raise RuntimeError(
        f"{plan.source} environment found, but JAX could not configure "
        f"itself from it ({e}). Pass --coordinator_address, "
        "--num_processes and --process_id explicitly."
      ) from e
  logging.info(
    "Process %d of %d with %d of %d devices: %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.local_devices(),
  )


def resolve(
  env: Mapping[str, str],
  on_cloud_tpu: bool,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
) -> Plan | None:
  """Decides how to initialise jax.distributed; None means a single process.

  Args:
    env: Environment variables of this process.
    on_cloud_tpu: Whether this host has Cloud TPU chips.
    coordinator_address: See `initialize`.
    num_processes: See `initialize`.
    process_id: See `initialize`.
    local_device_ids: See `initialize`.

  Returns:
    Arguments for jax.distributed.initialize, from the explicit arguments if
    any are given, else from the environment (see the module docstring).

  Raises:
    ValueError: Inconsistent arguments or environment.
  """
  kwargs = {}
  if local_device_ids is not None:
    ids = list(local_device_ids)
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
      raise ValueError(f"--local_device_ids must be distinct non-negative integers, got {ids}.")
    kwargs["local_device_ids"] = ids

  given = dict(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  if any(v is not None for v in given.values()):
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
      raise ValueError(
        "--coordinator_address, --num_processes and --process_id go "
        f"together; missing {', '.join(missing)}."
      )
    if not _is_host_port(coordinator_address):
      raise ValueError(
        "--coordinator_address must be HOST:PORT, e.g. 10.0.0.1:1234 or "
        f"[::1]:1234, got {coordinator_address!r}."
      )
    if num_processes < 1:
      raise ValueError(f"--num_processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
      raise ValueError(
        f"--process_id must be in [0, {num_processes}) for "
        f"--num_processes={num_processes}, got {process_id}."
      )
    return Plan("flags", given | kwargs)

  cluster = _detect_cluster(env, on_cloud_tpu)
  if cluster is None:
    if kwargs:
      raise ValueError(
        "--local_device_ids needs a multi-process job: pass "
        "--coordinator_address, --num_processes, --process_id."
      )
    return None
  return Plan(cluster, kwargs)


def _detect_cluster(env: Mapping[str, str], on_cloud_tpu: bool) -> str | None:
  """Names the multi-process environment that JAX can configure itself from."""
  if on_cloud_tpu:
    return "Cloud TPU"
  if "SLURM_JOB_ID" in env and _int(env, "SLURM_NTASKS") > 1:
    if "SLURM_STEP_NODELIST" not in env:
      raise ValueError(
        f"SLURM job with SLURM_NTASKS={env['SLURM_NTASKS']}, but this "
        "process was not started by srun: run `srun python -m "
        "crate_jax.main ...` to start one process per task."
      )
    return "SLURM"
  if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
    return "Kubernetes"
  return None


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, 0))
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {env[name]!r}.") from None


def _is_host_port(address: str) -> bool:
  match = _HOST_PORT.fullmatch(address)
  return bool(match) and 0 < int(match[2]) < 65536


# PCI vendor id of Google's TPU chips, as the kernel lists them under /sys/bus/pci/devices.
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _on_cloud_tpu_vm(pci_devices: str = "/sys/bus/pci/devices") -> bool:
  """Whether this host has Cloud TPU chips (on its PCI bus) and libtpu to drive them."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  for vendor in glob.glob(os.path.join(pci_devices, "*", "vendor")):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False
