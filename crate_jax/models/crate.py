"""CRATE classifier (Yu et al., "White-Box Transformers via Sparse Rate Reduction").

Each layer is one step of alternating minimisation of the sparse rate reduction:

  compression:  Z^{l+1/2} = Z^l + MSSA(LN1(Z^l))                      (published form)
                Z^{l+1/2} = (1 - c) h + c MSSA_paper(h), h = LN1(Z^l)   (paper form)
  sparsification: Z^{l+1} = ReLU(x + eta (x - x D^T) D - eta lam), x = LN2(Z^{l+1/2})

Parameters are named as below; `crate_jax.convert` maps the published PyTorch names.

  patch_embed/{norm_in, dense, norm_out}, cls, pos_embedding,
  encoder/layer_{i}/{norm1, mssa/{proj (d,K,p), out (K,p,d), out_bias}, norm2, ista/D},
  head_norm, head/{kernel, bias}

`Model(...).apply(variables, images_nhwc, return_intermediates=True)` returns
`(logits, out)` with `out["intermediates"]` holding, stacked over layers: `z_half`,
`z_full` (B, N+1, d), `head_proj` (B, N+1, K, p) and `attn` (B, K, N+1, N+1).
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

Array = jax.Array

# name -> (width d, depth, heads K); head width p = d / K unless overridden.
VARIANTS = {
  "T": common.Size(width=384, depth=12, heads=6),
  "S": common.Size(width=576, depth=12, heads=12),
  "B": common.Size(width=768, depth=12, heads=12),
  "L": common.Size(width=1024, depth=24, heads=16),
  # The segmentation demos' patch-8 "base demo" model: 6 heads of 128.
  "Bdemo": common.Size(width=768, depth=12, heads=6),
}


class MSSA(nn.Module):
  """Multi-head subspace self-attention; returns `(output, head projections, attention)`."""

  heads: int
  dim_head: int
  form: str = "published"  # 'published' (untied, scaled) | 'paper' (tied to U, unscaled).
  use_out_bias: bool = True  # The published CRATE has one; CRATE-alpha does not.
  kappa: float = 1.0
  eps: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    d = x.shape[-1]
    u = self.param(
      "proj",
      common.param_with_axes(common.torch_linear_init(d), ("embed", "heads", "head_dim")),
      (d, self.heads, self.dim_head),
    )
    u = u.astype(self.dtype)
    if self.form == "paper":
      return ops.mssa_paper_step(x, u, self.kappa, self.eps)
    if self.form != "published":
      raise ValueError(f"mssa form must be 'published' or 'paper', got {self.form!r}.")
    inner = self.heads * self.dim_head
    out = self.param(
      "out",
      common.param_with_axes(common.torch_linear_init(inner), ("heads", "head_dim", "embed")),
      (self.heads, self.dim_head, d),
    )
    bias = (
      self.param(
        "out_bias", common.param_with_axes(common.torch_linear_init(inner), ("embed",)), (d,)
      ).astype(self.dtype)
      if self.use_out_bias
      else None
    )
    return ops.mssa_published(x, u, out.astype(self.dtype), bias)


class ISTA(nn.Module):
  """CRATE's sparse-coding step, one non-negative ISTA step from `a = x` (no residual)."""

  eta: float = 0.1
  lam: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    # kaiming_uniform in the published code: uniform(+-sqrt(6 / fan_in)) with fan_in = d.
    dictionary = self.param(
      "D",
      common.param_with_axes(
        nn.initializers.variance_scaling(2.0, "fan_in", "uniform"), ("embed", "dict")
      ),
      (d, d),
    )
    return ops.crate_ista(x, dictionary.astype(self.dtype), self.eta, self.lam)


class PatchEmbed(nn.Module):
  """CRATE's stem: patches -> LayerNorm -> Linear(+bias) -> LayerNorm."""

  width: int
  patch_size: tuple[int, int]
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    x = common.patchify(images.astype(self.dtype), self.patch_size)
    x = common.layer_norm(self.layer_norm_eps, self.dtype, "norm_in", axis_name="patch")(x)
    x = common.dense(self.width, self.dtype, "dense", ("patch", "embed"), fan_in=x.shape[-1])(x)
    return common.layer_norm(self.layer_norm_eps, self.dtype, "norm_out")(x)


class Layer(nn.Module):
  """One CRATE layer: compression (MSSA) then sparsification (ISTA)."""

  heads: int
  dim_head: int
  eta: float = 0.1
  lam: float = 0.1
  mssa_form: str = "published"
  kappa: float = 1.0
  eps: float = 0.5
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  collect: bool = False

  @nn.compact
  def __call__(self, z: Array) -> tuple[Array, dict[str, Array]]:
    norm = functools.partial(common.layer_norm, self.layer_norm_eps, self.dtype)
    h = norm("norm1")(z)
    y, head_proj, attn = MSSA(
      self.heads,
      self.dim_head,
      self.mssa_form,
      kappa=self.kappa,
      eps=self.eps,
      dtype=self.dtype,
      name="mssa",
    )(h)
    z_half = common.constrain(y if self.mssa_form == "paper" else z + y)
    z_full = ISTA(self.eta, self.lam, self.dtype, name="ista")(norm("norm2")(z_half))
    z_full = common.constrain(z_full)
    inter = (
      dict(z_half=z_half, z_full=z_full, head_proj=head_proj, attn=attn) if self.collect else {}
    )
    return z_full, inter


class Model(common.ClassifierBase):
  """CRATE classifier. `variant="B/16"` sets width, depth, heads and patch size.

  Fields beyond `common.ModelBase` / `common.ClassifierBase`:
    eta, lam: the ISTA step size and sparsity weight (0.1 and 0.1 in the published code).
    mssa_form: 'published' or 'paper' (output tied to U, no scale, step size kappa with
      coding precision eps).
    layer_norm_eps: 1e-5 as in the published code.
  """

  FAMILY: ClassVar[str] = "CRATE"
  VARIANTS: ClassVar[dict[str, common.Size]] = VARIANTS
  HAS_SUBSPACES: ClassVar[bool] = True

  eta: float = 0.1
  lam: float = 0.1
  mssa_form: str = "published"
  kappa: float = 1.0
  eps: float = 0.5
  layer_norm_eps: float = 1e-5

  def forward_flops(self, batch_size: int, image_size: Sequence[int] | None = None) -> float:
    d, inner = self.dims()["width"], self.dims()["heads"] * self.dims()["dim_head"]
    p1, p2 = self.dims()["patch_size"]
    return common.transformer_flops(
      self,
      batch_size,
      image_size,
      per_token=2 * d * inner + d * d,  # U and O; the folded ISTA step x (D - D^T D).
      stem_per_patch=3 * p1 * p2 * d,
      per_batch=self.dims()["depth"] * d**3,  # D^T D, once per layer (ops.crate_ista).
      head=d * self.num_classes,
    )

  def embed(self, images: Array) -> Array:
    """Patches -> LayerNorm -> Linear -> LayerNorm, CLS token, positions (N(0, 1) init)."""
    dims = self.dims()
    x = PatchEmbed(
      dims["width"], dims["patch_size"], self.layer_norm_eps, self.dtype, name="patch_embed"
    )(images)
    return common.add_cls_and_posemb(
      self,
      x,
      image_size=self.image_size,
      patch_size=dims["patch_size"],
      input_hw=images.shape[1:3],
      dtype=self.dtype,
    )

  def layer(self):
    dims = self.dims()
    return functools.partial(
      Layer,
      heads=dims["heads"],
      dim_head=dims["dim_head"],
      eta=self.eta,
      lam=self.lam,
      mssa_form=self.mssa_form,
      kappa=self.kappa,
      eps=self.eps,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
    )

  def head(self, x: Array, intermediates: dict[str, Array] | None) -> tuple[Array, dict]:
    """No final norm on the tokens; pooling, `head_norm`, a PyTorch-initialised `head`."""
    return common.classifier_head(
      self,
      x,
      pool=self.pool,
      num_classes=self.num_classes,
      dtype=self.dtype,
      torch_init=True,
      intermediates=intermediates,
      head_norm_eps=self.layer_norm_eps,
    )
