"""Published checkpoints in and out: PyTorch CRATE and Flax CRATE-alpha.

    model, variables = load_published("crate_base.pth")            # sizes from shapes
    logits, _ = model.apply(variables, images_nhwc)                  # = the published logits
    export_published(model, variables["params"], "crate_base.safetensors")

Reads PyTorch CRATE state dicts from `.pth`/`.pt` (only with torch installed, and only
with `weights_only=True`), `.safetensors` or `.npz` with the published names; bare state
dicts, `{'state_dict': ...}` with `module.` prefixes and `{'model': ...}` are accepted.
Reads CRATE-alpha `.npz` files of flattened Flax names, skipping optimiser state.
Sizes are inferred from shapes; what shapes cannot tell (`heads` when the width matches
no preset, `pool`, non-square `image_size`/`patch_size`) is passed as an override.

Each published format is one module here (`crate.py`, `crate_alpha.py`): `matches(state)`,
`infer(state, overrides) -> model fields` and `mapping(fields) -> [Entry]`; `FORMATS` lists
them. Files are read by `files.py`.

Command line:
    python -m crate_jax.convert --input=crate_base.pth --output=ours.npz [--heads=12 --pool=cls]
    python -m crate_jax.convert --input=ours.npz --output=published.safetensors --to=published
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import importlib
import json
import os
import sys
from types import ModuleType
from typing import Any

from absl import app
from absl import flags
import flax
import flax.linen as nn
import jax
import numpy as np

from crate_jax.convert.common import ConversionError
from crate_jax.convert.common import StateDict
from crate_jax.convert.files import is_optimizer_key
from crate_jax.convert.files import read_state_dict
from crate_jax.models import common as model_common
from crate_jax.models import model_class
from crate_jax.models import model_name

__all__ = [
  "ConversionError",
  "export_published",
  "from_published",
  "load_ours",
  "load_published",
  "read_state_dict",
  "save_ours",
  "to_published",
]

FORMATS = ("crate", "crate_alpha", "crate_mae")  # Modules crate_jax.convert.<name>.


def _format(name: str) -> ModuleType:
  return importlib.import_module(f"crate_jax.convert.{name}")


def detect_format(state: StateDict) -> ModuleType:
  """The published format module whose names `state` uses."""
  for name in FORMATS:
    if _format(name).matches(state):
      return _format(name)
  raise ConversionError(
    "Not a published checkpoint of a known format ("
    + "; ".join(_format(name).DESCRIPTION for name in FORMATS)
    + f"); first keys: {sorted(state)[:8]}."
  )


def _format_of_model(model: nn.Module) -> ModuleType:
  name = model_name(model)
  for fmt in FORMATS:
    if _format(fmt).MODEL == name:
      return _format(fmt)
  raise ConversionError(f"No published format for the {name} model.")


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def from_published(state: StateDict, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Builds `(model, {'params': params})` from a published state dict (see module doc)."""
  fmt = detect_format(state)
  overrides = dict(overrides)
  dims = fmt.infer(state, overrides)
  entries = fmt.mapping(dims)
  known = {name for name, *_ in entries}
  unexpected = sorted(k for k in state if k not in known and not is_optimizer_key(k))
  if unexpected:
    raise ConversionError(f"Unexpected keys for a {fmt.MODEL} checkpoint: {unexpected[:10]}.")
  clash = sorted(set(overrides) & set(dims))
  if clash:
    raise ConversionError(
      f"{clash} are fixed by the checkpoint's shapes ({ {k: dims[k] for k in clash} }) and cannot "
      f"be overridden; change the head or sizes after loading (e.g. fine-tuning re-initialises "
      f"the head)."
    )
  model = model_class(fmt.MODEL)(**dims, **overrides)
  expected = _expected_shapes(model, dims)
  flat = {}
  for name, path, to_ours, _ in entries:
    if not path:  # A constant of the published model, not a parameter: `to_ours` checks it.
      to_ours(state.get(name))
      continue
    if name not in state:
      raise ConversionError(f"Missing key {name!r} (expected shape for {path}: {expected[path]}).")
    try:
      value = to_ours(state[name])
    except ValueError as e:
      raise ConversionError(
        f"{name} has shape {state[name].shape}, which does not fit {path} "
        f"with shape {expected[path]}."
      ) from e
    if value.shape != expected[path]:
      raise ConversionError(
        f"{name} has shape {state[name].shape}, which gives {value.shape} for {path}; the model "
        f"inferred from the other keys ({dims}) expects {expected[path]}."
      )
    flat[tuple(path.split("/"))] = np.asarray(value, np.float32)
  params = flax.traverse_util.unflatten_dict(flat)
  if model.scan_layers:
    params = model_common.stack_layer_params(params)
  return model, {"params": params}


def load_published(path: str, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Reads a published checkpoint file and returns `(model, {'params': params})`.

  Overrides are model fields: `heads`, `pool`, `image_size`, `patch_size` where shapes cannot
  tell (contradictions are errors), or options such as `dtype`, `scan_layers`, `remat_policy`.
  """
  return from_published(read_state_dict(path), **overrides)


def to_published(model: nn.Module, params: Mapping[str, Any]) -> StateDict:
  """Our parameters -> the published names and layouts (exact inverse of `from_published`)."""
  fmt = _format_of_model(model)
  params = nn.unbox(dict(params))
  if getattr(model, "scan_layers", False):
    params = model_common.unstack_layer_params(params)
  flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  dims = model.dims()
  return {
    name: np.ascontiguousarray(to_pub(flat[path] if path else None))
    for name, path, _, to_pub in fmt.mapping(dims)
  }


def export_published(model: nn.Module, params: Mapping[str, Any], path: str) -> None:
  """Writes our parameters under the published names to `.npz` or `.safetensors`."""
  state = to_published(model, params)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    np.savez(path, **state)
  elif ext == ".safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    save_file(state, path)
  else:
    raise ConversionError(f"Export to .npz or .safetensors, not {ext!r}.")


def _expected_shapes(model: nn.Module, dims: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  images = jax.ShapeDtypeStruct((1, *dims["image_size"], 3), np.float32)
  unscanned = model.clone(scan_layers=False) if getattr(model, "scan_layers", False) else model
  shapes = jax.eval_shape(lambda x: unscanned.init(jax.random.PRNGKey(0), x), images)
  flat = flax.traverse_util.flatten_dict(nn.unbox(shapes["params"]))
  return {"/".join(k): tuple(v.shape) for k, v in flat.items()}


# --------------------------------------------------------------------------------------
# Our own files: parameters in our naming with the model's fields.
# --------------------------------------------------------------------------------------


_MODEL_KEY = "__model__"
_NOT_SAVED = ("parent", "name", "dtype", "variant")  # dtype is a compute choice.


def save_ours(path: str, model: nn.Module, params: Mapping[str, Any]) -> None:
  """Writes parameters in our naming to `.npz`, with the model's family and fields."""
  fields = {
    f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in _NOT_SAVED
  }
  fields.update(model.dims(), image_size=model_common.pair(model.image_size))
  meta = dict(family=model_name(model), fields=jax.tree.map(lambda x: x, fields))
  flat = flax.traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()}, **{_MODEL_KEY: json.dumps(meta)})


def load_ours(path: str) -> tuple[nn.Module, dict[str, Any]]:
  """Reads a file written by `save_ours`."""
  try:
    with np.load(path, allow_pickle=False) as data:
      if _MODEL_KEY not in data.files:
        raise ConversionError(
          f"{path!r} was not written by crate_jax.convert (no {_MODEL_KEY} entry)."
        )
      meta = json.loads(str(data[_MODEL_KEY]))
      flat = {k: data[k] for k in data.files if k != _MODEL_KEY}
  except (OSError, ValueError) as e:
    if isinstance(e, ConversionError):
      raise
    raise ConversionError(f"{path!r} is not a readable .npz file: {e}") from e
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["fields"].items()}
  model = model_class(meta["family"])(**fields)
  return model, {"params": flax.traverse_util.unflatten_dict(flat, sep="/")}


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _main(argv):
  del argv
  try:
    _convert(flags.FLAGS)
  except ValueError as e:  # ConversionError, and model errors (e.g. a patch not dividing).
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _convert(f) -> None:
  directory = os.path.dirname(os.path.abspath(f.output))
  if not os.path.isdir(directory):
    raise ConversionError(f"--output={f.output!r}: the directory {directory!r} does not exist.")
  if f.to == "ours" and not f.output.endswith(".npz"):
    raise ConversionError(f"--output={f.output!r}: --to=ours writes a .npz file; name it so.")
  if f.to == "ours":
    overrides = {k: getattr(f, k) for k in ("heads", "pool") if getattr(f, k) is not None}
    if f.image_size:
      try:
        overrides["image_size"] = tuple(int(v) for v in f.image_size.split(","))
      except ValueError:
        raise ConversionError(f"--image_size={f.image_size!r} is not H,W.") from None
    model, variables = load_published(f.input, **overrides)
    save_ours(f.output, model, variables["params"])
    n = sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
    print(f"{model_name(model)} {model.dims()}: {n:,} parameters -> {f.output}")
  else:
    model, variables = load_ours(f.input)
    export_published(model, variables["params"], f.output)
    print(f"wrote {f.output} with the published names")


def run():
  flags.DEFINE_string("input", None, "Checkpoint to read.", required=True)
  flags.DEFINE_string(
    "output",
    None,
    "File to write: .npz for --to=ours; .npz or .safetensors for --to=published.",
    required=True,
  )
  flags.DEFINE_enum(
    "to",
    "ours",
    ["ours", "published"],
    "ours: published file -> our names (.npz with the model's sizes); "
    "published: a file written by --to=ours -> the published names.",
  )
  flags.DEFINE_integer("heads", None, "Number of heads, where shapes cannot tell.")
  flags.DEFINE_enum("pool", None, ["cls", "mean"], "Pooling of the classifier.")
  flags.DEFINE_string("image_size", None, "H,W the position embedding was learned at.")
  app.run(_main)
