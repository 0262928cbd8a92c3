"""What the per-family converters share: errors, the entry format, geometry inference."""

from __future__ import annotations

from collections.abc import Callable
import re
from typing import Any
from typing import NamedTuple

import numpy as np

from crate_jax.models import common

StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint that cannot be read or does not fit the requested model."""


class Entry(NamedTuple):
  """One parameter: its published name, our '/'-joined path, and the two layout maps."""

  published: str
  ours: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_published: Callable[[np.ndarray], np.ndarray]


def transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def same(x: np.ndarray) -> np.ndarray:
  return x


def renamed(published: str, ours: str) -> Entry:
  return Entry(published, ours, same, same)


def layer_count(state: StateDict, pattern: str) -> int:
  idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
  if not idx or idx != set(range(len(idx))):
    raise ConversionError(
      f"Layers matching {pattern!r} are missing or not numbered 0..L-1: {sorted(idx)}."
    )
  return len(idx)


def square_side(n: int, what: str) -> int:
  try:
    return common.square_side(n, what)
  except ValueError as e:
    raise ConversionError(f"{e}: pass image_size and patch_size explicitly.") from e


def infer_geometry(
  n_tokens: int, patch: tuple[int, int] | None, image_size: Any, channels_x_patch: int | None
) -> tuple[tuple[int, int], tuple[int, int]]:
  """(image_size, patch_size) from the token count, the patch vector length and overrides."""
  if patch is None:
    side = square_side(channels_x_patch // 3, "Patch pixel count (patch vector length / 3)")
    patch = (side, side)
  if image_size is None:
    g = square_side(n_tokens, "Number of patch tokens")
    image_size = (g * patch[0], g * patch[1])
  image_size = common.pair(image_size)
  grid = common.grid_size(image_size, patch)
  if grid[0] * grid[1] != n_tokens:
    raise ConversionError(
      f"pos_embedding holds {n_tokens} patch tokens but image_size {image_size} with patch "
      f"{patch} gives a {grid} grid ({grid[0] * grid[1]} tokens): pass a matching image_size."
    )
  return image_size, patch


def check_heads(heads: int, inner: int, key: str, shape: tuple[int, ...]) -> int:
  if heads <= 0 or inner % heads:
    raise ConversionError(
      f"heads={heads} does not divide the head axis of {key} {shape} ({inner})."
    )
  return inner // heads
