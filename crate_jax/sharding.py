"""Device mesh, logical-axis rules, and the shardings of the train state and batches.

Parameters and activations carry logical axis names (see `crate_jax.models.common`); the
config's rules map them to mesh axes, so one model definition runs data-parallel, FSDP or
tensor-parallel by changing `config.mesh` and `config.sharding.rules` only:

    mesh = create_mesh(config)                  # e.g. data x fsdp x tensor
    rules = logical_rules(config)
    with use_mesh(mesh, rules):                 # needed while tracing the model
      jax.jit(..., in_shardings=state_shardings(specs, shapes, mesh, rules))

The mesh axes are `AxisType.Auto`: the compiler propagates shardings from the inputs,
outputs and the models' `nn.with_logical_constraint` hints (GSPMD style). Explicit axes
(the `jax.make_mesh` default) would make every sharding part of the array types and need
explicit out-shardings on ambiguous ops inside the models, which are written as plain
`jnp` code.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import math
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

LogicalRules = Sequence[tuple[str, Any]]


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
  """Resolves one `-1` axis size to the devices left over; checks the product."""
  names = [name for name, _ in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"Mesh axis names must be distinct, got {names}.")
  sizes = {name: int(size) for name, size in axes}
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"Mesh axis sizes must be positive, with at most one -1; got {dict(axes)}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if num_devices % fixed:
    raise ValueError(f"Mesh {dict(axes)} does not divide the {num_devices} devices.")
  if fill:
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
      f"Mesh {sizes} has {math.prod(sizes.values())} devices, but there are "
      f"{num_devices}; use -1 for one axis to take the rest."
    )
  return sizes


def create_mesh(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """The device mesh of `config.mesh`: `axes` ((name, size), ...) and `dcn_data`.

  With `dcn_data > 1` the 'data' axis spans `dcn_data` slices (or processes, where devices
  carry no slice index) over the data-centre network, and the other axes stay within a
  slice on the fast interconnect: only data-parallel gradient reductions cross slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(config.mesh.axes)
  names = tuple(name for name, _ in axes)
  dcn = config.mesh.dcn_data
  if dcn <= 1:
    shape = mesh_shape(axes, len(devices))
    return jax.make_mesh(
      tuple(shape.values()), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )
  if "data" not in names:
    raise ValueError(f"mesh.dcn_data={dcn} needs a 'data' axis in mesh.axes={axes}.")
  if len(devices) % dcn:
    raise ValueError(f"mesh.dcn_data={dcn} does not divide the {len(devices)} devices.")
  per_slice = mesh_shape(axes, len(devices) // dcn)
  dcn_shape = [dcn if name == "data" else 1 for name in names]
  # Granules are TPU slices where the devices span `dcn` of them, otherwise processes (GPU
  # nodes; CPU devices report slice_index 0 for every process).
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  device_array = mesh_utils.create_hybrid_device_mesh(
    list(per_slice.values()), dcn_shape, devices, process_is_granule=num_slices != dcn
  )
  return Mesh(device_array, names, axis_types=(AxisType.Auto,) * len(names))


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """`config.sharding.rules` as flax logical-axis rules; checks the mesh axes they name."""
  rules = tuple(
    (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
    for name, axes in config.sharding.rules
  )
  known = {name for name, _ in config.mesh.axes}
  for name, axes in rules:
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in known:
        raise ValueError(
          f"sharding.rules maps {name!r} to mesh axis {axis!r}, which is not in "
          f"mesh.axes {sorted(known)}."
        )
  return rules


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Activates the mesh and the logical rules, so that the models' constraints apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))


def state_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules: LogicalRules) -> Any:
  """NamedShardings for a tree (e.g. the train state) of logical PartitionSpecs and shapes.

  A mesh axis that does not divide its dimension (e.g. 10 classes over 4 tensor shards)
  is dropped for that array, which is then replicated along it, with a log line: jit
  requires divisible shardings for its inputs and outputs.
  """

  def convert(spec: P, shape: Any) -> NamedSharding:
    mesh_axes = list(nn.logical_to_mesh_axes(spec, rules))
    for dim, axes in enumerate(mesh_axes):
      size = _axis_size(mesh, axes)
      if shape.shape[dim] % size:
        logging.info(
          "Replicating dim %d (size %d) of a %s array: mesh axes %s (%d) do not divide it.",
          dim,
          shape.shape[dim],
          shape.shape,
          axes,
          size,
        )
        mesh_axes[dim] = None
    return NamedSharding(mesh, P(*mesh_axes))

  return jax.tree.map(convert, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
  """Sharding of a batch: the leading axis over the mesh axes of the logical 'batch'."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(P("batch"), rules))


def batch_divisor(mesh: Mesh, rules: LogicalRules) -> int:
  """How many shards the batch axis is split into: the global batch must be a multiple."""
  return _axis_size(mesh, nn.logical_to_mesh_axes(P("batch"), rules)[0])


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's part of a batch -> global arrays (the global batch is over all processes)."""
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
