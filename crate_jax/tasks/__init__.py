"""Training tasks: what an objective brings to the task-agnostic training core.

A task (`base.Task`) supplies the loss, the batch the train step consumes, its per-step
metrics, the model fields it derives from `config.input` and its default evaluators;
`crate_jax.train` does the rest (state, sharding, compilation, the loop, checkpoints).
`config.task` names it:

  classification        softmax cross-entropy on one-hot labels (CRATE, CRATE-alpha, ViT).
  masked_autoencoding   masked-patch reconstruction (CRATE-MAE).
"""

from __future__ import annotations

import importlib

import ml_collections

from crate_jax.tasks import base

TASKS = ("classification", "masked_autoencoding")


def task_class(name: str) -> type[base.Task]:
  """The `Task` class of `crate_jax.tasks.<name>`."""
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; choose one of {TASKS}.")
  return importlib.import_module(f"crate_jax.tasks.{name}").Task


def get_task(config: ml_collections.ConfigDict) -> base.Task:
  """The task of `config.task`, bound to the config."""
  return task_class(config.task)(config)
