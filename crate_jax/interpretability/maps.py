"""Attention maps and patch features from the intermediates, and patch <-> pixel resolution.

All functions are `jax.numpy` functions of arrays with any number of leading batch axes
(`...`), so they apply to one layer (`attn` of shape `(B, K, T, T)`) or to all layers at once
(`(L, B, K, T, T)`), and work under `jit` (shapes and options static).

Token layout: `T = num_prefix_tokens + gh * gw`; the prefix tokens (CLS) come first, then the
patch tokens in row-major grid order, so patch `(i, j)` is token `num_prefix_tokens + i * gw + j`.

Pixel layout: patch `(i, j)` of a `(p1, p2)` patch size covers the pixels
`[i * p1, (i + 1) * p1) x [j * p2, (j + 1) * p2)` (the patchify of `crate_jax.models`).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from crate_jax.models.common import pair

Array = jax.Array


def cls_attention_maps(
  attn: Array, grid: int | Sequence[int], num_prefix_tokens: int = 1, query: int = 0
) -> Array:
  """The CLS token's attention over the patch tokens, per head, on the patch grid.

  `maps[..., k, i, j] = attn[..., k, query, num_prefix_tokens + i * gw + j]`: the softmax row
  of the CLS query (rows are queries), restricted to the patch keys (not renormalised: the
  mass the CLS token puts on the prefix tokens is dropped).

  Args:
    attn: softmax attention, shape `(..., K, T, T)`.
    grid: `(gh, gw)` patch grid (an int for a square grid).
    num_prefix_tokens: tokens before the patches (1: the CLS token).
    query: the query row, 0 for the CLS token.

  Returns:
    Maps of shape `(..., K, gh, gw)`.
  """
  gh, gw = pair(grid)
  chex.assert_rank(attn, {3, 4, 5, 6})
  t = attn.shape[-1]
  chex.assert_equal(attn.shape[-2], t)
  if t != num_prefix_tokens + gh * gw:
    raise ValueError(f"{t} tokens do not match {num_prefix_tokens} prefix + grid {(gh, gw)}.")
  row = attn[..., query, num_prefix_tokens:]
  return row.reshape(row.shape[:-1] + (gh, gw))


def key_features(head_proj: Array) -> Array:
  """The "key" features `LN1(Z) @ U` with the heads side by side: `(..., T, K, p) -> (..., T, K*p)`.

  Head `k` occupies columns `[k * p, (k + 1) * p)` (head-major, as the published `(K*p, d)`
  projection).
  """
  chex.assert_rank(head_proj, {3, 4, 5})
  return head_proj.reshape(head_proj.shape[:-2] + (head_proj.shape[-2] * head_proj.shape[-1],))


def patch_tokens(x: Array, num_prefix_tokens: int = 1, axis: int = -2) -> Array:
  """Drops the prefix (CLS) tokens along the token `axis`: `T -> gh * gw` there.

  Use `axis=-2` on `key_features` output `(..., T, C)` and `axis=-3` on `head_proj`
  `(..., T, K, p)`.
  """
  axis = axis % x.ndim
  index = (slice(None),) * axis + (slice(num_prefix_tokens, None),)
  return x[index]


def mass_threshold(maps: Array, mass: float = 0.6) -> Array:
  """DINO's attention-mass threshold: keep the top patches holding `mass` of each map's total.

  Per map (the last two axes), values are sorted in ascending order and normalised by the
  map's total, `c_r` is their cumulative sum up to rank `r`, and a patch is kept iff
  `c_r > 1 - mass` (exactly the rule of DINO's `visualize_attention.py`). Equivalently the
  kept patches are the highest-valued ones, down to and including the first one at which the
  kept mass reaches `mass`. Ties are broken by position (stable sort). A map with zero total
  gives an empty mask.

  Args:
    maps: non-negative maps, shape `(..., gh, gw)`.
    mass: fraction of the total mass to keep, in `(0, 1]`.

  Returns:
    Boolean masks of shape `(..., gh, gw)`.
  """
  chex.assert_rank(maps, {2, 3, 4, 5, 6})
  shape = maps.shape
  flat = maps.reshape(shape[:-2] + (shape[-2] * shape[-1],))
  order = jnp.argsort(flat, axis=-1, stable=True)
  vals = jnp.take_along_axis(flat, order, axis=-1)
  total = jnp.sum(vals, axis=-1, keepdims=True)
  cum = jnp.cumsum(vals, axis=-1) / total
  keep_sorted = cum > 1.0 - mass
  keep_sorted = jnp.where(total > 0, keep_sorted, False)
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep_sorted, inverse, axis=-1).reshape(shape)


def _linear_axis(x: Array, axis: int, factor: int) -> Array:
  """Linear interpolation along `axis` by an integer factor, half-pixel centres, edge clamp."""
  g = x.shape[axis]
  u = (jnp.arange(g * factor, dtype=jnp.float32) + 0.5) / factor - 0.5
  lo = jnp.floor(u)
  w = (u - lo).astype(x.dtype)
  lo = lo.astype(jnp.int32)
  i0 = jnp.clip(lo, 0, g - 1)
  i1 = jnp.clip(lo + 1, 0, g - 1)
  shape = [1] * x.ndim
  shape[axis] = g * factor
  w = w.reshape(shape)
  return (1 - w) * jnp.take(x, i0, axis=axis) + w * jnp.take(x, i1, axis=axis)


def upsample(maps: Array, patch_size: int | Sequence[int], mode: str = "nearest") -> Array:
  """Patch-grid maps or masks to image resolution, aligned with the patches.

  `(..., gh, gw) -> (..., gh * p1, gw * p2)`.

  * `"nearest"`: every pixel of patch `(i, j)`'s block
    `[i * p1, (i + 1) * p1) x [j * p2, (j + 1) * p2)` takes the patch's value (dtype kept: use
    it for masks).
  * `"bilinear"`: for continuous maps. The patch value sits at the patch's centre; pixel `y`
    (centre `y + 0.5`) is at grid coordinate `u = (y + 0.5) / p1 - 0.5` and takes
    `(1 - f) * m[floor(u)] + f * m[floor(u) + 1]`, `f = u - floor(u)`, indices clamped to the
    grid (so the outer half-patch border is constant), separably along both axes. This is the
    half-pixel-centre convention (`jax.image.resize`, PyTorch `align_corners=False`), the one
    consistent with the block layout above. Returns floats; constant maps stay constant.

  Args:
    maps: shape `(..., gh, gw)`.
    patch_size: `p` or `(p1, p2)` (height, width), non-square allowed.
    mode: `"nearest"` or `"bilinear"`.

  Returns:
    Maps of shape `(..., gh * p1, gw * p2)`.
  """
  p1, p2 = pair(patch_size)
  chex.assert_rank(maps, {2, 3, 4, 5, 6})
  if mode == "nearest":
    return jnp.repeat(jnp.repeat(maps, p1, axis=-2), p2, axis=-1)
  if mode == "bilinear":
    x = jnp.asarray(maps)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(jnp.float32)
    return _linear_axis(_linear_axis(x, x.ndim - 2, p1), x.ndim - 1, p2)
  raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}.")


def patch_level_targets(
  pixel_mask: Array, patch_size: int | Sequence[int], threshold: float = 0.5
) -> tuple[Array, Array]:
  """Pixel masks to patch-level targets: covered fraction per patch, and its binarisation.

  `fraction[..., i, j]` is the mean of the mask over patch `(i, j)`'s pixel block; the binary
  target is `fraction >= threshold` (a patch at least half covered is foreground by default).
  The image size must be a multiple of the patch size.

  Args:
    pixel_mask: boolean or `[0, 1]` masks, shape `(..., H, W)`.
    patch_size: `p` or `(p1, p2)`.
    threshold: binarisation threshold on the fraction.

  Returns:
    `(fraction, binary)`, float and boolean, both of shape `(..., H / p1, W / p2)`.
  """
  p1, p2 = pair(patch_size)
  h, w = pixel_mask.shape[-2:]
  if h % p1 or w % p2:
    raise ValueError(f"Mask size {(h, w)} is not a multiple of the patch size {(p1, p2)}.")
  x = jnp.asarray(pixel_mask, dtype=jnp.float32)
  x = x.reshape(x.shape[:-2] + (h // p1, p1, w // p2, p2))
  fraction = jnp.mean(x, axis=(-3, -1))
  return fraction, fraction >= threshold
