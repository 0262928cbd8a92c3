"""Optimisers, learning-rate schedules, weight-decay masks and the classification loss.

All schedules count optimizer updates (train steps); with gradient accumulation one
update consumes `grad_accum_steps` microbatches, so nothing here changes with it.

Weight decay is decoupled and multiplied by the learning rate (AdamW, and Lion as in its
paper and in optax). It applies to the parameters whose '/'-joined path matches
`optimizer.decay_regex`. The default covers every matrix: Dense/Conv `kernel`s, the
attention projections `proj`/`out` and CRATE's dictionaries `D` (and CRATE-alpha's `D1`),
and leaves out biases, LayerNorm scales, `cls` and `pos_embedding`. The published
CRATE-alpha code used `.*/kernel$`, which silently skipped `D` and `D1`, most of its
parameters.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

DEFAULT_DECAY_REGEX = r"(^|/)(kernel|proj|out|D|D1)$"
OPTIMIZERS = ("lion", "adamw", "adam")
SCHEDULES = ("cosine", "linear", "constant")


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against soft targets `labels` (rows sum to 1).

  Label smoothing mixes the targets with the uniform distribution:
  `labels * (1 - s) + s / num_classes`.
  """
  labels = labels.astype(jnp.float32)
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def create_schedule(
  name: str, *, base_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0
) -> optax.Schedule:
  """Linear warmup from 0 to `base_lr` over `warmup_steps`, then `name` decay to `end_lr`.

  'cosine' and 'linear' reach `end_lr` at `total_steps`; 'constant' stays at `base_lr`.
  """
  if name not in SCHEDULES:
    raise ValueError(f"Unknown schedule {name!r}; choose one of {SCHEDULES}.")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps ({warmup_steps}) must be in [0, total_steps={total_steps}].")
  decay_steps = max(total_steps - warmup_steps, 1)
  if name == "cosine":
    alpha = end_lr / base_lr if base_lr else 0.0
    decay = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=alpha)
  elif name == "linear":
    decay = optax.linear_schedule(base_lr, end_lr, decay_steps)
  else:
    decay = optax.constant_schedule(base_lr)
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def path_str(path: tuple[Any, ...]) -> str:
  """A pytree key path as 'encoder/layer_0/ista/D'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def decay_mask(params: Any, regex: str = DEFAULT_DECAY_REGEX) -> Any:
  """A tree of bools: True where the parameter's path matches `regex` (`re.search`)."""
  pattern = re.compile(regex)
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(pattern.search(path_str(p))), params)


def create_optimizer(
  config: ml_collections.ConfigDict, schedule: optax.Schedule, params: Any
) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer`, with optional global-norm clipping first.

  Args:
    config: `name` in OPTIMIZERS, `b1`, `b2`, `eps`, `weight_decay`, `decay_regex`,
      `grad_clip_norm` (0 or None: no clipping).
    schedule: learning rate per update step.
    params: parameters or their shapes, for the weight-decay mask.
  """
  name, wd = config.name, config.weight_decay
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
  mask = decay_mask(params, config.decay_regex)
  if not any(jax.tree.leaves(mask)) and wd:
    raise ValueError(f"optimizer.decay_regex {config.decay_regex!r} matches no parameter.")
  if name == "lion":
    tx = optax.lion(schedule, b1=config.b1, b2=config.b2, weight_decay=wd, mask=mask)
  elif name == "adamw":
    tx = optax.adamw(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=wd, mask=mask
    )
  else:
    if wd:  # Adding decay silently would make it AdamW under another name.
      raise ValueError(
        f"optimizer.name='adam' has no weight decay (got {wd}); use 'adamw' "
        "for Adam with decoupled weight decay."
      )
    tx = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
