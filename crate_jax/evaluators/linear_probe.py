"""Linear probe: linear classifiers fitted on a model's frozen features, scored on held-out data.

Features are the model's final tokens of unmasked images (`Model.encode`): the CLS token
(`cls`) and the mean of the patch tokens (`mean`), each standardised with the training
features' mean and standard deviation. For every pool, a softmax regression
`min_W,b mean_i CE(x_i W + b, y_i) + l2 ||W||^2` is fitted by full-batch L-BFGS for each
`l2` in the grid on the training split minus a held-out `val_fraction`; the `l2` with the
best held-out top-1 is refitted on all training features and scored on the evaluation
split. Deterministic given the features.

Metrics: `<pool>/top1` (evaluation split), `<pool>/val_top1` and `<pool>/l2` (the chosen
penalty), `num_train`.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crate_jax.models import common

POOLS = ("cls", "mean")


def pooled_features(tokens: jax.Array) -> dict[str, jax.Array]:
  """`(B, T, d)` tokens, CLS first -> `{"cls": (B, d), "mean": (B, d)}` (mean of patches)."""
  return {"cls": tokens[:, 0], "mean": jnp.mean(tokens[:, 1:], axis=1)}


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _lbfgs_softmax_regression(x, y, l2, *, num_classes: int, steps: int):
  def loss(params):
    w, b = params
    logits = x @ w + b
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(w * w)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(params, updates), state), None

  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  (params, _), _ = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
  return params


def fit_softmax_regression(
  x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, steps: int = 100
) -> tuple[np.ndarray, np.ndarray]:
  """`(W, b)` minimising `mean CE(x W + b, y) + l2 ||W||^2`, by `steps` of L-BFGS from 0."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  params = _lbfgs_softmax_regression(x, y, l2, num_classes=num_classes, steps=steps)
  return jax.device_get(params)


def top1(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(np.argmax(x @ w + b, axis=-1) == y))


def probe(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  num_classes: int,
  *,
  l2_grid: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2),
  val_fraction: float = 0.1,
  steps: int = 100,
  seed: int = 0,
) -> dict[str, float]:
  """Fits on `train = (features, labels)`, chooses `l2` on a held-out slice, scores `test`."""
  (x, y), (x_test, y_test) = train, test
  mean, std = x.mean(0), x.std(0) + 1e-6
  x, x_test = (x - mean) / std, (x_test - mean) / std
  order = np.random.default_rng(seed).permutation(len(x))
  num_val = max(int(len(x) * val_fraction), 1)
  val, fit = order[:num_val], order[num_val:]
  scores = {
    l2: top1(x[val], y[val], *fit_softmax_regression(x[fit], y[fit], num_classes, l2, steps))
    for l2 in l2_grid
  }
  best = max(scores, key=lambda l2: (scores[l2], -l2))  # Ties: the smaller penalty.
  w, b = fit_softmax_regression(x, y, num_classes, best, steps)
  return {"top1": top1(x_test, y_test, w, b), "val_top1": scores[best], "l2": best}


class Evaluator:
  """The linear probe of the module doc on the current parameters, as an evaluator.

  Args (the `config.evals` entry's fields):
    train_split: the split the probes are fitted on, preprocessed as for evaluation (no
      augmentation); default: `config.input.train_split`. Slices work ("train[:5000]").
    pools: which features to probe, from `POOLS`.
    l2_grid, val_fraction, steps: the fit (see `probe`).
  """

  def __init__(
    self,
    context: Any,
    *,
    train_split: str | None = None,
    pools: Sequence[str] = POOLS,
    l2_grid: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    steps: int = 100,
  ):
    unknown = sorted(set(pools) - set(POOLS))
    if unknown:
      raise ValueError(f"linear_probe pools {unknown} are not among {POOLS}.")
    self._context = context
    self._train_split = train_split or context.input_config.train_split
    self._pools = tuple(pools)
    self._fit = dict(l2_grid=tuple(l2_grid), val_fraction=val_fraction, steps=steps)
    model = context.model
    # Labels and masks come back with the features, gathered on every process.
    self._features = context.jit(
      lambda params, batch: (
        pooled_features(model.apply({"params": params}, batch["image"], method="encode")[0]),
        batch["label"],
        batch["mask"],
      )
    )

  @staticmethod
  def supports(model_cls: type) -> bool:
    return model_cls.encode is not common.ModelBase.encode

  def _extract(self, params: Any, split: str | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    features, labels = [], []
    for batch in self._context.eval_batches(split):
      pooled, label, mask = jax.device_get(self._features(params, batch))
      features.append({k: v[mask > 0] for k, v in pooled.items()})
      labels.append(label[mask > 0])
    return {k: np.concatenate([f[k] for f in features]) for k in features[0]}, np.concatenate(
      labels
    )

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    del step
    train_x, train_y = self._extract(params, self._train_split)
    test_x, test_y = self._extract(params, None)
    num_classes = self._context.input_config.num_classes
    results: dict[str, float] = {"num_train": len(train_y)}
    for pool in self._pools:
      scores = probe((train_x[pool], train_y), (test_x[pool], test_y), num_classes, **self._fit)
      results.update({f"{pool}/{k}": v for k, v in scores.items()})
    return results
