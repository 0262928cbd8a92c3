"""Pieces shared by the model files: size tables, patches, position embeddings, layer stacks.

Parameters and activations carry *logical* axis names; `crate_jax.sharding` maps them to
mesh axes through the config's rules. The names:

  batch, tokens, embed (model width), heads, head_dim, dict (dictionary columns / MLP
  hidden), patch (flattened patch pixels), classes.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import math
import re
from typing import Any
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

ACTIVATION_AXES = ("batch", "tokens", "embed")


def pair(x: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(x, int):
    return (x, x)
  x = tuple(int(v) for v in x)
  if len(x) != 2:
    raise ValueError(f"Expected an int or a pair of ints, got {x}.")
  return x  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Size:
  width: int
  depth: int
  heads: int


def parse_variant(variant: str, table: dict[str, Size]) -> tuple[Size, tuple[int, int]]:
  """`"B/16"` -> (size of B, (16, 16)); `"B/16x8"` gives a non-square (16, 8) patch."""
  match = re.fullmatch(r"(\w+)/(\d+)(?:x(\d+))?", variant)
  if not match or match.group(1) not in table:
    raise ValueError(
      f"Unknown variant {variant!r}: expected '<size>/<patch>' (or '<size>/<ph>x<pw>') "
      f"with size in {sorted(table)}, e.g. 'B/16'."
    )
  size, p1, p2 = match.groups()
  return table[size], (int(p1), int(p2 or p1))


def resolve_dims(
  model_name: str,
  table: dict[str, Size],
  variant: str | None,
  *,
  width: int | None = None,
  depth: int | None = None,
  heads: int | None = None,
  dim_head: int | None = None,
  patch_size: Sequence[int] | int | None = None,
) -> dict[str, Any]:
  """Sizes from a variant string, with explicit fields taking precedence.

  Returns a dict with width, depth, heads, dim_head (default width // heads) and patch_size.
  """
  size, patch = parse_variant(variant, table) if variant else (Size(0, 0, 0), None)
  dims = dict(width=width or size.width, depth=depth or size.depth, heads=heads or size.heads)
  if not all(dims.values()):
    raise ValueError(
      f"{model_name} needs a `variant` (e.g. 'B/16') or width, depth and heads; "
      f"got variant={variant!r} and {dims}."
    )
  dims["dim_head"] = dim_head or dims["width"] // dims["heads"]
  dims["patch_size"] = pair(patch_size or patch or 16)
  return dims


class ModelBase(nn.Module):
  """The fields and methods every model family shares (a family subclasses it).

  Sizes come from `variant` ("B/16": size B of the family's `VARIANTS`, patch 16), and
  explicit `width`, `depth`, `heads`, `dim_head`, `patch_size` override it. `image_size` is
  the resolution the position embedding is learned at (other input sizes are served by
  resampling it). `scan_layers` / `remat_policy` are memory options (see `LayerStack`);
  `dtype` is the compute dtype (parameters stay float32).

  Class attributes a family sets: `FAMILY` (its name in messages), `VARIANTS` (its size
  table), `HAS_SUBSPACES` (whether its layers hold MSSA subspaces `mssa/proj` that the
  rate-reduction measurements read) and `RNG_STREAMS` (the random streams `apply` draws
  from in training, e.g. masking).
  """

  FAMILY: ClassVar[str] = "model"
  VARIANTS: ClassVar[dict[str, Size]] = {}
  HAS_SUBSPACES: ClassVar[bool] = False
  RNG_STREAMS: ClassVar[tuple[str, ...]] = ()

  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  heads: int | None = None
  dim_head: int | None = None
  patch_size: Sequence[int] | None = None
  image_size: Sequence[int] = (224, 224)
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6

  def dims(self) -> dict[str, Any]:
    """Resolved sizes: width, depth, heads, dim_head, patch_size."""
    return resolve_dims(
      self.FAMILY,
      self.VARIANTS,
      self.variant,
      width=self.width,
      depth=self.depth,
      heads=self.heads,
      dim_head=self.dim_head,
      patch_size=self.patch_size,
    )

  def num_patches(self, image_size: Sequence[int] | None = None) -> int:
    gh, gw = grid_size(image_size or self.image_size, self.dims()["patch_size"])
    return gh * gw

  def forward_flops(self, batch_size: int, image_size: Sequence[int] | None = None) -> float:
    """FLOPs of the forward pass's matmuls on `batch_size` images (multiply-add = 2)."""
    raise NotImplementedError(f"{type(self).__name__} does not count its FLOPs.")

  def encode(self, images: Array, return_intermediates: bool = False) -> tuple[Array, dict]:
    """`(tokens, out)`: the final token representations `(B, T, d)` of unmasked images (CLS
    first) and, with `return_intermediates`, `out["intermediates"]` of the layers that
    produced them. What probes and interpretability read:
    `model.apply(variables, images, method="encode")`."""
    raise NotImplementedError(f"{type(self).__name__} does not expose its tokens.")

  def check_images(self, images: Array) -> None:
    """Raises a one-line ValueError unless `images` is a float NHWC batch of RGB images."""
    shape = tuple(images.shape)
    if len(shape) != 4:
      hint = " (a single image: add a batch axis, images[None])" if len(shape) == 3 else ""
      raise ValueError(
        f"{self.FAMILY} takes a batch of NHWC images (B, H, W, 3); got {shape}{hint}."
      )
    if shape[-1] != 3:
      hint = (
        "; this looks like NCHW: transpose with images.transpose(0, 2, 3, 1)"
        if shape[1] == 3
        else "; convert grayscale or RGBA images to RGB"
      )
      raise ValueError(f"{self.FAMILY} takes RGB images with 3 channels last; got {shape}{hint}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
        f"{self.FAMILY} takes normalised float images; got {images.dtype}: scale to [0, 1] and "
        "normalise as the training input pipeline does (input.mean, input.std)."
      )
    grid_size(shape[1:3], self.dims()["patch_size"])


class ClassifierBase(ModelBase):
  """A transformer classifier: tokens (`embed`), `depth` layers (`layer`), then `head`.

  `apply(variables, images_nhwc, return_intermediates=False)` returns `(logits, out)`
  (`num_classes=0`: the pooled features) with `out["pre_logits"]` and, when asked for,
  `out["intermediates"]`: per layer, stacked, `z_half`, `z_full` (B, T, d), `head_proj`
  (B, T, K, p) and `attn` (B, K, T, T). A family defines `layer()` and, where it differs
  from the default below, `embed()` and `head()`.
  """

  # The `encoder_norm` epsilon of the default `head`; None: the layers' `layer_norm_eps`.
  ENCODER_NORM_EPS: ClassVar[float | None] = None

  num_classes: int = 1000
  pool: str = "cls"  # 'cls' token or 'mean' over all tokens (CLS included).

  def layer(self) -> Callable[..., nn.Module]:
    """The family's layer, with its fields bound (see `LayerStack`)."""
    raise NotImplementedError

  def embed(self, images: Array) -> Array:
    """Tokens `(B, 1 + h*w, d)`: a linear (convolutional) patch stem, CLS and positions."""
    dims = self.dims()
    x = ConvPatchEmbed(dims["width"], dims["patch_size"], self.dtype, name="patch_embed")(images)
    return add_cls_and_posemb(
      self,
      x,
      image_size=self.image_size,
      patch_size=dims["patch_size"],
      input_hw=images.shape[1:3],
      dtype=self.dtype,
      init_std=0.02,
    )

  def head(self, x: Array, intermediates: dict[str, Array] | None) -> tuple[Array, dict]:
    """A LayerNorm on all tokens (`encoder_norm`), pooling and a Xavier-initialised `head`."""
    eps = self.layer_norm_eps if self.ENCODER_NORM_EPS is None else self.ENCODER_NORM_EPS
    x = layer_norm(eps, self.dtype, "encoder_norm")(x)
    return classifier_head(
      self,
      x,
      pool=self.pool,
      num_classes=self.num_classes,
      dtype=self.dtype,
      torch_init=False,
      intermediates=intermediates,
    )

  def encode(self, images: Array, return_intermediates: bool = False) -> tuple[Array, dict]:
    """The tokens the head pools (after `encoder_norm` where the family has one)."""
    _, out = self(images, return_intermediates=return_intermediates)
    return out["tokens"], out

  @nn.compact
  def __call__(
    self, images: Array, *, train: bool = False, return_intermediates: bool = False
  ) -> tuple[Array, dict[str, Any]]:
    del train  # No dropout or batch statistics.
    self.check_images(images)
    x = self.embed(images)
    stack = LayerStack(
      self.layer(), self.dims()["depth"], self.scan_layers, self.remat_policy, name="encoder"
    )
    x, intermediates = stack(x, return_intermediates)
    return self.head(x, intermediates if return_intermediates else None)


def transformer_flops(
  model: ModelBase,
  batch_size: int,
  image_size: Sequence[int] | None,
  *,
  per_token: int,
  stem_per_patch: int,
  per_batch: int = 0,
  head: int = 0,
) -> float:
  """Matmul FLOPs of a patch-token transformer's forward pass (multiply-add = 2).

  Args:
    model: sizes (`dims()`) and geometry.
    batch_size: images.
    image_size: input size (default: the model's).
    per_token: multiply-adds of one layer's token-by-weight products for one token.
    stem_per_patch: multiply-adds of the patch embedding per patch.
    per_batch: multiply-adds on weights alone, once per forward pass.
    head: multiply-adds after the layers, per image.
  """
  dims = model.dims()
  patches = model.num_patches(image_size)
  tokens = patches + 1
  inner = dims["heads"] * dims["dim_head"]
  attention = 2 * tokens**2 * inner  # Logits and the weighted sum.
  per_image = patches * stem_per_patch + dims["depth"] * (tokens * per_token + attention) + head
  return 2.0 * (batch_size * per_image + per_batch)


def square_side(n: int, what: str = "Number of patch tokens") -> int:
  """The side of a square of `n` (a patch grid, a patch): ValueError when `n` is not one."""
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f"{what} ({n}) is not a square")
  return side


def grid_size(image_size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int]:
  (h, w), (p1, p2) = pair(image_size), pair(patch_size)
  if h % p1 or w % p2:
    raise ValueError(
      f"Image size {(h, w)} is not divisible by the patch size {(p1, p2)}: resize or crop "
      f"the images, or pick a patch size that divides them."
    )
  return h // p1, w // p2


def patchify(images: Array, patch_size: Sequence[int]) -> Array:
  """NHWC images -> `(B, h*w, p1*p2*C)` patches, each flattened in (row, col, channel) order."""
  b, height, width, c = images.shape
  p1, p2 = pair(patch_size)
  gh, gw = grid_size((height, width), (p1, p2))
  x = images.reshape(b, gh, p1, gw, p2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, p1 * p2 * c)


def unpatchify(patches: Array, grid: Sequence[int], patch_size: Sequence[int]) -> Array:
  """The inverse of `patchify`: `(B, gh*gw, p1*p2*C)` patches -> `(B, gh*p1, gw*p2, C)`."""
  (gh, gw), (p1, p2) = pair(grid), pair(patch_size)
  b, _, n = patches.shape
  c = n // (p1 * p2)
  x = patches.reshape(b, gh, gw, p1, p2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p1, gw * p2, c)


def resample_posemb(
  posemb: Array, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix_tokens: int = 1
) -> Array:
  """Resamples a `(1, prefix + h*w, d)` position embedding to another grid, bicubically.

  The prefix (CLS) rows are kept as they are. Used to fine-tune or inspect a model at
  another resolution or patch grid (also non-square).
  """
  old_grid, new_grid = pair(old_grid), pair(new_grid)
  if posemb.shape[1] != num_prefix_tokens + old_grid[0] * old_grid[1]:
    raise ValueError(
      f"Position embedding of shape {posemb.shape} does not hold {num_prefix_tokens} prefix "
      f"tokens plus a {old_grid} grid."
    )
  if old_grid == new_grid:
    return posemb
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  d = grid.shape[-1]
  grid = grid.reshape(old_grid + (d,)).astype(jnp.float32)
  grid = jax.image.resize(grid, new_grid + (d,), method="bicubic")
  grid = grid.reshape(1, new_grid[0] * new_grid[1], d).astype(posemb.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


def add_cls_and_posemb(
  module: nn.Module,
  x: Array,
  *,
  image_size: Sequence[int],
  patch_size: Sequence[int],
  input_hw: Sequence[int],
  dtype: Dtype,
  init_std: float = 1.0,
) -> Array:
  """Prepends the learned CLS token and adds the learned position embedding.

  Creates `cls (1, 1, d)` and `pos_embedding (1, 1 + h*w, d)` in `module`'s scope. The
  embedding is learned on the grid of `image_size`; inputs of another size get it
  resampled bicubically on the fly.
  """
  width = x.shape[-1]
  init = nn.initializers.normal(init_std)
  cls = module.param("cls", param_with_axes(init, (None, None, "embed")), (1, 1, width))
  x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, width)), x], axis=1)
  learned_grid = grid_size(image_size, patch_size)
  posemb = module.param(
    "pos_embedding",
    param_with_axes(init, (None, "tokens", "embed")),
    (1, 1 + learned_grid[0] * learned_grid[1], width),
  )
  posemb = resample_posemb(posemb, learned_grid, grid_size(input_hw, patch_size))
  return constrain(x + posemb.astype(dtype))


class ConvPatchEmbed(nn.Module):
  """Linear patch embedding as a strided convolution, kernel `(p1, p2, C, d)` with bias."""

  width: int
  patch_size: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    grid_size(images.shape[1:3], self.patch_size)  # Validates divisibility.
    x = nn.Conv(
      self.width,
      self.patch_size,
      strides=self.patch_size,
      padding="VALID",
      dtype=self.dtype,
      name="conv",
      kernel_init=param_with_axes(nn.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=param_with_axes(nn.initializers.zeros, ("embed",)),
    )(images.astype(self.dtype))
    return x.reshape(x.shape[0], -1, self.width)


def classifier_head(
  module: nn.Module,
  x: Array,
  *,
  pool: str,
  num_classes: int,
  dtype: Dtype,
  intermediates: dict[str, Array] | None,
  torch_init: bool,
  head_norm_eps: float | None = None,
) -> tuple[Array, dict[str, Any]]:
  """Pools the tokens ('cls' or 'mean'), optionally normalises (`head_norm`), applies `head`.

  Returns the models' common `(logits, out)`: `out` holds the `tokens` pooled, `pre_logits`
  and, when given, the stacked per-layer `intermediates`. `num_classes=0` returns the pooled
  features as logits.
  """
  if pool not in ("cls", "mean"):
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}.")
  pre_logits = x[:, 0] if pool == "cls" else jnp.mean(x, axis=1)
  if head_norm_eps is not None:
    pre_logits = layer_norm(head_norm_eps, dtype, "head_norm")(pre_logits)
  out: dict[str, Any] = {"tokens": x, "pre_logits": pre_logits}
  if intermediates is not None:
    out["intermediates"] = intermediates
  if not num_classes:
    return pre_logits, out
  logits = dense(
    num_classes, dtype, "head", ("embed", "classes"), torch_init=torch_init, fan_in=x.shape[-1]
  )(pre_logits)
  return logits.astype(jnp.float32), out


def param_with_axes(init: Callable[..., Array], axes: tuple[str | None, ...]):
  """An initializer whose parameter carries logical axis names (for sharding)."""
  return nn.with_logical_partitioning(init, axes)


def constrain(x: Array, axes: tuple[str | None, ...] = ACTIVATION_AXES) -> Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh with rules."""
  return nn.with_logical_constraint(x, axes)


def torch_linear_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default Linear init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def layer_norm(epsilon: float, dtype: Dtype, name: str, axis_name: str = "embed") -> nn.LayerNorm:
  """LayerNorm with logically named scale and bias (the epsilon matters: 1e-5 in CRATE)."""
  return nn.LayerNorm(
    epsilon=epsilon,
    dtype=dtype,
    name=name,
    scale_init=param_with_axes(nn.initializers.ones, (axis_name,)),
    bias_init=param_with_axes(nn.initializers.zeros, (axis_name,)),
  )


def dense(
  features: int,
  dtype: Dtype,
  name: str,
  axes: tuple[str, str],
  use_bias: bool = True,
  torch_init: bool = True,
  fan_in: int | None = None,
) -> nn.Dense:
  """Dense layer with logically named kernel `(in, out)` and bias `(out,)`.

  `torch_init` reproduces PyTorch's Linear default (uniform +-1/sqrt(fan_in)) for kernel and
  bias; otherwise Xavier-uniform kernel and zero bias (ViT convention).
  """
  if torch_init:
    if fan_in is None:
      raise ValueError("torch_init needs fan_in.")
    kernel_init = bias_init = torch_linear_init(fan_in)
  else:
    kernel_init, bias_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    name=name,
    kernel_init=param_with_axes(kernel_init, axes),
    bias_init=param_with_axes(bias_init, axes[1:]),
  )


REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nn.Module):
  """Applies `depth` copies of `layer` in order, unrolled or with `nn.scan`, with optional remat.

  `layer(collect=..., name=...)` must build a module mapping `x -> (x, intermediates)`,
  where `intermediates` is a dict of arrays (empty unless `collect`). Returns the final `x`
  and the intermediates stacked over layers (leading axis `depth`).

  Unrolled, layer i's parameters live under `layer_{i}`; scanned, under `layers` with a
  leading `depth` axis (see `stack_layer_params` / `unstack_layer_params`).
  """

  layer: Callable[..., nn.Module]
  depth: int
  scan: bool = False
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x: Array, collect: bool = False) -> tuple[Array, dict[str, Array]]:
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}."
      )
    layer_cls = self.layer
    if self.remat_policy != "none":
      layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[self.remat_policy])
    if self.scan:
      scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      return scanned(collect=collect, name="layers")(x)
    outputs = []
    for i in range(self.depth):
      x, inter = layer_cls(collect=collect, name=f"layer_{i}")(x)
      outputs.append(inter)
    return x, (jax.tree.map(lambda *xs: jnp.stack(xs), *outputs) if collect else {})


LAYER_STACKS = ("encoder", "decoder")  # Top-level parameter collections of `LayerStack`s.


def stack_layer_params(params: dict) -> dict:
  """Unrolled `<stack>/layer_{i}` parameters -> the scanned `<stack>/layers` layout, for
  every layer stack of `params` (`LAYER_STACKS`) that is unrolled."""
  params = jax.tree.map(lambda x: x, params)  # A shallow copy of the nested dicts.
  for stack in LAYER_STACKS:
    parent = params.get(stack, {})
    depth = sum(name.startswith("layer_") for name in parent)
    if depth:
      layers = [parent.pop(f"layer_{i}") for i in range(depth)]
      parent["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


def unstack_layer_params(params: dict) -> dict:
  """Scanned `<stack>/layers` parameters -> the unrolled `<stack>/layer_{i}` layout, for
  every layer stack of `params` that is scanned."""
  params = jax.tree.map(lambda x: x, params)
  for stack in LAYER_STACKS:
    parent = params.get(stack, {})
    if "layers" in parent:
      stacked = parent.pop("layers")
      for i in range(jax.tree.leaves(stacked)[0].shape[0]):
        parent[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
