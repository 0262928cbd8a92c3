"""The published PyTorch CRATE format (`to_patch_embedding.*`, `transformer.layers.i.*`)."""

from __future__ import annotations

from typing import Any

from crate_jax.convert import common
from crate_jax.convert.common import ConversionError
from crate_jax.convert.common import StateDict
from crate_jax.models import common as model_common
from crate_jax.models import crate

MODEL = "crate"  # The family in crate_jax.models.
DESCRIPTION = "PyTorch CRATE (to_patch_embedding.*, transformer.layers.<i>.*)"


def matches(state: StateDict) -> bool:
  return "to_patch_embedding.2.weight" in state


def infer(state: StateDict, overrides: dict[str, Any]) -> dict[str, Any]:
  width, patch_dim = state["to_patch_embedding.2.weight"].shape
  depth = common.layer_count(state, r"transformer\.layers\.(\d+)\.0\.fn\.qkv\.weight")
  inner = state["transformer.layers.0.0.fn.qkv.weight"].shape[0]
  heads = overrides.pop("heads", None)
  if heads is None:
    preset = [s for s in crate.VARIANTS.values() if (s.width, s.depth) == (width, depth)]
    if inner != width or len(preset) != 1:
      raise ConversionError(
        f"Cannot tell the number of heads from shapes (width {width}, depth {depth}, "
        f"qkv {inner} x {width}): pass heads=K."
      )
    heads = preset[0].heads
  dim_head = common.check_heads(
    heads, inner, "transformer.layers.0.0.fn.qkv.weight", (inner, width)
  )
  patch = overrides.pop("patch_size", None)
  image_size, patch = common.infer_geometry(
    state["pos_embedding"].shape[1] - 1,
    model_common.pair(patch) if patch else None,
    overrides.pop("image_size", None),
    patch_dim,
  )
  if 3 * patch[0] * patch[1] != patch_dim:
    raise ConversionError(
      f"patch_size {patch} needs a patch vector of {3 * patch[0] * patch[1]} but "
      f"to_patch_embedding.2.weight has shape {(width, patch_dim)}."
    )
  return dict(
    width=width,
    depth=depth,
    heads=heads,
    dim_head=dim_head,
    patch_size=patch,
    image_size=image_size,
    num_classes=state["mlp_head.1.weight"].shape[0],
  )


def attention_entries(
  attention: str, ours: str, dims: dict[str, Any], norm: str = "norm1"
) -> list[common.Entry]:
  """A pre-normed MSSA block (`PreNorm(Attention)`): the published names under `attention`,
  ours under `ours` (the LayerNorm as `ours + norm`, the attention as `ours + "mssa/"`)."""
  d, k, p = dims["width"], dims["heads"], dims["dim_head"]
  return [
    common.renamed(attention + "norm.weight", ours + norm + "/scale"),
    common.renamed(attention + "norm.bias", ours + norm + "/bias"),
    # qkv.weight is U^T (K*p, d), head-major.
    common.Entry(
      attention + "fn.qkv.weight",
      ours + "mssa/proj",
      lambda w: w.T.reshape(d, k, p),
      lambda u: u.reshape(d, k * p).T,
    ),
    common.Entry(
      attention + "fn.to_out.0.weight",
      ours + "mssa/out",
      lambda w: w.T.reshape(k, p, d),
      lambda x: x.reshape(k * p, d).T,
    ),
    common.renamed(attention + "fn.to_out.0.bias", ours + "mssa/out_bias"),
  ]


def layer_entries(attention: str, ista: str, ours: str, dims: dict[str, Any]) -> list[common.Entry]:
  """One CRATE layer: the attention block's names under `attention` (`...0.`), the ISTA
  block's under `ista` (`...1.`), ours under `ours` (`encoder/layer_i/`)."""
  return attention_entries(attention, ours, dims) + [
    common.renamed(ista + "norm.weight", ours + "norm2/scale"),
    common.renamed(ista + "norm.bias", ours + "norm2/bias"),
    common.renamed(ista + "fn.weight", ours + "ista/D"),
  ]


def mapping(dims: dict[str, Any]) -> list[common.Entry]:
  entries = [
    common.renamed("to_patch_embedding.1.weight", "patch_embed/norm_in/scale"),
    common.renamed("to_patch_embedding.1.bias", "patch_embed/norm_in/bias"),
    common.Entry(
      "to_patch_embedding.2.weight", "patch_embed/dense/kernel", common.transpose, common.transpose
    ),
    common.renamed("to_patch_embedding.2.bias", "patch_embed/dense/bias"),
    common.renamed("to_patch_embedding.3.weight", "patch_embed/norm_out/scale"),
    common.renamed("to_patch_embedding.3.bias", "patch_embed/norm_out/bias"),
    common.renamed("cls_token", "cls"),
    common.renamed("pos_embedding", "pos_embedding"),
    common.renamed("mlp_head.0.weight", "head_norm/scale"),
    common.renamed("mlp_head.0.bias", "head_norm/bias"),
    common.Entry("mlp_head.1.weight", "head/kernel", common.transpose, common.transpose),
    common.renamed("mlp_head.1.bias", "head/bias"),
  ]
  for i in range(dims["depth"]):
    t = f"transformer.layers.{i}."
    entries += layer_entries(t + "0.", t + "1.", f"encoder/layer_{i}/", dims)
  return entries
