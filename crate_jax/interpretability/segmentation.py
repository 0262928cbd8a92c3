"""Coarse and object segmentation from patch features (numpy/scipy; one image per call).

Features are the patch tokens of one image, shape `(N, C)` with `N = gh * gw` in row-major
grid order, e.g. `maps.patch_tokens(maps.key_features(head_proj[l, b]))` (the "key" features
`LN1(Z) @ U` of a layer; concatenate several layers along `C` if wanted). For a batch, loop
(`pca_foreground` also loops over leading axes itself). Inputs may be jax arrays; outputs are
numpy arrays. All functions are deterministic given their inputs.

* `pca_foreground` / `pca_parts`: the PCA visualisations of the CRATE and DINO demos.
* `normalized_cut` / `maskcut`: MaskCut (Wang et al., "Cut and Learn for Unsupervised Object
  Detection and Instance Segmentation", CVPR 2023), the object masks evaluated in the CRATE
  segmentation paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import chex
import numpy as np
import scipy.linalg
import scipy.ndimage

from crate_jax.models.common import pair


def border_mask(grid: int | Sequence[int]) -> np.ndarray:
  """Boolean `(gh, gw)` mask of the patches on the grid's border (first/last row or column)."""
  gh, gw = pair(grid)
  border = np.zeros((gh, gw), dtype=bool)
  border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
  return border


def _principal_components(x: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores `(N, num)` and directions `(num, C)` of the top `num` PCs of the rows of `x`."""
  x = x - x.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  num = min(num, vt.shape[0])
  return x @ vt[:num].T, vt[:num]


def orient_foreground(scores: np.ndarray, grid: int | Sequence[int]) -> np.ndarray:
  """Sign of a component so that `scores > 0` is the foreground side, without ground truth.

  Rule (an object rarely fills the image border): the foreground is the side (`> 0` or
  `<= 0`) holding fewer border patches; on a tie, the side with fewer patches; on a further
  tie, the `> 0` side. The rule depends only on the partition, so it gives the same mask
  whichever sign the eigen/SVD solver returns.

  Args:
    scores: component scores, shape `(gh * gw,)`.
    grid: `(gh, gw)`.

  Returns:
    `+1.0` or `-1.0`; multiply the scores by it.
  """
  border = border_mask(grid).reshape(-1)
  pos = np.asarray(scores).reshape(-1) > 0
  neg = ~pos
  key_pos = (int(np.sum(pos & border)), int(np.sum(pos)))
  key_neg = (int(np.sum(neg & border)), int(np.sum(neg)))
  return -1.0 if key_neg < key_pos else 1.0


def pca_foreground(
  features: np.ndarray, grid: int | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
  """Coarse foreground mask: the first principal component of the patch features, at 0.

  The features are centred over the patches, `s = (F - mean(F)) v_1` with `v_1` the first
  right singular vector, the sign chosen by `orient_foreground` (fewer border patches on the
  foreground side), and the mask is `s > 0`.

  Args:
    features: patch features, shape `(..., N, C)`, `N = gh * gw`; leading axes are looped.
    grid: `(gh, gw)`.

  Returns:
    `(mask, scores)`: boolean `(..., gh, gw)` and float `(..., gh, gw)` (foreground positive).
  """
  gh, gw = pair(grid)
  f = np.asarray(features, dtype=np.float64)
  chex.assert_rank(f, {2, 3, 4})
  chex.assert_equal(f.shape[-2], gh * gw)
  lead = f.shape[:-2]
  scores = np.zeros(lead + (gh * gw,))
  for index in np.ndindex(*lead):
    s = _principal_components(f[index], 1)[0][:, 0]
    scores[index] = s * orient_foreground(s, (gh, gw))
  scores = scores.reshape(lead + (gh, gw))
  return scores > 0, scores


def pca_parts(features: np.ndarray, foreground: np.ndarray, num_components: int = 3) -> np.ndarray:
  """Part colouring: PCA on the foreground patches only, components as RGB in `[0, 1]`.

  The foreground features are centred, projected on their top `num_components` principal
  directions, each component min-max scaled to `[0, 1]` over the foreground patches and
  signed so that its largest-magnitude score is positive (deterministic colours); background
  patches are black (0). Missing components (fewer foreground patches or channels) are 0.

  Args:
    features: patch features, shape `(N, C)`.
    foreground: boolean foreground mask, shape `(N,)` or `(gh, gw)` with `gh * gw = N`.
    num_components: number of colour channels (3 for RGB).

  Returns:
    Colours of shape `foreground.shape + (num_components,)`.
  """
  f = np.asarray(features, dtype=np.float64)
  fg = np.asarray(foreground, dtype=bool)
  chex.assert_rank(f, 2)
  chex.assert_equal(fg.size, f.shape[0])
  colours = np.zeros((f.shape[0], num_components))
  idx = np.flatnonzero(fg.reshape(-1))
  if idx.size >= 2:
    s, _ = _principal_components(f[idx], num_components)
    for c in range(s.shape[1]):
      sc = s[:, c]
      if sc[np.argmax(np.abs(sc))] < 0:
        sc = -sc
      span = sc.max() - sc.min()
      colours[idx, c] = (sc - sc.min()) / span if span > 0 else 0.0
  return colours.reshape(fg.shape + (num_components,))


class Cut(NamedTuple):
  """A normalised-cut bipartition: `partition = eigenvector > mean(eigenvector)`."""

  partition: np.ndarray  # (N,) bool
  eigenvector: np.ndarray  # (N,) the second smallest generalised eigenvector
  eigenvalue: float  # its eigenvalue (the relaxed normalised-cut value)


def normalized_cut(affinity: np.ndarray) -> Cut:
  """Shi-Malik normalised cut: bipartition by the second smallest generalised eigenvector.

  Solves `(D - W) v = lambda D v` with `D = diag(W 1)` (`scipy.linalg.eigh`), takes the
  eigenvector of the second smallest eigenvalue and splits at its mean: `v > mean(v)`. The
  eigenvector's sign is the solver's (arbitrary): callers choose the foreground side.

  Args:
    affinity: symmetric non-negative `W`, shape `(N, N)`, `N >= 2`, every row sum positive.

  Returns:
    A `Cut`.
  """
  w = np.asarray(affinity, dtype=np.float64)
  chex.assert_rank(w, 2)
  chex.assert_equal(w.shape[0], w.shape[1])
  d = np.diag(w.sum(axis=1))
  vals, vecs = scipy.linalg.eigh(d - w, d, subset_by_index=[1, 1])
  v = vecs[:, 0]
  return Cut(v > v.mean(), v, float(vals[0]))


def ncut_value(affinity: np.ndarray, part: np.ndarray) -> float:
  """`Ncut(A, B) = cut(A, B) / assoc(A, V) + cut(A, B) / assoc(B, V)`, `B = V \\ A`, in [0, 2].

  `cut(A, B) = sum_{i in A, j in B} W_ij`, `assoc(A, V) = sum_{i in A, j in V} W_ij`. An empty
  side gives 2 (the worst value).
  """
  w = np.asarray(affinity, dtype=np.float64)
  a = np.asarray(part, dtype=bool).reshape(-1)
  b = ~a
  if not a.any() or not b.any():
    return 2.0
  cut = w[np.ix_(a, b)].sum()
  return float(cut / w[a].sum() + cut / w[b].sum())


def cosine_affinity(features: np.ndarray, tau: float = 0.15, eps: float = 1e-5) -> np.ndarray:
  """MaskCut's binary graph: `W_ij = 1` if `cos(f_i, f_j) > tau` else `eps` (rows L2-normalised)."""
  f = np.asarray(features, dtype=np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  return np.where(f @ f.T > tau, 1.0, eps)


class MaskCutResult(NamedTuple):
  """MaskCut output: `masks` `(num_masks, gh, gw)` bool and `scores` `(num_masks,)`."""

  masks: np.ndarray
  scores: np.ndarray


_CORNERS = ((0, 0), (0, -1), (-1, 0), (-1, -1))


def maskcut(
  features: np.ndarray,
  grid: int | Sequence[int],
  num_masks: int = 3,
  tau: float = 0.15,
  eps: float = 1e-5,
  flip_corners: int = 3,
) -> MaskCutResult:
  """MaskCut: repeated normalised cuts of the patch-affinity graph, one object mask per cut.

  For each of `num_masks` rounds, on the patches not yet assigned to a mask (the assigned
  ones are dropped from the graph, i.e. rows and columns removed):

  1. `W = cosine_affinity(features, tau, eps)` (L2-normalised features, `1` above `tau`,
     `eps` otherwise) and `normalized_cut(W)`: `v` and the split `v > mean(v)`.
  2. Foreground side: the side holding the seed `argmax |v|`; if that side holds at least
     `flip_corners` of the four grid corners, the sides are swapped (object-centric prior).
     The published `maskcut.py` swaps at 3 or more corners (its default here); pass
     `flip_corners=2` for the stricter rule. The seed is then the extreme of `v` on the
     foreground side (`argmax v` on the high side, `argmin v` on the low side), as published.
  3. The mask is the 4-connected component of the foreground (on the grid) that contains the
     seed.

  Score of a mask: `1 - Ncut(mask, rest) / 2` in `[0, 1]`, the normalised-cut value
  (`ncut_value`) of the final mask against the other unassigned patches on the graph it was
  cut from; higher means a cleaner, better separated segment (the first, object, mask of a
  clear image scores near 1). A round with fewer than 2 unassigned patches gives an empty mask
  with score 0 (as does a degenerate, constant eigenvector). Masks are disjoint. Unlike the published pipeline, no CRF refinement and no
  small-mask filter are applied (work on the patch grid; upsample with `maps.upsample`).

  Args:
    features: patch features of one image, shape `(N, C)`, `N = gh * gw`.
    grid: `(gh, gw)`.
    num_masks: number of cuts.
    tau: cosine-similarity threshold of the binary graph.
    eps: weight of the non-edges (keeps the graph connected).
    flip_corners: swap sides when the foreground holds at least this many corners (5 disables).

  Returns:
    A `MaskCutResult` of masks `(num_masks, gh, gw)` and scores `(num_masks,)`.
  """
  gh, gw = pair(grid)
  f = np.asarray(features, dtype=np.float64)
  chex.assert_rank(f, 2)
  chex.assert_equal(f.shape[0], gh * gw)
  w_full = cosine_affinity(f, tau, eps)
  corners = np.zeros((gh, gw), dtype=bool)
  for c in _CORNERS:
    corners[c] = True
  corners = corners.reshape(-1)
  assigned = np.zeros(gh * gw, dtype=bool)
  masks = np.zeros((num_masks, gh, gw), dtype=bool)
  scores = np.zeros(num_masks)
  for m in range(num_masks):
    active = np.flatnonzero(~assigned)
    if active.size < 2:
      break
    w = w_full[np.ix_(active, active)]
    cut = normalized_cut(w)
    v = cut.eigenvector
    high = cut.partition
    fg_high = bool(high[np.argmax(np.abs(v))])  # The seed's side.
    if np.sum((high if fg_high else ~high) & corners[active]) >= flip_corners:
      fg_high = not fg_high
    side = high if fg_high else ~high
    seed = active[np.argmax(v) if fg_high else np.argmin(v)]
    fg_grid = np.zeros(gh * gw, dtype=bool)
    fg_grid[active[side]] = True
    labels, _ = scipy.ndimage.label(fg_grid.reshape(gh, gw))
    seed_label = labels.reshape(-1)[seed]
    if seed_label == 0:  # Degenerate (constant) eigenvector: nothing to cut.
      break
    mask = labels == seed_label
    masks[m] = mask
    scores[m] = 1.0 - ncut_value(w, mask.reshape(-1)[active]) / 2.0
    assigned |= mask.reshape(-1)
  return MaskCutResult(masks, scores)
