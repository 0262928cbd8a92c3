"""Defaults shared by the configs. The schema itself is `crate_jax.config_utils.base_config`.

Config files are loaded by path (`--config=configs/imagenet.py:variant=B/16`); they import
this module as `configs.common`, so run from the repository root.
"""

import ml_collections

from crate_jax import config_utils

IMAGENET_TRAIN_IMAGES = 1_281_167


def base(model_name: str, **model_fields) -> ml_collections.ConfigDict:
  """The locked base config with model `model_name` and its fields set."""
  config = config_utils.base_config()
  config.model_name = model_name
  config.model = config_utils.model_config(model_name, **model_fields)
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
  config.eval_every_steps = 2500
  config.rate_reduction_every_steps = 5000
  config.checkpoint_every_steps = 1000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.keep_period = 10_000
