"""Evaluators, built by name from `config.evals` (big_vision style).

    config.evals = {
        "eval": dict(type="classification", every_steps=1000),
        "rate_reduction": dict(type="rate_reduction", every_steps=5000, num_images=64),
    }

Each entry names a module `crate_jax.evaluators.<type>` whose `Evaluator(context, **kwargs)`
takes the entry's other fields as keyword arguments, and whose `run(params, step)` returns
`{metric: value}`: floats are written as scalars `<entry name>/<metric>`, arrays of rank 3
or 4 as images. `every_steps` (0: only at the end) says how often the training loop runs
it; every entry also runs after the last step. A new evaluator is a new module here and a
config entry: the loop does not change.

  classification   top-1, top-5 and cross-entropy over the evaluation split.
  rate_reduction   the layer-wise rate-reduction measurements (models with MSSA layers).
  linear_probe     top-1 of linear classifiers fitted on frozen CLS / mean-pooled features.
  segmentation     emergent segmentation of attention maps and features against true masks.
  reconstruction   masked autoencoders: masked-patch loss and a PNG grid of reconstructions.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
import dataclasses
import importlib
import inspect
from typing import Any
from typing import Protocol

from etils import epath
import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from crate_jax import sharding
from crate_jax import writers
from crate_jax.data import pipeline
from crate_jax.models import common

EVALUATORS = (
  "classification",
  "rate_reduction",
  "linear_probe",
  "segmentation",
  "reconstruction",
)
ENTRY_FIELDS = ("type", "every_steps")  # Read by the loop; the rest are the evaluator's.


class Evaluator(Protocol):
  def run(self, params: Any, step: int) -> Mapping[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Context:
  """What the training core gives an evaluator.

  Attributes:
    model: the model being trained.
    input_config: `config.input` (dataset, splits, batch sizes, preprocessing).
    name: the entry's name in `config.evals` (its metrics' prefix).
    batch_sharding, param_shardings: how batches and parameters are laid out over the
      mesh; None for a single device (e.g. in a notebook).
    workdir: where evaluators may write files (process 0 only); None: nowhere.
    writer: the experiment's metric writer, for one-off summaries (e.g. layouts).
  """

  model: nn.Module
  input_config: ml_collections.ConfigDict
  name: str = ""
  batch_sharding: NamedSharding | None = None
  param_shardings: Any = None
  workdir: epath.Path | None = None
  writer: writers.MetricWriter | None = None

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def jit(self, fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """`jax.jit` of `fn(params, batch)` for the layouts above, results replicated."""
    if self.batch_sharding is None:
      return jax.jit(fn)
    return jax.jit(
      fn,
      in_shardings=(self.param_shardings, self.batch_sharding),
      out_shardings=NamedSharding(self.batch_sharding.mesh, P()),
    )

  def eval_batches(
    self,
    split: str | None = None,
    transform: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
    **kwargs: Any,
  ) -> Iterator[dict[str, Any]]:
    """One pass over the evaluation split (or `split`, preprocessed for evaluation): global
    batches, padding rows with `mask` 0. `transform(batch, index)` may add to this
    process's part of batch `index` before it is placed; `kwargs` go to
    `pipeline.make_eval_iterator`."""
    config = self.input_config
    if split is not None:
      config = ml_collections.ConfigDict(config.to_dict())
      config.eval_split = split
    for index, batch in enumerate(pipeline.make_eval_iterator(config, **kwargs)):
      if transform is not None:
        batch = transform(batch, index)
      yield batch if self.batch_sharding is None else sharding.put_batch(batch, self.batch_sharding)

  def fixed_images(self, num: int) -> np.ndarray:
    """The first `num` evaluation images (fewer if the split is smaller), on every process."""
    images = []
    config = self.input_config
    for batch in pipeline.make_eval_iterator(config, process_index=0, process_count=1):
      images.append(batch["image"][batch["mask"] > 0])
      if sum(len(x) for x in images) >= num:
        break
    return np.concatenate(images)[:num]


def evaluator_class(type_name: str) -> type:
  if type_name not in EVALUATORS:
    raise ValueError(f"unknown type {type_name!r}; choose one of {EVALUATORS}.")
  return importlib.import_module(f"crate_jax.evaluators.{type_name}").Evaluator


def _split(name: str, entry: Mapping[str, Any]) -> tuple[type, int, dict[str, Any]]:
  if "type" not in entry:
    raise ValueError(f"config.evals.{name} has no `type`; choose one of {EVALUATORS}.")
  try:
    cls = evaluator_class(entry["type"])
  except ValueError as e:
    raise ValueError(f"config.evals.{name}: {e}") from None
  every = entry.get("every_steps", 0)
  if not isinstance(every, int) or every < 0:
    raise ValueError(f"config.evals.{name}.every_steps must be an int >= 0, got {every!r}.")
  return cls, every, {k: v for k, v in entry.items() if k not in ENTRY_FIELDS}


def check(evals: Mapping[str, Mapping[str, Any]], model_cls: type[common.ModelBase]) -> None:
  """Raises ValueError naming the entry and field for anything `build` would reject."""
  for name, entry in evals.items():
    cls, _, kwargs = _split(name, entry)
    try:
      inspect.signature(cls).bind(None, **kwargs)
    except TypeError as e:
      known = [p for p in inspect.signature(cls).parameters if p != "context"]
      raise ValueError(
        f"config.evals.{name} ({entry['type']}): {e}; its fields: {known}."
      ) from None
    supports = getattr(cls, "supports", None)
    if supports is not None and not supports(model_cls):
      raise ValueError(
        f"config.evals.{name}: a {entry['type']} evaluator cannot measure a "
        f"{model_cls.FAMILY} model; remove the entry."
      )


@dataclasses.dataclass(frozen=True)
class Scheduled:
  """A built evaluator and how often the loop runs it."""

  name: str
  every_steps: int
  evaluator: Evaluator

  def due(self, step: int) -> bool:
    return bool(self.every_steps) and step % self.every_steps == 0


def build(evals: Mapping[str, Mapping[str, Any]], context: Context) -> list[Scheduled]:
  """The evaluators of `config.evals`, in order, each given `context` with its name."""
  scheduled = []
  for name, entry in evals.items():
    cls, every, kwargs = _split(name, entry)
    evaluator = cls(dataclasses.replace(context, name=name), **kwargs)
    scheduled.append(Scheduled(name, every, evaluator))
  return scheduled
