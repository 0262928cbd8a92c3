"""Evaluators chosen by name (big_vision style): `get_evaluator("classification", model=model)`.

Each module `crate_jax.evaluators.<name>` defines an `Evaluator` class whose
`run(params, ...)` returns flat `{metric name: float}` for a `MetricWriter`:

  classification   `run(params, batches)`: top1, top5, loss, num_examples.
  rate_reduction   `run(params, step=None)`: the layer-wise rate-reduction measurements.
"""

from __future__ import annotations

import importlib
from typing import Any

EVALUATORS = ("classification", "rate_reduction")


def get_evaluator(name: str, **kwargs: Any) -> Any:
  """`get_evaluator("rate_reduction", model=model, images=images)`."""
  if name not in EVALUATORS:
    raise ValueError(f"Unknown evaluator {name!r}; choose one of {EVALUATORS}.")
  return importlib.import_module(f"crate_jax.evaluators.{name}").Evaluator(**kwargs)
