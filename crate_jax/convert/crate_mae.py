"""The published PyTorch CRATE-MAE format (`blocks.i.*`, `decoder_blocks.i.*`, `decoder_pred.*`).

The state dict of `MaskedAutoencoderViT` with CRATE blocks (`model/crate_ae/`): encoder
blocks `blocks.i.layers.0.{0: PreNorm(Attention), 1: PreNorm(ISTA)}` as in CRATE, decoder
blocks `decoder_blocks.i.layers.0.{0: PreNorm(E), 1: PreNorm(Attention)}`. `pos_embed` and
`decoder_pos_embed` are the fixed sin-cos tables (constants of our model, not parameters):
on import they must equal `ops.sincos_position_table`, on export it is written.
`decoder_embed` is loaded and written (our model holds it, unused at equal widths).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crate_jax import ops
from crate_jax.convert import common
from crate_jax.convert import crate as crate_format
from crate_jax.convert.common import ConversionError
from crate_jax.convert.common import StateDict
from crate_jax.models import common as model_common
from crate_jax.models import crate_mae

MODEL = "crate_mae"  # The family in crate_jax.models.
DESCRIPTION = "PyTorch CRATE-MAE (patch_embed.proj.*, blocks.<i>.*, decoder_blocks.<i>.*)"

# Largest accepted deviation of a checkpoint's position table from ours. Our table equals
# the published code's float32 table bit for bit; 1e-5 also admits a table computed in
# float64 (it differs by up to ~4e-6 on a 56 x 56 grid) and rejects anything else.
TABLE_ATOL = 1e-5

_ENC_QKV = "blocks.{}.layers.0.0.fn.qkv.weight"
_DEC_QKV = "decoder_blocks.{}.layers.0.1.fn.qkv.weight"


def matches(state: StateDict) -> bool:
  return "patch_embed.proj.weight" in state and any(k.startswith("decoder_blocks.") for k in state)


def _get(state: StateDict, key: str) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"Missing key {key!r}: a CRATE-MAE checkpoint needs it to infer sizes.")
  return state[key]


def _heads(
  override: int | None, preset: int | None, key: str, shape: tuple[int, int], field: str
) -> tuple[int, int]:
  """`(heads, dim_head)` of the attention whose qkv weight `key` has `shape` (inner, width)."""
  heads = override if override is not None else preset
  if heads is None:
    raise ConversionError(
      f"Cannot tell the number of {field.replace('_', ' ')} from shapes ({key} {shape}): "
      f"pass {field}=K."
    )
  return heads, common.check_heads(heads, shape[0], key, shape)


def infer(state: StateDict, overrides: dict[str, Any]) -> dict[str, Any]:
  kernel = _get(state, "patch_embed.proj.weight")
  if kernel.ndim != 4 or kernel.shape[1] != 3:
    raise ConversionError(
      f"patch_embed.proj.weight has shape {kernel.shape}; expected a Conv2d weight (d, 3, p, p)."
    )
  width, _, p1, p2 = kernel.shape
  patch = overrides.pop("patch_size", None)
  if patch is not None and model_common.pair(patch) != (p1, p2):
    raise ConversionError(
      f"patch_size {patch} contradicts patch_embed.proj.weight of shape {kernel.shape}."
    )
  depth = common.layer_count(state, r"blocks\.(\d+)\.layers\.0\.0\.fn\.qkv\.weight")
  decoder_depth = common.layer_count(state, r"decoder_blocks\.(\d+)\.layers\.0\.1\.fn\.qkv\.weight")
  enc_key, dec_key = _ENC_QKV.format(0), _DEC_QKV.format(0)
  inner, enc_in = _get(state, enc_key).shape
  decoder_width = _get(state, "decoder_embed.weight").shape[0]
  dec_inner, dec_in = _get(state, dec_key).shape

  preset = [s for s in crate_mae.VARIANTS.values() if (s.width, s.depth) == (width, depth)]
  heads, dim_head = _heads(
    overrides.pop("heads", None),
    preset[0].heads if inner == width and len(preset) == 1 else None,
    enc_key,
    (inner, enc_in),
    "heads",
  )
  # The published presets' decoders are the encoder's size: same heads when the shapes agree.
  decoder_heads, dec_dim_head = _heads(
    overrides.pop("decoder_heads", None),
    heads if (decoder_width, dec_inner) == (width, inner) else None,
    dec_key,
    (dec_inner, dec_in),
    "decoder_heads",
  )
  image_size, _ = common.infer_geometry(
    _get(state, "pos_embed").shape[1] - 1, (p1, p2), overrides.pop("image_size", None), None
  )
  dims = dict(
    width=width,
    depth=depth,
    heads=heads,
    dim_head=dim_head,
    patch_size=(p1, p2),
    image_size=image_size,
    decoder_depth=decoder_depth,
    decoder_width=decoder_width,
    decoder_heads=decoder_heads,
  )
  if crate_mae.decoder_dim_head(dims) != dec_dim_head:
    raise ConversionError(
      f"{dec_key} {(dec_inner, dec_in)} gives decoder heads of width {dec_dim_head}, but a "
      f"CRATE-MAE decoder of width {decoder_width} with {decoder_heads} heads has heads of "
      f"width {crate_mae.decoder_dim_head(dims)}."
    )
  return dims


def _position_table(name: str, width: int, grid: tuple[int, int]) -> common.Entry:
  """A constant: checked against our sin-cos table on import, our table on export."""
  table = ops.sincos_position_table(width, grid)[None]

  def check(value: np.ndarray | None) -> None:
    if value is None:
      raise ConversionError(
        f"Missing key {name!r} (the fixed 2-D sin-cos position table, shape {table.shape})."
      )
    if value.shape != table.shape:
      raise ConversionError(
        f"{name} has shape {value.shape}; the model inferred from the other keys expects the "
        f"sin-cos table of shape {table.shape} (width {width}, grid {grid})."
      )
    err = float(np.max(np.abs(np.asarray(value, np.float64) - table)))
    if not err <= TABLE_ATOL:
      raise ConversionError(
        f"{name} is not the fixed 2-D sin-cos position table of width {width} on the {grid} "
        f"grid (max difference {err:.3g} > {TABLE_ATOL}): CRATE-MAE uses that constant, not a "
        f"learned embedding."
      )

  return common.Entry(name, "", check, lambda _: table)


def mapping(dims: dict[str, Any]) -> list[common.Entry]:
  grid = model_common.grid_size(dims["image_size"], dims["patch_size"])
  decoder = dict(
    width=dims["decoder_width"],
    heads=dims["decoder_heads"],
    dim_head=crate_mae.decoder_dim_head(dims),
  )
  entries = [
    # Conv2d weight (d, 3, p1, p2) <-> Flax Conv kernel (p1, p2, 3, d).
    common.Entry(
      "patch_embed.proj.weight",
      "patch_embed/conv/kernel",
      lambda w: w.transpose(2, 3, 1, 0),
      lambda k: k.transpose(3, 2, 0, 1),
    ),
    common.renamed("patch_embed.proj.bias", "patch_embed/conv/bias"),
    common.renamed("cls_token", "cls"),
    common.renamed("mask_token", "mask_token"),
    _position_table("pos_embed", dims["width"], grid),
    _position_table("decoder_pos_embed", dims["decoder_width"], grid),
    common.renamed("norm.weight", "encoder_norm/scale"),
    common.renamed("norm.bias", "encoder_norm/bias"),
    common.Entry(
      "decoder_embed.weight", "decoder_embed/kernel", common.transpose, common.transpose
    ),
    common.renamed("decoder_embed.bias", "decoder_embed/bias"),
    common.renamed("decoder_norm.weight", "decoder_norm/scale"),
    common.renamed("decoder_norm.bias", "decoder_norm/bias"),
    common.Entry("decoder_pred.weight", "decoder_pred/kernel", common.transpose, common.transpose),
    common.renamed("decoder_pred.bias", "decoder_pred/bias"),
  ]
  for i in range(dims["depth"]):
    t = f"blocks.{i}.layers.0."
    entries += crate_format.layer_entries(t + "0.", t + "1.", f"encoder/layer_{i}/", dims)
  for i in range(dims["decoder_depth"]):
    t, ours = f"decoder_blocks.{i}.layers.0.", f"decoder/layer_{i}/"
    entries += [
      common.renamed(t + "0.norm.weight", ours + "norm1/scale"),
      common.renamed(t + "0.norm.bias", ours + "norm1/bias"),
      common.renamed(t + "0.fn.weight", ours + "dict/E"),  # E as stored: Y = LN_a(X) E^T.
    ]
    entries += crate_format.attention_entries(t + "1.", ours, decoder, norm="norm2")
  return entries
