"""CRATE-MAE (Pai et al., "Masked Completion via Structured Diffusion with White-Box Transformers").

A masked autoencoder whose encoder layers are CRATE layers (`crate.Layer`, `lam = 0.5`) and
whose decoder layers mirror them (structured diffusion, `crate_jax.ops`):

  encoder layer:  Z+ = ReLU(u + eta (u D - u D^T D) - eta lam),  u = LN2(Z + MSSA(LN1(Z)))
  decoder layer:  Y = LN_a(X) E^T,  X+ = Y - MSSA(LN_b(Y))

The wrapper is the published `MaskedAutoencoderViT`: a convolutional patch embedding,
per-image random masking from uniform noise (`ops.random_masking`), the fixed 2-D sin-cos
position table (`ops.sincos_position_table`, CLS row zero; a constant computed in the forward
pass, not a parameter), `encoder_norm` and `decoder_norm` (LayerNorm eps 1e-6), `decoder_pred`
and the masked-patch MSE (`ops.masked_patch_loss`).

`encoder_tokens` chooses where the mask tokens enter:

  "all" (the published design): masked patch tokens are replaced by `mask_token`, CLS is
    prepended and the position table added; the encoder runs on all L + 1 tokens and the
    decoder on its normalised output directly (no positions added again).
  "visible" (the original MAE design): the position table's patch rows are added to the
    patch tokens *before* masking, CLS gets row 0 (zero); the encoder runs on CLS + the
    `int(L (1 - mask_ratio))` visible patches (in `ids_keep` order). After `encoder_norm`
    (and `decoder_embed` when the widths differ) the mask tokens are appended, the sequence is
    unshuffled to the grid order (`ids_restore`) with CLS first, and the decoder's position
    table is added to all L + 1 tokens (visible tokens thus carry positions twice, as in MAE).

Parameters (`scan_layers` puts each stack's layers under `layers` with a leading axis):

  patch_embed/conv/{kernel (p1, p2, 3, d), bias}, cls (1, 1, d), mask_token (1, 1, d),
  encoder/layer_{i}/{norm1, mssa/{proj (d, K, p), out (K, p, d), out_bias}, norm2, ista/D},
  encoder_norm, decoder_embed/{kernel (d, d_dec), bias},
  decoder/layer_{i}/{norm1 (LN_a), dict/E (d_dec, d_dec), norm2 (LN_b), mssa/{proj, out, out_bias}},
  decoder_norm, decoder_pred/{kernel (d_dec, p1 p2 3), bias}

`decoder_embed` (Linear d -> d_dec) is applied only when `decoder_width` differs from `width`;
otherwise it exists but is unused, as in the published code, so published checkpoints round
trip exactly. `mask_token` has the width of the stack it enters (d in "all" mode, d_dec in
"visible" mode).

Initialisation follows the published code where this module owns the parameters: `cls` and
`mask_token` normal(0.02); LayerNorms ones and zeros; `decoder_embed` and `decoder_pred`
Xavier-uniform with zero bias; the dictionaries `D` and `E` kaiming-uniform (uniform
+-sqrt(6 / d)). Reused modules keep their own initialisers: the patch convolution
(`common.ConvPatchEmbed`) is lecun-normal with zero bias (published: Xavier-uniform over the
`(d, 3 p p)` view, the same variance when `d = 3 p p`, and a PyTorch-default conv bias), and
the MSSA `proj`/`out`/`out_bias` (`crate.MSSA`) PyTorch-default uniform +-1/sqrt(fan_in)
(published: Xavier-uniform, zero bias).

`Model(...).apply(variables, images_nhwc, noise=None, rngs={"masking": key})` returns
`(pred, out)`: `pred` (B, L, p1 p2 3) in `common.patchify` order, `out["mask"]`,
`out["ids_restore"]`, `out["loss"]`, `out["latent"]` and, with `return_intermediates=True`,
`out["intermediates"]` (encoder) and `out["decoder_intermediates"]`, stacked over layers:
`z_half`, `z_full` (B, T, d), `head_proj` (B, T, K, p) and `attn` (B, K, T, T); for the
decoder `z_half` is `Y`, `z_full` is `X+` and `head_proj` is `LN_b(Y) U`.
`apply(..., method="encode")` runs the encoder on the unmasked image (linear probes,
attention maps).
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
from crate_jax.models import crate

Array = jax.Array

# name -> (width d, depth, heads K) of the encoder; the published decoders are the same size.
VARIANTS = {
  "T": common.Size(width=384, depth=12, heads=6),
  "S": common.Size(width=576, depth=12, heads=12),
  "B": common.Size(width=768, depth=12, heads=12),
  "L": common.Size(width=1024, depth=24, heads=16),
}

ENCODER_TOKENS = ("all", "visible")
FINAL_NORM_EPS = 1e-6  # `norm` and `decoder_norm` in the published code.

# Kaiming-uniform of a (d, d) PyTorch weight: uniform +-sqrt(6 / d).
_KAIMING_UNIFORM = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")


def decoder_dim_head(dims: dict[str, Any]) -> int:
  """The decoder's head width from `Model.dims()`.

  The encoder's `dim_head` when the decoder has the encoder's width and heads (the published
  presets), else `decoder_width // decoder_heads` as the published code computes it.
  """
  if (dims["decoder_width"], dims["decoder_heads"]) == (dims["width"], dims["heads"]):
    return dims["dim_head"]
  return dims["decoder_width"] // dims["decoder_heads"]


class Dictionary(nn.Module):
  """The decoder's linear dictionary step `Y = X E^T` (`E`: the stored `(d, d)` weight)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    dictionary = self.param(
      "E", common.param_with_axes(_KAIMING_UNIFORM, ("embed", "dict")), (d, d)
    )
    return ops.dictionary_synthesis(x, dictionary.astype(self.dtype))


class DecoderLayer(nn.Module):
  """One CRATE-MAE decoder layer: `Y = LN_a(X) E^T`, then `X+ = Y - MSSA(LN_b(Y))`."""

  heads: int
  dim_head: int
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  collect: bool = False

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    norm = functools.partial(common.layer_norm, self.layer_norm_eps, self.dtype)
    y = common.constrain(Dictionary(self.dtype, name="dict")(norm("norm1")(x)))
    attention, head_proj, attn = crate.MSSA(
      self.heads, self.dim_head, dtype=self.dtype, name="mssa"
    )(norm("norm2")(y))
    x_next = common.constrain(ops.structured_diffusion_step(y, attention))
    inter = dict(z_half=y, z_full=x_next, head_proj=head_proj, attn=attn) if self.collect else {}
    return x_next, inter


class Model(common.ModelBase):
  """CRATE-MAE. `variant="B/16"` sets the encoder's width, depth, heads and the patch size.

  Fields beyond `common.ModelBase`:
    decoder_depth, decoder_width, decoder_heads: the decoder's sizes (None: the encoder's).
      Its heads have the encoder's `dim_head` when width and heads are the encoder's, else
      `decoder_width // decoder_heads` (`decoder_dim_head`).
    mask_ratio: the fraction of patches masked per image (0.75).
    norm_pix_loss: normalise each target patch (unbiased variance) in the loss.
    encoder_tokens: "all" (published: mask tokens enter before the encoder) or "visible"
      (original MAE: the encoder sees CLS + the visible patches only); see the module doc.
    eta, lam: the encoder's ISTA step size and sparsity weight (0.1 and 0.5 as published).
    layer_norm_eps: the layers' LayerNorm epsilon (1e-5); the final norms use 1e-6.
  """

  FAMILY: ClassVar[str] = "CRATE-MAE"
  VARIANTS: ClassVar[dict[str, common.Size]] = VARIANTS
  HAS_SUBSPACES: ClassVar[bool] = True
  RNG_STREAMS: ClassVar[tuple[str, ...]] = ("masking",)

  decoder_depth: int | None = None
  decoder_width: int | None = None
  decoder_heads: int | None = None
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  encoder_tokens: str = "all"
  eta: float = 0.1
  lam: float = 0.5
  layer_norm_eps: float = 1e-5

  def dims(self) -> dict[str, Any]:
    """The encoder's sizes (`ModelBase.dims`), the decoder's (decoder_depth, decoder_width,
    decoder_heads) and `image_size`, the grid of the published position tables."""
    dims = super().dims()
    dims.update(
      decoder_depth=self.decoder_depth or dims["depth"],
      decoder_width=self.decoder_width or dims["width"],
      decoder_heads=self.decoder_heads or dims["heads"],
      image_size=common.pair(self.image_size),
    )
    return dims

  def num_visible(self, num_patches: int) -> int:
    """Patches kept per image: `int(L * (1 - mask_ratio))`, as the published code rounds."""
    return int(num_patches * (1 - self.mask_ratio))

  def forward_flops(self, batch_size: int, image_size: Sequence[int] | None = None) -> float:
    """Matmul FLOPs of `__call__` (multiply-add = 2): stem, encoder, decoder, prediction."""
    dims = self.dims()
    d, dd = dims["width"], dims["decoder_width"]
    inner = dims["heads"] * dims["dim_head"]
    inner_dec = dims["decoder_heads"] * decoder_dim_head(dims)
    p1, p2 = dims["patch_size"]
    patches = self.num_patches(image_size)
    tokens = patches + 1
    enc_tokens = tokens if self.encoder_tokens == "all" else 1 + self.num_visible(patches)
    # Encoder: U, O and the folded ISTA step x (D - D^T D) per token; attention logits and sum.
    encoder = enc_tokens * (2 * d * inner + d * d) + 2 * enc_tokens**2 * inner
    # Decoder: E, U, O per token; attention over all L + 1 tokens.
    decoder = tokens * (dd * dd + 2 * dd * inner_dec) + 2 * tokens**2 * inner_dec
    per_image = (
      patches * 3 * p1 * p2 * d
      + dims["depth"] * encoder
      + (enc_tokens * d * dd if dd != d else 0)
      + dims["decoder_depth"] * decoder
      + patches * dd * 3 * p1 * p2
    )
    per_batch = dims["depth"] * d**3  # D^T D, once per encoder layer (ops.crate_ista).
    return 2.0 * (batch_size * per_image + per_batch)

  def setup(self):
    if self.encoder_tokens not in ENCODER_TOKENS:
      raise ValueError(
        f"encoder_tokens must be one of {ENCODER_TOKENS}, got {self.encoder_tokens!r}."
      )
    dims = self.dims()
    d, dd = dims["width"], dims["decoder_width"]
    token_init = common.param_with_axes(nn.initializers.normal(0.02), (None, None, "embed"))
    mask_width = d if self.encoder_tokens == "all" else dd
    self.patch_embed = common.ConvPatchEmbed(d, dims["patch_size"], self.dtype)
    self.cls = self.param("cls", token_init, (1, 1, d))
    self.mask_token = self.param("mask_token", token_init, (1, 1, mask_width))
    self.encoder = common.LayerStack(
      functools.partial(
        crate.Layer,
        heads=dims["heads"],
        dim_head=dims["dim_head"],
        eta=self.eta,
        lam=self.lam,
        layer_norm_eps=self.layer_norm_eps,
        dtype=self.dtype,
      ),
      dims["depth"],
      self.scan_layers,
      self.remat_policy,
    )
    self.encoder_norm = common.layer_norm(FINAL_NORM_EPS, self.dtype, "encoder_norm")
    self.decoder_embed = common.dense(
      dd, self.dtype, "decoder_embed", ("embed", None), torch_init=False
    )
    self.decoder = common.LayerStack(
      functools.partial(
        DecoderLayer,
        heads=dims["decoder_heads"],
        dim_head=decoder_dim_head(dims),
        layer_norm_eps=self.layer_norm_eps,
        dtype=self.dtype,
      ),
      dims["decoder_depth"],
      self.scan_layers,
      self.remat_policy,
    )
    self.decoder_norm = common.layer_norm(FINAL_NORM_EPS, self.dtype, "decoder_norm")
    p1, p2 = dims["patch_size"]
    self.decoder_pred = common.dense(
      p1 * p2 * 3, self.dtype, "decoder_pred", ("embed", "patch"), torch_init=False
    )

  def _positions(self, width: int, grid: tuple[int, int]) -> Array:
    """The fixed sin-cos table `(1, 1 + gh * gw, width)` for the input's grid, CLS row zero."""
    return jnp.asarray(ops.sincos_position_table(width, grid)[None], self.dtype)

  def _tokens(self, images: Array) -> tuple[Array, tuple[int, int]]:
    self.check_images(images)
    grid = common.grid_size(images.shape[1:3], self.dims()["patch_size"])
    return self.patch_embed(images), grid

  def _cls(self, batch: int) -> Array:
    return jnp.broadcast_to(self.cls.astype(self.dtype), (batch, 1, self.cls.shape[-1]))

  def _noise(self, noise: Array | None, batch: int, length: int) -> Array:
    if noise is not None:
      if tuple(noise.shape) != (batch, length):
        raise ValueError(
          f"noise must have shape (batch, patches) = {(batch, length)}, got {noise.shape}."
        )
      return noise
    if self.has_rng("masking"):
      return jax.random.uniform(self.make_rng("masking"), (batch, length))
    if self.is_initializing():  # Shapes only: any mask will do.
      return jnp.zeros((batch, length))
    raise ValueError(
      f"{self.FAMILY} masks patches at random: pass rngs={{'masking': key}} to apply, or noise "
      f"(B, L) in [0, 1); method='encode' runs the encoder on unmasked images."
    )

  def _encode(self, x: Array, collect: bool) -> tuple[Array, dict[str, Array]]:
    x, intermediates = self.encoder(common.constrain(x), collect)
    return self.encoder_norm(x), intermediates

  def encode(
    self, images: Array, return_intermediates: bool = False
  ) -> tuple[Array, dict[str, Any]]:
    """The encoder on the unmasked image: CLS + all patches + positions, no mask tokens.

    Returns `(latent (B, L + 1, d) after encoder_norm, out)`, with `out["intermediates"]`
    when asked for (as in `__call__`). Inputs of another size than `image_size` get the
    sin-cos table computed for their grid (it is analytic); the published
    `get_selfattention_enc` instead resizes the training grid's table bicubically.
    """
    x, grid = self._tokens(images)
    x = jnp.concatenate([self._cls(x.shape[0]), x], axis=1) + self._positions(x.shape[-1], grid)
    latent, intermediates = self._encode(x, return_intermediates)
    return latent, ({"intermediates": intermediates} if return_intermediates else {})

  def __call__(
    self,
    images: Array,
    noise: Array | None = None,
    *,
    train: bool = False,
    return_intermediates: bool = False,
  ) -> tuple[Array, dict[str, Any]]:
    del train  # No dropout or batch statistics; masking is drawn in training and evaluation.
    x, grid = self._tokens(images)
    batch, length, d = x.shape
    dd = self.dims()["decoder_width"]
    ids_keep, mask, ids_restore = ops.random_masking(
      self._noise(noise, batch, length), self.mask_ratio
    )
    mask_token = self.mask_token.astype(self.dtype)
    positions = self._positions(d, grid)
    if self.encoder_tokens == "all":
      x = jnp.where(mask[..., None] > 0, mask_token, x)
      x = jnp.concatenate([self._cls(batch), x], axis=1) + positions
    else:
      x = jnp.take_along_axis(x + positions[:, 1:], ids_keep[..., None], axis=1)
      x = jnp.concatenate([self._cls(batch) + positions[:, :1], x], axis=1)
    latent, intermediates = self._encode(x, return_intermediates)

    x = latent
    if dd != d:
      x = self.decoder_embed(x)
    elif self.is_initializing():
      self.decoder_embed(x)  # Created, unused: the published checkpoints hold it.
    if self.encoder_tokens == "visible":
      fill = jnp.broadcast_to(mask_token, (batch, length - ids_keep.shape[-1], dd))
      patches = jnp.take_along_axis(
        jnp.concatenate([x[:, 1:], fill], axis=1), ids_restore[..., None], axis=1
      )
      x = jnp.concatenate([x[:, :1], patches], axis=1) + self._positions(dd, grid)
    x, decoder_intermediates = self.decoder(common.constrain(x), return_intermediates)
    pred = self.decoder_pred(self.decoder_norm(x)[:, 1:]).astype(jnp.float32)

    target = common.patchify(images.astype(jnp.float32), self.dims()["patch_size"])
    out: dict[str, Any] = {
      "mask": mask,
      "ids_restore": ids_restore,
      "loss": ops.masked_patch_loss(pred, target, mask, self.norm_pix_loss),
      "latent": latent,
    }
    if return_intermediates:
      out["intermediates"] = intermediates
      out["decoder_intermediates"] = decoder_intermediates
    return pred, out


class Classifier(common.ClassifierBase):
  """The CRATE-MAE encoder with a classifier head, for fine-tuning a pretrained encoder.

  Its parameters are the autoencoder's encoder side under the same names
  (`patch_embed/conv`, `cls`, `encoder/layer_i`, `encoder_norm`), plus `head`: a CRATE-MAE
  checkpoint initialises everything but the head (`config.init`). Tokens: the patch
  convolution, CLS and the fixed sin-cos table (computed for the input's grid); pooled
  by `pool` after `encoder_norm` (eps 1e-6). `pool="mean"` by default: the CLS token gets
  no training signal of its own in masked pretraining.
  """

  FAMILY: ClassVar[str] = "CRATE-MAE classifier"
  VARIANTS: ClassVar[dict[str, common.Size]] = VARIANTS
  HAS_SUBSPACES: ClassVar[bool] = True
  ENCODER_NORM_EPS: ClassVar[float] = FINAL_NORM_EPS

  pool: str = "mean"
  eta: float = 0.1
  lam: float = 0.5
  layer_norm_eps: float = 1e-5

  def forward_flops(self, batch_size: int, image_size: Sequence[int] | None = None) -> float:
    dims = self.dims()
    d, inner, (p1, p2) = dims["width"], dims["heads"] * dims["dim_head"], dims["patch_size"]
    return common.transformer_flops(
      self,
      batch_size,
      image_size,
      per_token=2 * d * inner + d * d,  # U and O; the folded ISTA step.
      stem_per_patch=3 * p1 * p2 * d,
      per_batch=dims["depth"] * d**3,
      head=d * self.num_classes,
    )

  def embed(self, images: Array) -> Array:
    dims = self.dims()
    x = common.ConvPatchEmbed(dims["width"], dims["patch_size"], self.dtype, name="patch_embed")(
      images
    )
    init = common.param_with_axes(nn.initializers.normal(0.02), (None, None, "embed"))
    cls = self.param("cls", init, (1, 1, dims["width"])).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
    grid = common.grid_size(images.shape[1:3], dims["patch_size"])
    return x + jnp.asarray(ops.sincos_position_table(dims["width"], grid)[None], self.dtype)

  def layer(self):
    dims = self.dims()
    return functools.partial(
      crate.Layer,
      heads=dims["heads"],
      dim_head=dims["dim_head"],
      eta=self.eta,
      lam=self.lam,
      layer_norm_eps=self.layer_norm_eps,
      dtype=self.dtype,
    )
