"""Reading published checkpoint files into flat `{name: array}` state dicts."""

from __future__ import annotations

from collections.abc import Mapping
import os
import re
from typing import Any
import zipfile

import numpy as np

from crate_jax.convert.common import ConversionError
from crate_jax.convert.common import StateDict


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
    if not zipfile.is_zipfile(path):
      raise ConversionError(
        f"{path!r} is not a .npz file (a .npz is a zip archive of .npy arrays)."
      )
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
  with open(path, "rb") as f:
    head = f.read(2)
  # A PyTorch file is a zip archive (torch.save) or a raw pickle (protocol 2+ starts 0x80).
  if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
    raise ConversionError(f"{path!r} is not a PyTorch checkpoint (neither a zip nor a pickle).")
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
    model_keys = [k for k in state if not is_optimizer_key(k)]
    for prefix in _PREFIXES:
      if model_keys and all(k.startswith(prefix) for k in model_keys):
        state = {k[len(prefix) :]: v for k, v in state.items() if k in model_keys}
        changed = True
        break
  return state


def is_optimizer_key(key: str) -> bool:
  return bool(re.match(r"^(opt|optimizer|opt_state|optim)([/._:]|$)", key))
