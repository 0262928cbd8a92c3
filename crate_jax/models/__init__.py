"""Model zoo. Each model file holds one family with a `VARIANTS` size table and a `Model`
whose `apply(variables, images_nhwc, return_intermediates=...)` returns `(logits, out)`."""

from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

MODELS = ("crate", "crate_alpha", "vit")


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """`get_model("crate", variant="B/16", num_classes=1000)`."""
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")
  return importlib.import_module(f"crate_jax.models.{name}").Model(**kwargs)
