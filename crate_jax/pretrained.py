"""Starting a run from pretrained parameters (`config.init`): fine-tuning and transfer.

`load(config)` reads the parameters of `config.init.checkpoint` (one of our workdirs or
checkpoint step directories, or a published checkpoint file); `adapt(params, target)`
fits them to the model being trained.
"""

from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from crate_jax import convert
from crate_jax.models import common


def load(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Parameters (host arrays, our naming) of `config.init.checkpoint`.

  Raises:
    ValueError: the checkpoint is missing or unreadable (the message says which and why).
  """
  path = epath.Path(config.init.checkpoint)
  if not path.exists():
    raise ValueError(f"init.checkpoint={str(path)!r} does not exist.")
  if config.init.format == "published":
    overrides = {"heads": config.model.heads} if config.model.get("heads") else {}
    try:
      return convert.load_published(str(path), **overrides)[1]["params"]
    except convert.ConversionError as e:
      raise ValueError(f"init.checkpoint={str(path)!r}: {e}") from e
  if (path / "checkpoints").exists():  # A workdir: its latest checkpoint.
    steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
      raise ValueError(f"init.checkpoint={str(path)!r} is a workdir without checkpoints.")
    path = path / "checkpoints" / str(steps[-1])
  if not (path / "state").exists():
    raise ValueError(
      f"init.checkpoint={str(path)!r} is neither a workdir nor a checkpoint step directory "
      "(with a `state` item); for a published file set init.format='published'."
    )
  logging.info("Loading parameters from %s.", path)
  try:
    restored = ocp.StandardCheckpointer().restore(path / "state")
  except Exception as e:  # Orbax and TensorStore raise many types for unreadable files.
    first_line = (str(e).splitlines() or [""])[0][:200]
    raise ValueError(
      f"init.checkpoint={str(path)!r} cannot be read ({type(e).__name__}: {first_line})."
    ) from e
  return jax.device_get(restored["params"])


def adapt(pretrained: dict[str, Any], target_shapes: Any) -> dict[tuple[str, ...], Any]:
  """Fits pretrained parameters to the model being trained; returns `{path: array}`.

  Converts between scanned and unrolled layer stacks, resamples the position embedding
  to the new patch grid, and leaves out the `head` when its shape changed (new classes)
  or the pretrained model has none (an autoencoder's encoder): it keeps its fresh
  initialisation. Parameters of the pretrained model that the target lacks (a decoder)
  are ignored. Any other mismatch is a ValueError naming the parameters and both shapes.
  """
  target = flax.traverse_util.flatten_dict(target_shapes)
  if any(k[1] == "layers" for k in target if k[0] in common.LAYER_STACKS):
    pretrained = common.stack_layer_params(pretrained)
  else:
    pretrained = common.unstack_layer_params(pretrained)
  source = flax.traverse_util.flatten_dict(pretrained)
  missing = sorted("/".join(k) for k in target if k not in source and k[0] != "head")
  if missing:
    raise ValueError(f"the pretrained checkpoint lacks {missing[:10]}: another model family?")
  adapted, problems = {}, []
  for key, shape in target.items():
    if key not in source:  # A head the pretrained model (e.g. an autoencoder) lacks.
      logging.info("Initialising %s afresh: not in the pretrained checkpoint.", "/".join(key))
      continue
    value = np.asarray(source[key])
    if value.shape == shape.shape:
      adapted[key] = value
    elif key[-1] == "pos_embedding":
      old, new = ((common.square_side(s[1] - 1),) * 2 for s in (value.shape, shape.shape))
      logging.info("Resampling pos_embedding from a %s to a %s grid.", old, new)
      adapted[key] = np.asarray(common.resample_posemb(value, old, new))
    elif key[0] == "head":
      logging.info("Re-initialising %s: %s -> %s.", "/".join(key), value.shape, shape.shape)
    else:
      problems.append(f"{'/'.join(key)}: {value.shape} vs {shape.shape}")
  if problems:
    raise ValueError(f"pretrained shapes do not fit config.model: {problems[:10]}.")
  return adapted
