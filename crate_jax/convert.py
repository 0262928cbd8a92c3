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

Command line:
    python -m crate_jax.convert --input=crate_base.pth --output=ours.npz [--heads=12 --pool=cls]
    python -m crate_jax.convert --input=ours.npz --output=published.safetensors --to=published
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import os
import re
import sys
from typing import Any
import zipfile

from absl import app
from absl import flags
import flax
import flax.linen as nn
import jax
import numpy as np

from crate_jax.models import common
from crate_jax.models import crate
from crate_jax.models import crate_alpha

StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint that cannot be read or does not fit the requested model."""


# --------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------


def read_state_dict(path: str) -> StateDict:
  """Reads a flat name -> array mapping from `.pth`/`.pt`/`.bin`, `.safetensors` or `.npz`."""
  if not os.path.exists(path):
    raise ConversionError(f"No checkpoint at {path!r}.")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".pth", ".pt", ".bin", ".ckpt"):
    state = _read_torch(path)
  elif ext == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    try:
      state = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
      raise ConversionError(f"{path!r} is not a readable safetensors file: {e}") from e
  elif ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        state = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
      raise ConversionError(f"{path!r} is not a readable .npz file: {e}") from e
  else:
    raise ConversionError(
      f"Unsupported checkpoint extension {ext!r} for {path!r}: use .pth/.pt (PyTorch), "
      f".safetensors or .npz."
    )
  return _unwrap(state)


def _read_torch(path: str) -> StateDict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(
      f"Reading {path!r} needs PyTorch: `pip install -e '.[torch]'`, or convert the file to "
      f".safetensors/.npz elsewhere."
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError, RuntimeError for corrupt zips, ...
    raise ConversionError(
      f"Refusing to load {path!r}: it cannot be read with torch.load(weights_only=True) "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Only plain tensors "
      f"and containers are accepted; arbitrary pickled objects are never unpickled."
    ) from e
  return _flatten_torch(obj)


def _flatten_torch(obj: Any) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top

  if isinstance(obj, Mapping):
    for container in ("state_dict", "model", "model_state_dict", "module"):
      if container in obj and isinstance(obj[container], Mapping):
        obj = obj[container]
        break
    return {
      k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
      for k, v in obj.items()
      if isinstance(v, torch.Tensor)
    }
  raise ConversionError(f"Expected a state dict (mapping of tensors), got {type(obj).__name__}.")


_PREFIXES = ("module.", "param:", "params/", "params.", "model.", "model/")


def _unwrap(state: Mapping[str, Any]) -> StateDict:
  """Strips wrapper prefixes that every key shares (`module.`, `param:`, `params/`, ...)."""
  state = {k: np.asarray(v) for k, v in state.items()}
  changed = True
  while changed and state:
    changed = False
    model_keys = [k for k in state if not _is_optimizer_key(k)]
    for prefix in _PREFIXES:
      if model_keys and all(k.startswith(prefix) for k in model_keys):
        state = {k[len(prefix) :]: v for k, v in state.items() if k in model_keys}
        changed = True
        break
  return state


def _is_optimizer_key(key: str) -> bool:
  return bool(re.match(r"^(opt|optimizer|opt_state|optim)([/._:]|$)", key))


# --------------------------------------------------------------------------------------
# Shapes -> model configuration.
# --------------------------------------------------------------------------------------


def detect_family(state: StateDict) -> str:
  if "to_patch_embedding.2.weight" in state:
    return "crate"
  if "embedding/kernel" in state and any(k.startswith("Transformer/") for k in state):
    return "crate_alpha"
  raise ConversionError(
    "Not a published CRATE (PyTorch names, e.g. 'to_patch_embedding.2.weight') or "
    f"CRATE-alpha (Flax names, e.g. 'embedding/kernel') checkpoint; first keys: {sorted(state)[:8]}."
  )


def _layer_count(state: StateDict, pattern: str) -> int:
  idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
  if not idx or idx != set(range(len(idx))):
    raise ConversionError(
      f"Layers matching {pattern!r} are missing or not numbered 0..L-1: {sorted(idx)}."
    )
  return len(idx)


def _square_side(n: int, what: str) -> int:
  side = math.isqrt(n)
  if side * side != n:
    raise ConversionError(
      f"{what} ({n}) is not a square: pass image_size and patch_size explicitly."
    )
  return side


def _infer_geometry(
  n_tokens: int, patch: tuple[int, int] | None, image_size: Any, channels_x_patch: int | None
) -> tuple[tuple[int, int], tuple[int, int]]:
  """(image_size, patch_size) from the token count, the patch vector length and overrides."""
  if patch is None:
    side = _square_side(channels_x_patch // 3, "Patch pixel count (patch vector length / 3)")
    patch = (side, side)
  if image_size is None:
    g = _square_side(n_tokens, "Number of patch tokens")
    image_size = (g * patch[0], g * patch[1])
  image_size = common.pair(image_size)
  grid = common.grid_size(image_size, patch)
  if grid[0] * grid[1] != n_tokens:
    raise ConversionError(
      f"pos_embedding holds {n_tokens} patch tokens but image_size {image_size} with patch "
      f"{patch} gives a {grid} grid ({grid[0] * grid[1]} tokens): pass a matching image_size."
    )
  return image_size, patch


def _check_heads(heads: int, inner: int, key: str, shape: tuple[int, ...]) -> int:
  if heads <= 0 or inner % heads:
    raise ConversionError(
      f"heads={heads} does not divide the head axis of {key} {shape} ({inner})."
    )
  return inner // heads


def _infer_crate(state: StateDict, overrides: dict[str, Any]) -> dict[str, Any]:
  width, patch_dim = state["to_patch_embedding.2.weight"].shape
  depth = _layer_count(state, r"transformer\.layers\.(\d+)\.0\.fn\.qkv\.weight")
  inner = state["transformer.layers.0.0.fn.qkv.weight"].shape[0]
  heads = overrides.pop("heads", None)
  if heads is None:
    preset = [s for s in crate.VARIANTS.values() if (s.width, s.depth) == (width, depth)]
    if inner != width or len(preset) != 1:
      raise ConversionError(
        f"Cannot tell the number of heads from shapes (width {width}, depth {depth}, "
        f"qkv {inner} x {width}): pass heads=K."
      )
    heads = preset[0].heads
  dim_head = _check_heads(heads, inner, "transformer.layers.0.0.fn.qkv.weight", (inner, width))
  patch = overrides.pop("patch_size", None)
  image_size, patch = _infer_geometry(
    state["pos_embedding"].shape[1] - 1,
    common.pair(patch) if patch else None,
    overrides.pop("image_size", None),
    patch_dim,
  )
  if 3 * patch[0] * patch[1] != patch_dim:
    raise ConversionError(
      f"patch_size {patch} needs a patch vector of {3 * patch[0] * patch[1]} but "
      f"to_patch_embedding.2.weight has shape {(width, patch_dim)}."
    )
  return dict(
    width=width,
    depth=depth,
    heads=heads,
    dim_head=dim_head,
    patch_size=patch,
    image_size=image_size,
    num_classes=state["mlp_head.1.weight"].shape[0],
  )


def _infer_alpha(state: StateDict, overrides: dict[str, Any]) -> dict[str, Any]:
  p1, p2, _, width = state["embedding/kernel"].shape
  depth = _layer_count(state, r"Transformer/encoderblock_(\d+)/")
  key = "Transformer/encoderblock_0/MultiHeadDotProductSubspaceAttention_0/proj/kernel"
  _, heads, dim_head = state[key].shape
  if overrides.get("heads", heads) != heads:
    raise ConversionError(
      f"heads={overrides['heads']} contradicts {key} of shape {state[key].shape}."
    )
  overrides.pop("heads", None)
  patch = overrides.pop("patch_size", None)
  if patch is not None and common.pair(patch) != (p1, p2):
    raise ConversionError(
      f"patch_size {patch} contradicts embedding/kernel of shape {state['embedding/kernel'].shape}."
    )
  image_size, _ = _infer_geometry(
    state["pos_embedding"].shape[1] - 1, (p1, p2), overrides.pop("image_size", None), None
  )
  d_shape = state["Transformer/encoderblock_0/OvercompleteISTABlock_0/D"].shape
  return dict(
    width=width,
    depth=depth,
    heads=heads,
    dim_head=dim_head,
    patch_size=(p1, p2),
    image_size=image_size,
    expansion=d_shape[1] // width,
    num_classes=state["head/kernel"].shape[1],
  )


# --------------------------------------------------------------------------------------
# Name mappings. Each entry: (published name, our path, to_ours, to_published).
# --------------------------------------------------------------------------------------


def _t(x):
  return x.T


def _same(x):
  return x


def _crate_mapping(dims: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
  d, k, p = dims["width"], dims["heads"], dims["dim_head"]
  m = [
    ("to_patch_embedding.1.weight", "patch_embed/norm_in/scale", _same, _same),
    ("to_patch_embedding.1.bias", "patch_embed/norm_in/bias", _same, _same),
    ("to_patch_embedding.2.weight", "patch_embed/dense/kernel", _t, _t),
    ("to_patch_embedding.2.bias", "patch_embed/dense/bias", _same, _same),
    ("to_patch_embedding.3.weight", "patch_embed/norm_out/scale", _same, _same),
    ("to_patch_embedding.3.bias", "patch_embed/norm_out/bias", _same, _same),
    ("cls_token", "cls", _same, _same),
    ("pos_embedding", "pos_embedding", _same, _same),
    ("mlp_head.0.weight", "head_norm/scale", _same, _same),
    ("mlp_head.0.bias", "head_norm/bias", _same, _same),
    ("mlp_head.1.weight", "head/kernel", _t, _t),
    ("mlp_head.1.bias", "head/bias", _same, _same),
  ]
  for i in range(dims["depth"]):
    t, o = f"transformer.layers.{i}.", f"encoder/layer_{i}/"
    m += [
      (t + "0.norm.weight", o + "norm1/scale", _same, _same),
      (t + "0.norm.bias", o + "norm1/bias", _same, _same),
      # qkv.weight is U^T (K*p, d), head-major.
      (
        t + "0.fn.qkv.weight",
        o + "mssa/proj",
        lambda w: w.T.reshape(d, k, p),
        lambda u: u.reshape(d, k * p).T,
      ),
      (
        t + "0.fn.to_out.0.weight",
        o + "mssa/out",
        lambda w: w.T.reshape(k, p, d),
        lambda x: x.reshape(k * p, d).T,
      ),
      (t + "0.fn.to_out.0.bias", o + "mssa/out_bias", _same, _same),
      (t + "1.norm.weight", o + "norm2/scale", _same, _same),
      (t + "1.norm.bias", o + "norm2/bias", _same, _same),
      (t + "1.fn.weight", o + "ista/D", _same, _same),
    ]
  return m


def _alpha_mapping(dims: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
  m = [
    ("embedding/kernel", "patch_embed/conv/kernel", _same, _same),
    ("embedding/bias", "patch_embed/conv/bias", _same, _same),
    ("cls", "cls", _same, _same),
    ("pos_embedding", "pos_embedding", _same, _same),
    ("encoder_norm/scale", "encoder_norm/scale", _same, _same),
    ("encoder_norm/bias", "encoder_norm/bias", _same, _same),
    ("head/kernel", "head/kernel", _same, _same),
    ("head/bias", "head/bias", _same, _same),
  ]
  for i in range(dims["depth"]):
    t, o = f"Transformer/encoderblock_{i}/", f"encoder/layer_{i}/"
    attn, odl = t + "MultiHeadDotProductSubspaceAttention_0/", t + "OvercompleteISTABlock_0/"
    m += [
      (t + "LayerNorm_0/scale", o + "norm1/scale", _same, _same),
      (t + "LayerNorm_0/bias", o + "norm1/bias", _same, _same),
      (t + "LayerNorm_1/scale", o + "norm2/scale", _same, _same),
      (t + "LayerNorm_1/bias", o + "norm2/bias", _same, _same),
      (attn + "proj/kernel", o + "mssa/proj", _same, _same),
      (attn + "out/kernel", o + "mssa/out", _same, _same),
      (odl + "D", o + "odl/D", _same, _same),
      (odl + "D1", o + "odl/D1", _same, _same),
    ]
  return m


_FAMILIES = {
  "crate": (crate.Model, _infer_crate, _crate_mapping),
  "crate_alpha": (crate_alpha.Model, _infer_alpha, _alpha_mapping),
}


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def from_published(state: StateDict, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Builds `(model, {'params': params})` from a published state dict (see module doc)."""
  family = detect_family(state)
  model_cls, infer, mapping = _FAMILIES[family]
  overrides = dict(overrides)
  dims = infer(state, overrides)
  entries = mapping(dims)
  known = {name for name, *_ in entries}
  unexpected = sorted(k for k in state if k not in known and not _is_optimizer_key(k))
  if unexpected:
    raise ConversionError(f"Unexpected keys for a {family} checkpoint: {unexpected[:10]}.")
  clash = sorted(set(overrides) & set(dims))
  if clash:
    raise ConversionError(
      f"{clash} are fixed by the checkpoint's shapes ({ {k: dims[k] for k in clash} }) and cannot "
      f"be overridden; change the head or sizes after loading (e.g. fine-tuning re-initialises "
      f"the head)."
    )
  model = model_cls(**dims, **overrides)
  expected = _expected_shapes(model, dims)
  flat = {}
  for name, path, to_ours, _ in entries:
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
    params = common.stack_layer_params(params, dims["depth"])
  return model, {"params": params}


def load_published(path: str, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Reads a published checkpoint file and returns `(model, {'params': params})`.

  Overrides are model fields: `heads`, `pool`, `image_size`, `patch_size` where shapes cannot
  tell (contradictions are errors), or options such as `dtype`, `scan_layers`, `remat_policy`.
  """
  return from_published(read_state_dict(path), **overrides)


def to_published(model: nn.Module, params: Mapping[str, Any]) -> StateDict:
  """Our parameters -> the published names and layouts (exact inverse of `from_published`)."""
  family = {crate.Model: "crate", crate_alpha.Model: "crate_alpha"}.get(type(model))
  if family is None:
    raise ConversionError(f"No published format for {type(model).__name__}.")
  params = nn.unbox(dict(params))
  if getattr(model, "scan_layers", False):
    params = common.unstack_layer_params(params)
  flat = {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  dims = model.dims()
  return {
    name: np.ascontiguousarray(to_pub(flat[path]))
    for name, path, _, to_pub in _FAMILIES[family][2](dims)
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
# Command line.
# --------------------------------------------------------------------------------------


_MODEL_KEY = "__model__"


def save_ours(path: str, model: nn.Module, params: Mapping[str, Any]) -> None:
  """Writes parameters in our naming to `.npz`, with the model's family and sizes."""
  family = {crate.Model: "crate", crate_alpha.Model: "crate_alpha"}[type(model)]
  meta = dict(
    family=family,
    pool=model.pool,
    num_classes=model.num_classes,
    image_size=list(common.pair(model.image_size)),
    **model.dims(),
  )
  flat = flax.traverse_util.flatten_dict(nn.unbox(dict(params)), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()}, **{_MODEL_KEY: json.dumps(meta)})


def load_ours(path: str) -> tuple[nn.Module, dict[str, Any]]:
  """Reads a file written by `save_ours`."""
  with np.load(path, allow_pickle=False) as data:
    if _MODEL_KEY not in data.files:
      raise ConversionError(
        f"{path!r} was not written by crate_jax.convert (no {_MODEL_KEY} entry)."
      )
    meta = json.loads(str(data[_MODEL_KEY]))
    flat = {k: data[k] for k in data.files if k != _MODEL_KEY}
  model_cls = _FAMILIES[meta.pop("family")][0]
  meta["image_size"], meta["patch_size"] = tuple(meta["image_size"]), tuple(meta["patch_size"])
  return model_cls(**meta), {"params": flax.traverse_util.unflatten_dict(flat, sep="/")}


def _main(argv):
  del argv
  try:
    _convert(flags.FLAGS)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _convert(f) -> None:
  if f.to == "ours":
    overrides = {k: getattr(f, k) for k in ("heads", "pool") if getattr(f, k) is not None}
    if f.image_size:
      overrides["image_size"] = tuple(int(v) for v in f.image_size.split(","))
    model, variables = load_published(f.input, **overrides)
    save_ours(f.output, model, variables["params"])
    n = sum(np.size(v) for v in jax.tree.leaves(variables["params"]))
    print(
      f"{type(model).__module__.split('.')[-1]} {model.dims()} pool={model.pool} "
      f"classes={model.num_classes}: {n:,} parameters -> {f.output}"
    )
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


if __name__ == "__main__":
  run()
