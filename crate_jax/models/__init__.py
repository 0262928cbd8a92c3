"""Model zoo, one family per file, each with a `VARIANTS` size table ("B/16").

`Model(...).apply(variables, images_nhwc, return_intermediates=...)` returns
`(output, out)`: logits for the classifiers, with `out["intermediates"]` holding the
per-layer activations. Shared fields and capabilities: `common.ModelBase`.
"""

from __future__ import annotations

import importlib
from typing import Any

from crate_jax.models import common

# Registry name -> "module:class" in crate_jax.models.
_CLASSES = {
  "crate": "crate:Model",
  "crate_alpha": "crate_alpha:Model",
  "crate_mae": "crate_mae:Model",
  "crate_mae_classifier": "crate_mae:Classifier",  # Fine-tunes a CRATE-MAE encoder.
  "vit": "vit:Model",
}
MODELS = tuple(_CLASSES)


def model_class(name: str) -> type[common.ModelBase]:
  """The class registered as `name`."""
  if name not in _CLASSES:
    raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")
  module, _, cls = _CLASSES[name].partition(":")
  return getattr(importlib.import_module(f"crate_jax.models.{module}"), cls)


def model_name(model: common.ModelBase) -> str:
  """The registry name of a model instance ("crate" for a `crate.Model`)."""
  for name in MODELS:
    if type(model) is model_class(name):
      return name
  raise ValueError(f"{type(model).__name__} is not a registered crate_jax model.")


def get_model(name: str, **kwargs: Any) -> common.ModelBase:
  """`get_model("crate", variant="B/16", num_classes=1000)`."""
  return model_class(name)(**kwargs)
