"""Top-1 / top-5 accuracy and cross-entropy of a classifier over an evaluation set.

Evaluation batches are `{"image": f32[B, H, W, 3], "label": int32[B], "mask": f32[B]}`; rows
with `mask == 0` pad the last batch to a fixed shape and are excluded (whatever their image
or label holds). With `n = sum(mask)` real examples over the whole set:

  top1 = #{argmax logits == label} / n,  top5 = #{label among the 5 largest logits} / n,
  loss = sum(-log softmax(logits)[label]) / n.

Per-batch sums are computed on device (float32, exact for counts below 2^24 per batch) and
added up exactly on the host (`math.fsum`), so the averages are exact over real examples.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def eval_sums(model: nn.Module, params: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
  """Masked sums of one batch: `correct_top1`, `correct_top5`, `loss`, `num_examples`.

  A batch without `mask` counts all its rows. With fewer than 5 classes, top-5 counts all.
  """
  logits, _ = model.apply({"params": params}, batch["image"])
  labels = batch["label"]
  real = (batch["mask"] > 0) if "mask" in batch else jnp.ones(labels.shape, bool)
  _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
  hits = top == labels[:, None]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

  def masked_sum(x):  # `where`, not a product: padding rows may hold NaNs.
    return jnp.sum(jnp.where(real, x, 0.0), dtype=jnp.float32)

  return {
    "correct_top1": masked_sum(hits[:, 0]),
    "correct_top5": masked_sum(jnp.any(hits, axis=-1)),
    "loss": masked_sum(loss),
    "num_examples": masked_sum(jnp.ones_like(loss)),
  }


def summarize(per_batch: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages the sums of `eval_sums` over all batches; raises if there are no real examples."""
  total = lambda name: math.fsum(float(sums[name]) for sums in per_batch)
  n = total("num_examples")
  if not n:
    raise ValueError("The evaluation batches hold no real examples (all masks are 0).")
  return {
    "top1": total("correct_top1") / n,
    "top5": total("correct_top5") / n,
    "loss": total("loss") / n,
    "num_examples": int(n),
  }


class Evaluator:
  """Exact top-1, top-5 and mean cross-entropy over the evaluation split.

  In a notebook, on one device: `Evaluator(evaluators.Context(model, config.input))`.
  """

  def __init__(self, context: Any):
    self._context = context
    self._step = context.jit(functools.partial(eval_sums, context.model))

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    del step
    # All steps are dispatched before the first result is fetched.
    batches = self._context.eval_batches()
    return summarize(jax.device_get([self._step(params, batch) for batch in batches]))
