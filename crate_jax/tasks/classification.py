"""Classification: softmax cross-entropy on the pipeline's one-hot (or mixed) labels."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from crate_jax import optim
from crate_jax.models import common
from crate_jax.tasks import base


class Task(base.Task):
  """`loss = CE(logits, labels)` with `config.label_smoothing`; logs top-1 accuracy."""

  METRICS = ("accuracy",)

  def check_model(self, model_cls: type[common.ModelBase]) -> None:
    if not issubclass(model_cls, common.ClassifierBase):
      raise ValueError(f"task 'classification' needs a classifier; {model_cls.FAMILY} is not one.")

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    size, classes = self.config.input.image_size, self.config.input.num_classes
    return {
      "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
      "labels": jax.ShapeDtypeStruct((batch_size, classes), jnp.float32),
    }

  def loss(self, model, params, batch, rngs):
    logits, _ = model.apply({"params": params}, batch["image"], train=True, rngs=rngs)
    loss = jnp.mean(optim.cross_entropy(logits, batch["labels"], self.config.label_smoothing))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1))
    return loss, {"accuracy": accuracy}

  @classmethod
  def default_evals(cls, model_cls: type[common.ModelBase]) -> dict[str, dict[str, Any]]:
    evals = {"eval": dict(type="classification", every_steps=1000)}
    if model_cls.HAS_SUBSPACES:
      evals["rate_reduction"] = dict(type="rate_reduction", every_steps=0, num_images=64)
    return evals
