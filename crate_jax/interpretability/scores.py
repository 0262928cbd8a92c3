"""Scores for attention maps and masks, head selection, and no-model baselines (numpy/scipy).

Masks are boolean arrays whose last two axes are spatial (patch grid or pixels: any
resolution, as long as the arrays compared share it). Inputs may be jax arrays; outputs are
numpy arrays or Python floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import chex
import numpy as np
import scipy.stats

from crate_jax.models.common import pair


def iou(pred: np.ndarray, target: np.ndarray, empty: float = 1.0) -> np.ndarray:
  """Intersection over union of binary masks, `|P & G| / |P | G|` over the last two axes.

  When the union is empty (both masks empty) the prediction agrees perfectly with the
  target, so the IoU is `empty`, 1.0 by default (pass `np.nan` to leave such pairs out of
  `mean_iou`).

  Args:
    pred: boolean masks, shape `(..., H, W)`.
    target: boolean masks, broadcastable against `pred`.
    empty: the value for an empty union.

  Returns:
    IoU of shape `(...)` (a numpy float array; 0-d for one pair).
  """
  p = np.asarray(pred, dtype=bool)
  g = np.asarray(target, dtype=bool)
  chex.assert_rank(p, {2, 3, 4, 5})
  inter = np.sum(p & g, axis=(-2, -1))
  union = np.sum(p | g, axis=(-2, -1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, inter / np.maximum(union, 1), empty).astype(np.float64)


def mean_iou(pred: np.ndarray, target: np.ndarray, empty: float = 1.0) -> float:
  """Mean over images (all leading axes) of the per-image `iou`; NaN entries are skipped.

  With `empty=np.nan` images whose prediction and target are both empty are left out; if no
  image remains the result is NaN.
  """
  values = iou(pred, target, empty).reshape(-1)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve of `scores` for binary `labels`, pooled over all given entries.

  Mann-Whitney form: `AUC = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)`, `R_+` the sum of the
  ranks of the positives among all scores with tied scores given their average rank (a tie
  between a positive and a negative counts 1/2). It is the probability that a random positive
  outscores a random negative: 1.0 for a perfect map, 0.5 for a constant one, 0.0 for an
  inverted one. NaN if either class is absent.

  Args:
    scores: per-patch (or per-pixel) scores, any shape.
    labels: booleans of the same shape.

  Returns:
    The AUC as a float.
  """
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  y = np.asarray(labels, dtype=bool).reshape(-1)
  chex.assert_equal(s.shape, y.shape)
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = scipy.stats.rankdata(s)  # average ranks for ties
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------------------
# Instance masks: COCO-style AP at IoU 0.5.
# --------------------------------------------------------------------------------------


def _pairwise_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """IoU matrix `(M, G)` of `(M, H, W)` and `(G, H, W)` boolean masks (empty union -> 0)."""
  p = pred.reshape(pred.shape[0], -1).astype(np.float64)
  g = gt.reshape(gt.shape[0], -1).astype(np.float64)
  inter = p @ g.T
  union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_instances(
  pred_masks: np.ndarray,
  pred_scores: np.ndarray,
  gt_masks: np.ndarray,
  iou_threshold: float = 0.5,
  max_dets: int | None = 100,
) -> tuple[np.ndarray, np.ndarray]:
  """COCO greedy matching of one image's predictions to its ground-truth instances.

  Predictions are ranked by score (descending, ties kept in the given order), the top
  `max_dets` kept; each in turn is matched to the still unmatched ground-truth instance of
  highest IoU among those with IoU `>= iou_threshold`, if any (a true positive), otherwise it
  is a false positive.

  Args:
    pred_masks: `(M, H, W)` boolean.
    pred_scores: `(M,)`.
    gt_masks: `(G, H, W)` boolean.
    iou_threshold: the IoU for a match.
    max_dets: at most this many predictions per image (COCO: 100); None keeps all.

  Returns:
    `(scores, is_tp)` of the kept predictions in rank order, both `(M',)`.
  """
  pm = np.asarray(pred_masks, dtype=bool)
  ps = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
  gm = np.asarray(gt_masks, dtype=bool)
  chex.assert_rank(pm, 3)
  chex.assert_rank(gm, 3)
  chex.assert_equal(pm.shape[0], ps.shape[0])
  order = np.argsort(-ps, kind="stable")
  if max_dets is not None:
    order = order[:max_dets]
  if gm.shape[0] == 0 or order.size == 0:
    return ps[order], np.zeros(order.size, dtype=bool)
  chex.assert_equal(pm.shape[1:], gm.shape[1:])
  ious = _pairwise_iou(pm[order], gm)
  matched = np.zeros(gm.shape[0], dtype=bool)
  is_tp = np.zeros(order.size, dtype=bool)
  for r in range(order.size):
    candidates = np.where(matched, -1.0, ious[r])
    best = int(np.argmax(candidates))
    if candidates[best] >= iou_threshold:
      matched[best] = True
      is_tp[r] = True
  return ps[order], is_tp


def average_precision_from_matches(
  scores: np.ndarray, is_tp: np.ndarray, num_gt: int, recall_points: int = 101
) -> float:
  """COCO's interpolated AP from pooled, matched predictions.

  All predictions (over all images) are ranked by score (descending, stable), giving
  cumulative precision `P_r = TP_r / r` and recall `R_r = TP_r / num_gt`. The precision is made
  monotone, `P~_r = max_{r' >= r} P_r'`, and sampled at the recall levels
  `t in {0, 0.01, ..., 1}` (`recall_points = 101`, as COCO): at each `t` the interpolated
  precision of the first rank with `R_r >= t`, or 0 if the recall never reaches `t`. AP is the
  mean of the samples. NaN when there is no ground truth (COCO's -1); 0 with no predictions.
  """
  if num_gt == 0:
    return float("nan")
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  tp = np.asarray(is_tp, dtype=bool).reshape(-1)
  if s.size == 0:
    return 0.0
  order = np.argsort(-s, kind="stable")
  tp = tp[order]
  tp_cum = np.cumsum(tp)
  recall = tp_cum / num_gt
  precision = tp_cum / np.arange(1, tp.size + 1)
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  levels = np.linspace(0.0, 1.0, recall_points)
  idx = np.searchsorted(recall, levels, side="left")
  sampled = np.where(idx < recall.size, precision[np.minimum(idx, recall.size - 1)], 0.0)
  return float(sampled.mean())


def ap50_dataset(
  pred_masks: Sequence[np.ndarray],
  pred_scores: Sequence[np.ndarray],
  gt_masks: Sequence[np.ndarray],
  iou_threshold: float = 0.5,
  max_dets: int | None = 100,
) -> float:
  """COCO-style mask AP at IoU 0.5 over a set of images (class-agnostic).

  Each image's predictions are matched to its ground truth (`match_instances`), then all
  predictions are pooled and ranked by score and AP is computed with COCO's 101-point
  interpolation (`average_precision_from_matches`), the total number of ground-truth
  instances as the recall denominator. No crowd/ignore regions and no area ranges.

  Args:
    pred_masks: per image, `(M_i, H, W)` boolean (`M_i` may be 0).
    pred_scores: per image, `(M_i,)`; higher is more confident.
    gt_masks: per image, `(G_i, H, W)` boolean, at the predictions' resolution.
    iou_threshold: 0.5 for AP50.
    max_dets: predictions kept per image (COCO: 100).

  Returns:
    AP in `[0, 1]`; NaN if there is no ground-truth instance at all.
  """
  chex.assert_equal(len(pred_masks), len(pred_scores))
  chex.assert_equal(len(pred_masks), len(gt_masks))
  all_scores, all_tp, num_gt = [], [], 0
  for pm, ps, gm in zip(pred_masks, pred_scores, gt_masks):
    s, tp = match_instances(pm, ps, gm, iou_threshold, max_dets)
    all_scores.append(s)
    all_tp.append(tp)
    num_gt += np.asarray(gm).shape[0]
  scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
  is_tp = np.concatenate(all_tp) if all_tp else np.zeros(0, dtype=bool)
  return average_precision_from_matches(scores, is_tp, num_gt)


def ap50(
  pred_masks: np.ndarray,
  pred_scores: np.ndarray,
  gt_masks: np.ndarray,
  iou_threshold: float = 0.5,
  max_dets: int | None = 100,
) -> float:
  """`ap50_dataset` of one image: `pred_masks (M, H, W)`, `pred_scores (M,)`, `gt_masks (G, H, W)`."""
  return ap50_dataset([pred_masks], [pred_scores], [gt_masks], iou_threshold, max_dets)


# --------------------------------------------------------------------------------------
# Head semantics and selection.
# --------------------------------------------------------------------------------------


class HeadPartConsistency(NamedTuple):
  """Result of `head_part_consistency` (`P` part types, `B` images, `K` heads)."""

  mass: np.ndarray  # (..., B, K, P) fraction of each map's mass on part types 1..P
  preferred: np.ndarray  # (..., B, K) preferred part type in 1..P, 0 = none
  modal: np.ndarray  # (..., K) most frequent preferred part type (0 if never any)
  consistency: np.ndarray  # (..., K) fraction of valid images preferring the modal part
  chance: float  # consistency of a head choosing uniformly among the present part types
  num_valid: int  # images with at least one part present (the denominator)


def head_part_consistency(
  attn_maps: np.ndarray, part_masks: np.ndarray, num_part_types: int
) -> HeadPartConsistency:
  """How consistently each head attends to the same semantic part type across images.

  Definitions (`m` a head's non-negative map on image `b`, `S_t` the pixels of part type `t`):

  * mass: `mass[b, k, t] = sum_{S_t} m / sum m`, the fraction of the head's whole map (the
    background included in the denominator) on part type `t = 1..P` (0 if the map is 0).
  * preferred part: `argmax_t mass[b, k, t]` over the part types present in image `b`
    (background excluded: it is the largest region of most images and says nothing about
    parts; ties -> the lowest type). 0 ("none") if the head puts no mass on any part.
  * valid images: those with at least one part type present; others are left out.
  * modal part: the part type preferred on most valid images (ties -> lowest type).
  * consistency: the fraction of valid images on which the head prefers its modal part
    (a miss where it prefers another part or none). A head always preferring type `t` scores 1.
  * chance: `max_t mean_b [t present in b] / n_b`, `n_b` the number of part types present in
    image `b`: the expected consistency of a head choosing uniformly at random among the
    present part types (1/P when all are always present), against its best fixed part. The
    score of such a random head is a little above it, because its modal part is chosen after
    the fact (by about one standard error, `~sqrt(c (1 - c) / num_valid)`).

  Note that mass grows with area: a head attending uniformly prefers the largest part; the
  chance level assumes parts of comparable size.

  Args:
    attn_maps: non-negative maps, `(..., B, K, h, w)` (e.g. `cls_attention_maps` of one layer
      or of all layers).
    part_masks: integer part labels, `(B, h, w)`, 0 background, `1..P` part types.
    num_part_types: `P`.

  Returns:
    A `HeadPartConsistency`.
  """
  a = np.asarray(attn_maps, dtype=np.float64)
  parts = np.asarray(part_masks)
  chex.assert_rank(parts, 3)
  chex.assert_rank(a, {4, 5})
  chex.assert_equal(a.shape[-2:], parts.shape[-2:])
  chex.assert_equal(a.shape[-4], parts.shape[0])
  p = num_part_types
  onehot = (parts[..., None] == np.arange(1, p + 1)).astype(np.float64)  # (B, h, w, P)
  total = a.sum(axis=(-2, -1))[..., None]  # (..., B, K, 1)
  on_parts = np.einsum("...bkhw,bhwp->...bkp", a, onehot)
  mass = np.where(total > 0, on_parts / np.where(total > 0, total, 1.0), 0.0)
  present = onehot.sum(axis=(1, 2)) > 0  # (B, P)
  masked = np.where(present[:, None, :], mass, -np.inf)
  preferred = np.argmax(masked, axis=-1) + 1
  any_mass = np.take_along_axis(mass, preferred[..., None] - 1, axis=-1)[..., 0] > 0
  preferred = np.where(any_mass, preferred, 0)
  valid = present.any(axis=-1)  # (B,)
  num_valid = int(valid.sum())
  pref_valid = preferred[..., valid, :]  # (..., B', K)
  counts = (pref_valid[..., None] == np.arange(1, p + 1)).sum(axis=-3)  # (..., K, P)
  modal = np.where(counts.max(axis=-1) > 0, np.argmax(counts, axis=-1) + 1, 0)
  if num_valid:
    consistency = counts.max(axis=-1) / num_valid
    n_b = present[valid].sum(axis=-1, keepdims=True)
    chance = float(np.max(np.mean(present[valid] / n_b, axis=0)))
  else:
    consistency = np.full(modal.shape, np.nan)
    chance = float("nan")
  return HeadPartConsistency(mass, preferred, modal, consistency, chance, num_valid)


def best_head(per_head_scores: np.ndarray) -> int | tuple[int, ...]:
  """Index of the best head (highest score, NaN ignored, first on ties).

  Choose it on a selection split and report its score on a separate evaluation split, e.g.
  `k = best_head(score_sel); score_eval[k]`. For a `(K,)` input the index is an int; for
  `(L, K)` (layers x heads) or more axes, a tuple indexing the array.
  """
  s = np.asarray(per_head_scores, dtype=np.float64)
  if s.size == 0 or np.all(np.isnan(s)):
    raise ValueError("No finite head score to choose from.")
  flat = int(np.nanargmax(s.reshape(-1)))
  if s.ndim <= 1:
    return flat
  return tuple(int(i) for i in np.unravel_index(flat, s.shape))


# --------------------------------------------------------------------------------------
# No-model baselines.
# --------------------------------------------------------------------------------------


def position_prior(train_masks: np.ndarray) -> np.ndarray:
  """Mean foreground map over a training set: `(N, h, w)` masks -> `(h, w)` map in `[0, 1]`.

  Scoring it on evaluation images measures how much a map gets from object position alone.
  """
  m = np.asarray(train_masks, dtype=np.float64)
  chex.assert_rank(m, {3, 4})
  return m.reshape((-1,) + m.shape[-2:]).mean(axis=0)


def centred_blob(grid: int | Sequence[int], sigma: float = 0.25) -> np.ndarray:
  """A centred Gaussian map on the grid: `exp(-((y - 1/2)^2 + (x - 1/2)^2) / (2 sigma^2))`.

  `y = (i + 1/2) / gh` and `x = (j + 1/2) / gw` are patch centres in normalised image
  coordinates, so `sigma` is a fraction of the image side (per axis on non-square grids).
  """
  gh, gw = pair(grid)
  y = (np.arange(gh) + 0.5) / gh - 0.5
  x = (np.arange(gw) + 0.5) / gw - 0.5
  return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))


def colour_contrast(images: np.ndarray, patch_size: int | Sequence[int]) -> np.ndarray:
  """A saliency map that learns nothing: each patch's distance from its image's mean colour.

  `images` `(B, H, W, C)` -> `(B, H / p1, W / p2)`: the patch's mean colour's Euclidean
  distance from the mean patch colour of the image.
  """
  p1, p2 = pair(patch_size)
  x = np.asarray(images, dtype=np.float64)
  b, h, w, c = x.shape
  colours = x.reshape(b, h // p1, p1, w // p2, p2, c).mean((2, 4))
  return np.linalg.norm(colours - colours.mean((1, 2), keepdims=True), axis=-1)
