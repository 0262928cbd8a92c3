"""Figures of attention maps, PCA and MaskCut segmentations and head-part montages.

Each function takes images `(B, H, W, 3)` in `[0, 1]` and patch-grid arrays (from
`maps` and `segmentation`), draws one figure with Agg (no pyplot state) and returns it as
`uint8 (H, W, 3)`; with `path` it is also saved as a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import matplotlib
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np

from crate_jax.interpretability import maps

PathLike = str | os.PathLike[str] | None


def _render(fig: figure.Figure, path: PathLike) -> np.ndarray:
  canvas = backend_agg.FigureCanvasAgg(fig)
  canvas.draw()
  if path is not None:
    fig.savefig(path, format="png")
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _grid(rows: int, cols: int, cell: float = 1.6) -> tuple[figure.Figure, np.ndarray]:
  fig = figure.Figure(figsize=(cell * cols, cell * rows), dpi=100, layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  return fig, axes


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
  """`image` (H, W, 3) in [0, 1] blended with `heat` (H, W) min-max scaled, 'inferno'."""
  span = heat.max() - heat.min()
  scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
  colours = matplotlib.colormaps["inferno"](scaled)[..., :3]
  return np.clip((1 - alpha) * image + alpha * colours, 0.0, 1.0)


def attention_grid(
  images: np.ndarray,
  cls_maps: np.ndarray,
  patch_size: Sequence[int],
  *,
  title: str = "",
  path: PathLike = None,
) -> np.ndarray:
  """One row per image: the image, then every head's CLS map over it, then their mean.

  `cls_maps`: `(B, K, gh, gw)` (`maps.cls_attention_maps` of one layer).
  """
  b, k = cls_maps.shape[:2]
  fig, axes = _grid(b, k + 2)
  heat = np.asarray(maps.upsample(cls_maps, patch_size, mode="bilinear"))
  for i in range(b):
    axes[i, 0].imshow(images[i])
    for h in range(k):
      axes[i, h + 1].imshow(heat_overlay(images[i], heat[i, h]))
      if i == 0:
        axes[i, h + 1].set_title(f"head {h}", fontsize=8)
    axes[i, k + 1].imshow(heat_overlay(images[i], heat[i].mean(0)))
  axes[0, 0].set_title("image", fontsize=8)
  axes[0, k + 1].set_title("mean", fontsize=8)
  if title:
    fig.suptitle(title)
  return _render(fig, path)


def segmentation_grid(
  images: np.ndarray,
  columns: dict[str, np.ndarray],
  patch_size: Sequence[int],
  *,
  title: str = "",
  path: PathLike = None,
) -> np.ndarray:
  """One row per image: the image, then each named column overlaid on it.

  A column is `(B, gh, gw)` (a mask: shown as a tint; integer labels: one colour per label)
  or `(B, gh, gw, 3)` (colours, e.g. `segmentation.pca_parts`).
  """
  b = len(images)
  fig, axes = _grid(b, len(columns) + 1)
  palette = matplotlib.colormaps["tab10"]
  for i in range(b):
    axes[i, 0].imshow(images[i])
    for c, (name, column) in enumerate(columns.items(), start=1):
      value = np.asarray(column[i])
      if value.ndim == 3:  # Colours per patch.
        upsampled = np.asarray(maps.upsample(np.moveaxis(value, -1, 0), patch_size))
        overlay = 0.4 * images[i] + 0.6 * np.moveaxis(upsampled, 0, -1)
      else:
        labels = np.asarray(maps.upsample(value.astype(np.int32), patch_size))
        tint = palette(labels % 10)[..., :3]
        overlay = np.where(labels[..., None] > 0, 0.45 * images[i] + 0.55 * tint, 0.35 * images[i])
      axes[i, c].imshow(np.clip(overlay, 0.0, 1.0))
      if i == 0:
        axes[i, c].set_title(name, fontsize=8)
  axes[0, 0].set_title("image", fontsize=8)
  if title:
    fig.suptitle(title)
  return _render(fig, path)


def head_montage(
  images: np.ndarray,
  cls_maps: np.ndarray,
  patch_size: Sequence[int],
  *,
  title: str = "",
  path: PathLike = None,
) -> np.ndarray:
  """The CRATE papers' head figure: one row per head, its CLS map on each image."""
  b, k = cls_maps.shape[:2]
  fig, axes = _grid(k, b)
  heat = np.asarray(maps.upsample(cls_maps, patch_size, mode="bilinear"))
  for h in range(k):
    for i in range(b):
      axes[h, i].imshow(heat_overlay(images[i], heat[i, h]))
    axes[h, 0].set_axis_on()
    axes[h, 0].set_xticks([])
    axes[h, 0].set_yticks([])
    axes[h, 0].set_ylabel(f"head {h}", fontsize=8)
  if title:
    fig.suptitle(title)
  return _render(fig, path)
