"""Masked reconstruction of a masked autoencoder: its loss over the evaluation split, and a
grid of reconstructions.

Masks come from noise drawn with `seed`: the same masks at every evaluation. Metrics:

  loss          the masked-patch mean squared error (`ops.masked_patch_loss`, in the
                model's target space: per-patch normalised pixels with `norm_pix_loss`),
                per image, averaged over the real images of the split.
  num_examples  those images.
  grid          an image: for the first `num_images` evaluation images, one row each of the
                original, the masked input (masked patches grey) and the reconstruction
                with the visible patches pasted in. Also saved as `<entry name>_<step>.png`
                in the workdir.
"""

from __future__ import annotations

import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from crate_jax import ops
from crate_jax.models import common


def _noise(seed: int, index: int, shape: tuple[int, ...], grid: bool = False) -> np.ndarray:
  """Masking noise of batch `index` (of this process), or of the grid's images."""
  rng = np.random.default_rng([seed, int(grid), index, jax.process_index()])
  return rng.uniform(size=shape).astype(np.float32)


def reconstruct(model: Any, params: Any, images: jax.Array, noise: jax.Array) -> dict:
  """`pred`, `mask` and per-image `loss`; `pixels`: the predictions as patches of the input's
  pixel scale (normalised predictions mapped back with each target patch's statistics)."""
  pred, out = model.apply({"params": params}, images, noise=noise)
  target = common.patchify(images, model.dims()["patch_size"])
  per_image = jax.vmap(
    lambda p, t, m: ops.masked_patch_loss(p[None], t[None], m[None], model.norm_pix_loss)
  )(pred, target, out["mask"])
  pixels = pred
  if model.norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.var(target, axis=-1, keepdims=True, ddof=1) + 1e-6)
    pixels = pred * std + mean
  return {"loss": per_image, "mask": out["mask"], "pixels": pixels}


def grid_image(
  images: np.ndarray, pixels: np.ndarray, mask: np.ndarray, patch: tuple[int, int], mean, std
) -> np.ndarray:
  """`uint8 (H', W', 3)`: rows of (original, masked, reconstruction pasted), 2-pixel gaps;
  images under 96 pixels are enlarged by an integer factor."""
  grid = common.grid_size(images.shape[1:3], patch)
  visible = np.asarray(common.unpatchify(jnp.asarray(1.0 - mask)[..., None], grid, (1, 1)))
  visible = np.repeat(np.repeat(visible, patch[0], axis=1), patch[1], axis=2)
  reconstruction = np.asarray(common.unpatchify(jnp.asarray(pixels), grid, patch))
  to_display = lambda x: np.clip(x * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
  original = to_display(images)
  masked = np.where(visible > 0, original, 0.5)
  pasted = np.where(visible > 0, original, to_display(reconstruction))
  scale = max(1, 96 // images.shape[1])  # Small images are enlarged (nearest) to be seen.
  panels = [
    np.repeat(np.repeat(x, scale, axis=1), scale, axis=2) for x in (original, masked, pasted)
  ]
  h, w = panels[0].shape[1:3]
  gap = 2
  canvas = np.ones((len(images) * (h + gap) - gap, 3 * (w + gap) - gap, 3))
  for i, row in enumerate(zip(*panels)):
    for j, panel in enumerate(row):
      canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = panel
  return np.round(canvas * 255).astype(np.uint8)


class Evaluator:
  """The module doc's metrics and grid, as an evaluator (masked autoencoders only).

  Args (the `config.evals` entry's fields):
    num_images: images in the grid.
    seed: seeds the masks.
  """

  def __init__(self, context: Any, *, num_images: int = 8, seed: int = 0):
    self._context = context
    self._seed = seed
    model = context.model
    self._patch = common.pair(model.dims()["patch_size"])
    self._length = model.num_patches(context.input_config.image_size)
    self._images = context.fixed_images(num_images)
    self._per_batch = context.jit(
      lambda params, batch: (
        reconstruct(model, params, batch["image"], batch["noise"])["loss"],
        batch["mask"],
      )
    )
    self._grid = jax.jit(lambda params, images, noise: reconstruct(model, params, images, noise))

  @staticmethod
  def supports(model_cls: type) -> bool:
    return "mask_ratio" in model_cls.__dataclass_fields__

  def _add_noise(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
    return {**batch, "noise": _noise(self._seed, index, (len(batch["image"]), self._length))}

  def run(self, params: Any, step: int) -> dict[str, Any]:
    losses, real = [], []
    for batch in self._context.eval_batches(transform=self._add_noise):
      loss, mask = jax.device_get(self._per_batch(params, batch))
      losses.append(loss[mask > 0])
      real.append(int(np.sum(mask > 0)))
    losses = np.concatenate(losses)
    noise = _noise(self._seed, 0, (len(self._images), self._length), grid=True)
    out = jax.device_get(self._grid(params, self._images, noise))
    config = self._context.input_config
    grid = grid_image(
      self._images, out["pixels"], out["mask"], self._patch, config.mean, config.std
    )
    if self._context.workdir is not None and self._context.is_main:
      path = self._context.workdir / f"{self._context.name}_{step:06d}.png"
      buffer = io.BytesIO()
      Image.fromarray(grid).save(buffer, format="PNG")
      path.write_bytes(buffer.getvalue())
    return {"loss": float(np.mean(losses)), "num_examples": sum(real), "grid": grid}
