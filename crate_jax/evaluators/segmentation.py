"""Emergent segmentation: how well a model's attention and features separate objects, scored
against ground-truth masks the model never trained on.

On unmasked images (`Model.encode`), at one layer (the last by default):

* attention: the CLS attention map of every head (`interpretability.maps`). Scored as
  continuous maps by per-patch ROC AUC against the patch-level foreground (a patch is
  foreground when at least half of it is), pooled over all patches (`auroc`) and per image
  (`auroc_image`, see `map_scores`), and as masks (DINO's `mass` threshold, upsampled to
  pixels) by IoU against the pixel foreground: pooled over the images (`iou`) and as the
  mean of per-image IoUs (`miou`). For the head-averaged map (`mean_map`), the mean over
  heads of every head's score (`heads`), and the best head (`best_head`), chosen by AUROC on
  a separate selection split and scored on the evaluation split.
* pca: the first principal component of the patch "key" features `LN1(Z) U`, its sign
  chosen without labels (`segmentation.pca_foreground`): AUROC of the component, IoU of
  its foreground.
* maskcut: `maskcut_masks` MaskCut masks per image from the key features, scored against
  the instance masks by AP at IoU 0.5 (`ap50`; datasets with instance masks).
* parts: head-part consistency of every head's CLS map against the part masks
  (`scores.head_part_consistency`): mean and best over heads, and the chance level
  (datasets with part masks).

Metric names: `attention/auroc_mean_map`, `attention/iou_best_head`, `pca/miou`,
`maskcut/ap50`, `parts/consistency_best`, ...; `attention/best_head` is the chosen index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from crate_jax.data import pipeline
from crate_jax.interpretability import maps
from crate_jax.interpretability import scores
from crate_jax.interpretability import segmentation
from crate_jax.models import common


@dataclasses.dataclass(frozen=True)
class Collected:
  """What the scores need, per image: CLS maps `(B, K, gh, gw)`, patch key features
  `(B, gh*gw, C)`, and the ground truth `(B, S, S)` (instances and parts may be None)."""

  maps: np.ndarray
  keys: np.ndarray
  foreground: np.ndarray
  instances: np.ndarray | None
  parts: np.ndarray | None


def layer_outputs(model: Any, params: Any, images: jax.Array, layer: int) -> tuple:
  """`(CLS maps (B, K, gh, gw), patch key features (B, gh*gw, K*p))` at `layer`."""
  _, out = model.apply({"params": params}, images, method="encode", return_intermediates=True)
  inter = out["intermediates"]
  grid = common.grid_size(images.shape[1:3], model.dims()["patch_size"])
  cls_maps = maps.cls_attention_maps(inter["attn"][layer], grid)
  keys = maps.patch_tokens(maps.key_features(inter["head_proj"][layer]))
  return cls_maps, keys


def _auroc_per_head(collected: Collected, patch: tuple[int, int]) -> np.ndarray:
  _, labels = maps.patch_level_targets(collected.foreground, patch)
  labels = np.asarray(labels)
  return np.array(
    [scores.auroc(collected.maps[:, k], labels) for k in range(collected.maps.shape[1])]
  )


def _mask_scores(pred_patches: np.ndarray, foreground: np.ndarray, patch) -> tuple[float, float]:
  pred = np.asarray(maps.upsample(pred_patches, patch))
  target = foreground > 0
  pooled = np.sum(pred & target) / max(np.sum(pred | target), 1)
  return float(pooled), scores.mean_iou(pred, target)


def map_scores(
  score_maps: np.ndarray, foreground: np.ndarray, patch: tuple[int, int], mass: float = 0.6
) -> dict[str, float]:
  """How well continuous patch maps `(B, gh, gw)` find the foreground `(B, S, S)`.

  `auroc`: pooled over all patches; `auroc_image`: the mean of per-image AUROCs (images
  with foreground and background patches: how each map ranks its own image's patches);
  `iou` (pooled) and `miou` (per image) of the `mass` threshold. A fixed map of where
  objects usually are scores too, as far as positions are predictable: compare with the
  no-model baselines (benchmarks/scenes_baselines.py).
  """
  _, labels = maps.patch_level_targets(foreground, patch)
  labels = np.asarray(labels)
  per_image = [scores.auroc(m, t) for m, t in zip(score_maps, labels)]
  iou, miou = _mask_scores(np.asarray(maps.mass_threshold(score_maps, mass)), foreground, patch)
  return {
    "auroc": scores.auroc(score_maps, labels),
    "auroc_image": float(np.nanmean(per_image)),
    "iou": iou,
    "miou": miou,
  }


def score(
  collected: Collected,
  patch: tuple[int, int],
  *,
  best_head: int,
  mass: float = 0.6,
  maskcut_masks: int = 3,
  maskcut_tau: float = 0.15,
  num_part_types: int | None = None,
) -> dict[str, float]:
  """The module doc's metrics on `collected`, with `best_head` chosen elsewhere."""
  c, grid = collected, collected.maps.shape[-2:]
  results: dict[str, float] = {"attention/best_head": best_head}
  for name, m in (("mean_map", c.maps.mean(axis=1)), ("best_head", c.maps[:, best_head])):
    for key, value in map_scores(m, c.foreground, patch, mass).items():
      results[f"attention/{key}_{name}"] = value
  per_head = [map_scores(c.maps[:, k], c.foreground, patch, mass) for k in range(c.maps.shape[1])]
  for key in per_head[0]:
    results[f"attention/{key}_heads"] = float(np.mean([h[key] for h in per_head]))

  pca_mask, pca_scores = segmentation.pca_foreground(c.keys, grid)
  _, labels = maps.patch_level_targets(c.foreground, patch)
  results["pca/auroc"] = scores.auroc(pca_scores, np.asarray(labels))
  results["pca/iou"], results["pca/miou"] = _mask_scores(pca_mask, c.foreground, patch)

  if c.instances is not None:
    pred_masks, pred_scores, gt_masks = [], [], []
    for keys, instances in zip(c.keys, c.instances):
      cut = segmentation.maskcut(keys, grid, num_masks=maskcut_masks, tau=maskcut_tau)
      pred_masks.append(np.asarray(maps.upsample(cut.masks, patch)))
      pred_scores.append(cut.scores)
      ids = [i for i in np.unique(instances) if i]
      gt_masks.append(
        np.stack([instances == i for i in ids]) if ids else np.zeros((0,) + instances.shape, bool)
      )
    results["maskcut/ap50"] = scores.ap50_dataset(pred_masks, pred_scores, gt_masks)

  if c.parts is not None:
    num_part_types = num_part_types or int(c.parts.max())
    upsampled = np.asarray(maps.upsample(c.maps, patch, mode="nearest"))
    consistency = scores.head_part_consistency(upsampled, c.parts, num_part_types)
    results["parts/consistency_mean"] = float(np.mean(consistency.consistency))
    results["parts/consistency_best"] = float(np.max(consistency.consistency))
    results["parts/chance"] = float(consistency.chance)
  return results


class Evaluator:
  """The module doc's scores on the current parameters, as an evaluator.

  Args (the `config.evals` entry's fields):
    layer: which layer's attention and features (negative: from the last).
    num_images: evaluation images scored (the first ones of the split); None: all.
    selection_split: where the best head is chosen (default: the first `num_selection`
      images of `config.input.train_split`).
    num_selection: see above.
    mass, maskcut_masks, maskcut_tau, num_part_types: see `score`.
  """

  def __init__(
    self,
    context: Any,
    *,
    layer: int = -1,
    num_images: int | None = None,
    selection_split: str | None = None,
    num_selection: int = 256,
    mass: float = 0.6,
    maskcut_masks: int = 3,
    maskcut_tau: float = 0.15,
    num_part_types: int | None = None,
  ):
    self._context = context
    config = context.input_config
    self._eval_split = None
    if num_images:
      num_images = min(num_images, pipeline.num_examples(config, config.eval_split))
      self._eval_split = pipeline.first_examples(config.eval_split, num_images)
    num_selection = min(num_selection, pipeline.num_examples(config, config.train_split))
    self._selection_split = selection_split or pipeline.first_examples(
      config.train_split, num_selection
    )
    self._patch = common.pair(context.model.dims()["patch_size"])
    self._kwargs = dict(
      mass=mass,
      maskcut_masks=maskcut_masks,
      maskcut_tau=maskcut_tau,
      num_part_types=num_part_types,
    )
    model = context.model
    self._outputs = context.jit(
      lambda params, batch: (layer_outputs(model, params, batch["image"], layer), batch)
    )

  @staticmethod
  def supports(model_cls: type) -> bool:
    return model_cls.encode is not common.ModelBase.encode

  def collect(self, params: Any, split: str | None) -> Collected:
    """Maps, features and ground truth of the real examples of `split` (default: eval)."""
    chunks = []
    for batch in self._context.eval_batches(split, with_segmentation=True):
      (cls_maps, keys), batch = jax.device_get(self._outputs(params, batch))
      real = batch["mask"] > 0
      chunks.append(
        dict(
          maps=cls_maps[real],
          keys=keys[real],
          foreground=batch["segmentation"][real],
          instances=batch["instances"][real] if "instances" in batch else None,
          parts=batch["parts"][real] if "parts" in batch else None,
        )
      )
    merged = {
      k: None if chunks[0][k] is None else np.concatenate([c[k] for c in chunks]) for k in chunks[0]
    }
    return Collected(**merged)

  def run(self, params: Any, step: int | None = None) -> dict[str, float]:
    del step
    selection = self.collect(params, self._selection_split)
    best = int(scores.best_head(_auroc_per_head(selection, self._patch)))
    return score(
      self.collect(params, self._eval_split), self._patch, best_head=best, **self._kwargs
    )
