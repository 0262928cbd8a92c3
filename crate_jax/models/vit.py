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
from typing import ClassVar

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


class Projection(nn.Module):
  """`x @ kernel + bias` over the last `contract` axes of `x`, the kernel created in its
  full shape `in_shape + features` so that every axis carries its logical name."""

  features: tuple[int, ...]
  axes: tuple[str, ...]  # Logical names of the kernel's axes (input axes, then `features`).
  contract: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_axes = tuple(range(self.contract))
    out_axes = tuple(range(self.contract, self.contract + len(self.features)))
    init = nn.initializers.xavier_uniform(in_axis=in_axes, out_axis=out_axes)
    kernel = self.param(
      "kernel",
      common.param_with_axes(init, self.axes),
      tuple(x.shape[-self.contract :]) + tuple(self.features),
    )
    bias = self.param(
      "bias",
      common.param_with_axes(nn.initializers.zeros, self.axes[self.contract :]),
      tuple(self.features),
    )
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.contract)
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with separate query, key and value projections."""

  heads: int
  dim_head: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    d = x.shape[-1]
    q, k, v = (
      Projection(
        (self.heads, self.dim_head), ("embed", "heads", "head_dim"), 1, self.dtype, name=name
      )(x)
      for name in ("query", "key", "value")
    )
    logits = jnp.einsum("...qkp,...skp->...kqs", q, k) * self.dim_head**-0.5
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    heads = jnp.einsum("...kqs,...skp->...qkp", attn, v)
    out = Projection((d,), ("heads", "head_dim", "embed"), 2, self.dtype, name="out")(heads)
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


class Model(common.ClassifierBase):
  """ViT classifier; `variant="S/16"` sets the sizes. Adds `mlp_ratio` (MLP width / d)."""

  FAMILY: ClassVar[str] = "ViT"
  VARIANTS: ClassVar[dict[str, common.Size]] = VARIANTS

  mlp_ratio: int = 4

  def forward_flops(self, batch_size: int, image_size: Sequence[int] | None = None) -> float:
    dims = self.dims()
    d, inner, (p1, p2) = dims["width"], dims["heads"] * dims["dim_head"], dims["patch_size"]
    return common.transformer_flops(
      self,
      batch_size,
      image_size,
      per_token=4 * d * inner + 2 * self.mlp_ratio * d * d,  # Q, K, V, out; the MLP.
      stem_per_patch=3 * p1 * p2 * d,
      head=d * self.num_classes,
    )

  def layer(self):
    dims = self.dims()
    return functools.partial(
      Layer,
      heads=dims["heads"],
      dim_head=dims["dim_head"],
      mlp_ratio=self.mlp_ratio,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
    )
