"""Model zoo, one family per file, each a `Model` with a `VARIANTS` size table ("B/16").

`Model(...).apply(variables, images_nhwc, return_intermediates=...)` returns
`(output, out)`: logits for the classifiers, with `out["intermediates"]` holding the
per-layer activations. Shared fields and capabilities: `common.ModelBase`.
"""

from __future__ import annotations

import importlib
from typing import Any

from crate_jax.models import common

MODELS = ("crate", "crate_alpha", "crate_mae", "vit")


def model_class(name: str) -> type[common.ModelBase]:
  """The `Model` class of family `name` (the module `crate_jax.models.<name>`)."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")
  return importlib.import_module(f"crate_jax.models.{name}").Model


def model_name(model: common.ModelBase) -> str:
  """The registry name of a model instance's family ("crate" for a `crate.Model`)."""
  name = type(model).__module__.rpartition(".")[2]
  if name not in MODELS or type(model) is not model_class(name):
    raise ValueError(f"{type(model).__name__} is not a crate_jax model family.")
  return name


def get_model(name: str, **kwargs: Any) -> common.ModelBase:
  """`get_model("crate", variant="B/16", num_classes=1000)`."""
  return model_class(name)(**kwargs)
