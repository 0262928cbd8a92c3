"""Defaults shared by the configs. The schema itself is `crate_jax.config_utils.base_config`.

Config files are loaded by path (`--config=configs/imagenet.py:variant=B/16`); they import
this module as `configs.common`, so run from the repository root.
"""

import ml_collections

from crate_jax import config_utils
from crate_jax import models
from crate_jax import tasks


def base(
  model_name: str, *, task: str = "classification", **model_fields
) -> ml_collections.ConfigDict:
  """The locked base config of `task` with model `model_name`, its fields and the task's
  default evaluators (`config.evals`) set."""
  config = config_utils.base_config()
  config.task = task
  config.model_name = model_name
  config.model = config_utils.model_config(model_name, **model_fields)
  config.evals.update(tasks.task_class(task).default_evals(models.model_class(model_name)))
  return config


def imagenet_style_input(
  config: ml_collections.ConfigDict,
  *,
  dataset: str,
  num_classes: int,
  batch_size: int,
  image_size: int = 224,
) -> None:
  """Natural-image input at `image_size`: decoding in worker processes, 256/224 eval crop."""
  config.input.dataset = dataset
  config.input.num_classes = num_classes
  config.input.image_size = image_size
  config.input.global_batch_size = batch_size
  config.input.eval_batch_size = 1024
  config.input.num_workers = 16  # JPEG decoding and augmentation, per host.
  config.input.num_threads = 4
  config.input.prefetch = 4
  config.input.eval_resize_ratio = 256 / 224


def pod_cadence(config: ml_collections.ConfigDict) -> None:
  """Logging, evaluation and checkpoint intervals for runs of tens of thousands of steps."""
  config.log_every_steps = 100
  for name, every in (("eval", 2500), ("rate_reduction", 5000)):
    if name in config.evals:
      config.evals[name].every_steps = every
  config.checkpoint_every_steps = 1000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.keep_period = 10_000
