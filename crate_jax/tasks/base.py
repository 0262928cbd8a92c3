"""The interface between a training task and the task-agnostic core (`crate_jax.train`)."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any
from typing import ClassVar

import flax.linen as nn
import jax
import ml_collections

from crate_jax.models import common

Array = jax.Array
Batch = Mapping[str, Array]


class Task(abc.ABC):
  """A training objective. Subclasses set `METRICS` and implement the abstract methods.

  Attributes:
    METRICS: names of the per-step metrics `loss` returns besides the loss (averaged over
      each logging window, logged as `train/<name>`).
    config: the experiment's config.
  """

  METRICS: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def check_model(self, model_cls: type[common.ModelBase]) -> None:
    """Raises ValueError when the task cannot train models of `model_cls`."""
    del model_cls

  def model_fields(self, model_cls: type[common.ModelBase]) -> dict[str, Any]:
    """Fields of the model that the task sets from `config.input` (not `config.model`)."""
    fields = {"image_size": self.config.input.image_size}
    if "num_classes" in model_cls.__dataclass_fields__:
      fields["num_classes"] = self.config.input.num_classes
    return fields

  @abc.abstractmethod
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the global train batch the loss reads (a subset of the pipeline's keys)."""

  @abc.abstractmethod
  def loss(
    self, model: nn.Module, params: Any, batch: Batch, rngs: dict[str, Array]
  ) -> tuple[Array, dict[str, Array]]:
    """`(scalar loss, {name in METRICS: scalar})` of one (micro)batch in training mode."""

  @classmethod
  @abc.abstractmethod
  def default_evals(cls, model_cls: type[common.ModelBase]) -> dict[str, dict[str, Any]]:
    """`config.evals` entries a config of this task starts from (see crate_jax.evaluators)."""
