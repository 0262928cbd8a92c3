"""Masked autoencoding (CRATE-MAE): the model's own masked-patch reconstruction loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from crate_jax.models import common
from crate_jax.tasks import base


class Task(base.Task):
  """`loss = out["loss"]` of a masked autoencoder's forward pass on the images alone.

  The model masks each image with its `masking` RNG stream (a fresh key every step and
  microbatch) and returns the mean squared error over the masked patches.
  """

  def check_model(self, model_cls: type[common.ModelBase]) -> None:
    if "mask_ratio" not in model_cls.__dataclass_fields__:
      raise ValueError(
        f"task 'masked_autoencoding' needs a masked autoencoder (e.g. model_name='crate_mae'); "
        f"{model_cls.FAMILY} is not one."
      )

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size = self.config.input.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)}

  def loss(self, model, params, batch, rngs):
    _, out = model.apply({"params": params}, batch["image"], train=True, rngs=rngs)
    return out["loss"], {}

  @classmethod
  def default_evals(cls, model_cls: type[common.ModelBase]) -> dict[str, dict[str, Any]]:
    return {
      "reconstruction": dict(type="reconstruction", every_steps=1000, num_images=8),
      "rate_reduction": dict(type="rate_reduction", every_steps=0, num_images=64),
    }
