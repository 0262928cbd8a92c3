"""CRATE-alpha (Yang et al., "Scaling White-Box Transformers for Vision").

Differences from CRATE: an overcomplete dictionary (m = 4d) with a decoupled decoder D1,
two ISTA steps from zero, a residual around the sparse block, a convolutional stem, LN eps
1e-6 and a final encoder norm:

  x = x + MSSA(LN(x))            (no output bias)
  x = x + ODL(LN(x)),  ODL(x) = ISTA^2_D(x) @ D1^T

Parameters: patch_embed/{kernel (p1,p2,C,d), bias}, cls, pos_embedding,
encoder/layer_{i}/{norm1, mssa/{proj, out}, norm2, odl/{D, D1}}, encoder_norm, head.
`crate_jax.convert` maps the published Flax names (`Transformer/encoderblock_i/...`).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax import ops
from crate_jax.models import common
from crate_jax.models.crate import MSSA

Array = jax.Array

VARIANTS = {
  "Ti": common.Size(width=192, depth=12, heads=3),
  "S": common.Size(width=576, depth=12, heads=12),
  "B": common.Size(width=768, depth=12, heads=12),
  "L": common.Size(width=1024, depth=24, heads=16),
  "H": common.Size(width=1280, depth=32, heads=16),
}


class ODL(nn.Module):
  """Overcomplete dictionary learning block: `num_steps` ISTA steps on D, decoded by D1."""

  expansion: int = 4
  eta: float = 0.1
  lam: float = 0.1
  num_steps: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    d = x.shape[-1]
    shape = (d, self.expansion * d)
    init = common.param_with_axes(nn.initializers.xavier_uniform(), ("embed", "dict"))
    dictionary = self.param("D", init, shape).astype(self.dtype)
    decoder = self.param("D1", init, shape).astype(self.dtype)
    return ops.overcomplete_ista(x, dictionary, decoder, self.eta, self.lam, self.num_steps)


class Layer(nn.Module):
  """One CRATE-alpha layer with residuals around both blocks."""

  heads: int
  dim_head: int
  expansion: int = 4
  eta: float = 0.1
  lam: float = 0.1
  num_ista_steps: int = 2
  layer_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  collect: bool = False

  @nn.compact
  def __call__(self, z: Array) -> tuple[Array, dict[str, Array]]:
    norm = functools.partial(common.layer_norm, self.layer_norm_eps, self.dtype)
    y, head_proj, attn = MSSA(
      self.heads, self.dim_head, use_out_bias=False, dtype=self.dtype, name="mssa"
    )(norm("norm1")(z))
    z_half = common.constrain(z + y)
    z_full = common.constrain(
      z_half
      + ODL(self.expansion, self.eta, self.lam, self.num_ista_steps, self.dtype, name="odl")(
        norm("norm2")(z_half)
      )
    )
    inter = (
      dict(z_half=z_half, z_full=z_full, head_proj=head_proj, attn=attn) if self.collect else {}
    )
    return z_full, inter


class Model(common.ClassifierBase):
  """CRATE-alpha classifier; `variant="B/16"` sets the sizes.

  Fields beyond `common.ClassifierBase`: `expansion` (dictionary columns m = expansion * d),
  `eta`, `lam`, `num_ista_steps` (2 in the published block), `layer_norm_eps` (1e-6).
  """

  FAMILY: ClassVar[str] = "CRATE-alpha"
  VARIANTS: ClassVar[dict[str, common.Size]] = VARIANTS
  HAS_SUBSPACES: ClassVar[bool] = True

  expansion: int = 4
  eta: float = 0.1
  lam: float = 0.1
  num_ista_steps: int = 2

  def forward_flops(self, batch_size: int, image_size: Sequence[int] | None = None) -> float:
    dims = self.dims()
    d, inner, (p1, p2) = dims["width"], dims["heads"] * dims["dim_head"], dims["patch_size"]
    m = self.expansion * d
    return common.transformer_flops(
      self,
      batch_size,
      image_size,
      # U and O; D once in the first ISTA step, twice in each further one; D1 once.
      per_token=2 * d * inner + 2 * self.num_ista_steps * d * m,
      stem_per_patch=3 * p1 * p2 * d,
      head=d * self.num_classes,
    )

  def layer(self):
    dims = self.dims()
    return functools.partial(
      Layer,
      heads=dims["heads"],
      dim_head=dims["dim_head"],
      expansion=self.expansion,
      eta=self.eta,
      lam=self.lam,
      num_ista_steps=self.num_ista_steps,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
    )
