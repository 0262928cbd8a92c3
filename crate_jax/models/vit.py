"""ViT baseline with CRATE's interface: `(logits, out)`, the same intermediates and options.

Pre-norm encoder (LN -> multi-head attention -> residual, LN -> GELU MLP -> residual),
convolutional patch stem, CLS token, learned position embedding, final LayerNorm. Used to
test claims that contrast CRATE with a standard transformer (e.g. emergent segmentation).

Intermediates per layer: `z_half` (after attention), `z_full` (after the MLP), `head_proj`
(the attention *keys*, the features CRATE's `LN1(Z) U` is compared with) and `attn`.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import common

Array = jax.Array

VARIANTS = {
  "Ti": common.Size(width=192, depth=12, heads=3),
  "S": common.Size(width=384, depth=12, heads=6),
  "B": common.Size(width=768, depth=12, heads=12),
  "L": common.Size(width=1024, depth=24, heads=16),
  "H": common.Size(width=1280, depth=32, heads=16),
}


class Attention(nn.Module):
  """Multi-head self-attention with separate query, key and value projections."""

  heads: int
  dim_head: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    d = x.shape[-1]
    proj = functools.partial(
      nn.DenseGeneral,
      features=(self.heads, self.dim_head),
      dtype=self.dtype,
      kernel_init=common.param_with_axes(
        nn.initializers.xavier_uniform(), ("embed", "heads", "head_dim")
      ),
      bias_init=common.param_with_axes(nn.initializers.zeros, ("heads", "head_dim")),
    )
    q, k, v = (proj(name=name)(x) for name in ("query", "key", "value"))
    logits = jnp.einsum("...qkp,...skp->...kqs", q, k) * self.dim_head**-0.5
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    heads = jnp.einsum("...kqs,...skp->...qkp", attn, v)
    out = nn.DenseGeneral(
      d,
      axis=(-2, -1),
      dtype=self.dtype,
      name="out",
      kernel_init=common.param_with_axes(
        nn.initializers.xavier_uniform(), ("heads", "head_dim", "embed")
      ),
      bias_init=common.param_with_axes(nn.initializers.zeros, ("embed",)),
    )(heads)
    return out, k, attn


class Layer(nn.Module):
  heads: int
  dim_head: int
  mlp_ratio: int = 4
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  collect: bool = False

  @nn.compact
  def __call__(self, z: Array) -> tuple[Array, dict[str, Array]]:
    norm = functools.partial(common.layer_norm, self.layer_norm_eps, self.dtype)
    y, keys, attn = Attention(self.heads, self.dim_head, self.dtype, name="attn")(norm("norm1")(z))
    z_half = common.constrain(z + y)
    d = z.shape[-1]
    h = common.dense(self.mlp_ratio * d, self.dtype, "fc1", ("embed", "dict"), torch_init=False)(
      norm("norm2")(z_half)
    )
    h = common.dense(d, self.dtype, "fc2", ("dict", "embed"), torch_init=False)(nn.gelu(h))
    z_full = common.constrain(z_half + h)
    inter = dict(z_half=z_half, z_full=z_full, head_proj=keys, attn=attn) if self.collect else {}
    return z_full, inter


class Model(nn.Module):
  """ViT classifier; `variant="S/16"` sets the sizes (fields as in `crate.Model`)."""

  num_classes: int = 1000
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  heads: int | None = None
  dim_head: int | None = None
  patch_size: Sequence[int] | None = None
  image_size: Sequence[int] = (224, 224)
  pool: str = "cls"
  mlp_ratio: int = 4
  layer_norm_eps: float = 1e-6
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Any = jnp.float32

  def dims(self) -> dict[str, Any]:
    return common.resolve_dims(
      "ViT",
      VARIANTS,
      self.variant,
      width=self.width,
      depth=self.depth,
      heads=self.heads,
      dim_head=self.dim_head,
      patch_size=self.patch_size,
    )

  @nn.compact
  def __call__(
    self, images: Array, *, train: bool = False, return_intermediates: bool = False
  ) -> tuple[Array, dict[str, Any]]:
    del train
    dims = self.dims()
    x = common.ConvPatchEmbed(dims["width"], dims["patch_size"], self.dtype, name="patch_embed")(
      images
    )
    x = common.add_cls_and_posemb(
      self,
      x,
      image_size=self.image_size,
      patch_size=dims["patch_size"],
      input_hw=images.shape[1:3],
      dtype=self.dtype,
      init_std=0.02,
    )
    layer = functools.partial(
      Layer,
      heads=dims["heads"],
      dim_head=dims["dim_head"],
      mlp_ratio=self.mlp_ratio,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
    )
    x, intermediates = common.LayerStack(
      layer, dims["depth"], self.scan_layers, self.remat_policy, name="encoder"
    )(x, return_intermediates)
    x = common.layer_norm(self.layer_norm_eps, self.dtype, "encoder_norm")(x)
    return common.classifier_head(
      self,
      x,
      pool=self.pool,
      num_classes=self.num_classes,
      dtype=self.dtype,
      torch_init=False,
      intermediates=intermediates if return_intermediates else None,
    )
