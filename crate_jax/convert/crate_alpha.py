"""The published Flax CRATE-alpha format (`embedding/*`, `Transformer/encoderblock_i/*`)."""

from __future__ import annotations

from typing import Any

from crate_jax.convert import common
from crate_jax.convert.common import ConversionError
from crate_jax.convert.common import StateDict
from crate_jax.models import common as model_common

MODEL = "crate_alpha"  # The family in crate_jax.models.
DESCRIPTION = "Flax CRATE-alpha (embedding/*, Transformer/encoderblock_<i>/*)"


def matches(state: StateDict) -> bool:
  return "embedding/kernel" in state and any(k.startswith("Transformer/") for k in state)


def infer(state: StateDict, overrides: dict[str, Any]) -> dict[str, Any]:
  p1, p2, _, width = state["embedding/kernel"].shape
  depth = common.layer_count(state, r"Transformer/encoderblock_(\d+)/")
  key = "Transformer/encoderblock_0/MultiHeadDotProductSubspaceAttention_0/proj/kernel"
  _, heads, dim_head = state[key].shape
  if overrides.get("heads", heads) != heads:
    raise ConversionError(
      f"heads={overrides['heads']} contradicts {key} of shape {state[key].shape}."
    )
  overrides.pop("heads", None)
  patch = overrides.pop("patch_size", None)
  if patch is not None and model_common.pair(patch) != (p1, p2):
    raise ConversionError(
      f"patch_size {patch} contradicts embedding/kernel of shape {state['embedding/kernel'].shape}."
    )
  image_size, _ = common.infer_geometry(
    state["pos_embedding"].shape[1] - 1, (p1, p2), overrides.pop("image_size", None), None
  )
  d_shape = state["Transformer/encoderblock_0/OvercompleteISTABlock_0/D"].shape
  return dict(
    width=width,
    depth=depth,
    heads=heads,
    dim_head=dim_head,
    patch_size=(p1, p2),
    image_size=image_size,
    expansion=d_shape[1] // width,
    num_classes=state["head/kernel"].shape[1],
  )


def mapping(dims: dict[str, Any]) -> list[common.Entry]:
  entries = [
    common.renamed("embedding/kernel", "patch_embed/conv/kernel"),
    common.renamed("embedding/bias", "patch_embed/conv/bias"),
    common.renamed("cls", "cls"),
    common.renamed("pos_embedding", "pos_embedding"),
    common.renamed("encoder_norm/scale", "encoder_norm/scale"),
    common.renamed("encoder_norm/bias", "encoder_norm/bias"),
    common.renamed("head/kernel", "head/kernel"),
    common.renamed("head/bias", "head/bias"),
  ]
  for i in range(dims["depth"]):
    t, o = f"Transformer/encoderblock_{i}/", f"encoder/layer_{i}/"
    attn, odl = t + "MultiHeadDotProductSubspaceAttention_0/", t + "OvercompleteISTABlock_0/"
    entries += [
      common.renamed(t + "LayerNorm_0/scale", o + "norm1/scale"),
      common.renamed(t + "LayerNorm_0/bias", o + "norm1/bias"),
      common.renamed(t + "LayerNorm_1/scale", o + "norm2/scale"),
      common.renamed(t + "LayerNorm_1/bias", o + "norm2/bias"),
      common.renamed(attn + "proj/kernel", o + "mssa/proj"),
      common.renamed(attn + "out/kernel", o + "mssa/out"),
      common.renamed(odl + "D", o + "odl/D"),
      common.renamed(odl + "D1", o + "odl/D1"),
    ]
  return entries
