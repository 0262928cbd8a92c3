"""Layer-wise rate-reduction measurements of a CRATE model, to log beside the loss.

For layer `l = 1..L` (numbered from 1 as in the papers' figures) with input `Z^l`, output
`Z^{l+1}` (the sparse-coding step's output) and subspaces `U_l = [U_1..U_K]` (`d x K x p`),
every quantity is measured per image on its `N` tokens (CLS included):

  compression_published   1/2 sum_k logdet(I_N + p / (N eps0^2) X_k X_k^T), eps0^2 = 0.01,
                          X_k = LN1(Z^l) U_k with every row scaled to unit l2 norm: the
                          measurement plotted in the CRATE papers.
  compression             R^c_eps(LN1(Z^l) | U_l) = sum_k 1/2 logdet(I_p + p / (N eps^2) W_k^T W_k),
                          W_k = LN1(Z^l) U_k: the coding rate against the subspaces where the
                          layer's MSSA step acts on it (its attention is computed from W).
  expansion               R_eps(Z^{l+1}) = 1/2 logdet(I_d + d / (N eps^2) Z^T Z): the term the
                          sparse-coding step expands, on its output.
  sparse_rate_reduction   R_eps(Z^{l+1}) - R^c_eps(Z^{l+1} | U_l) - lam ||Z^{l+1}||_1, the layer's
                          objective at its output (the l1 norm sums all N x d entries).
  nonzero_fraction        ||Z^{l+1}||_0 / (N d) (lower is sparser).

The plain terms use `eps = 0.5` by default; log-determinants are taken in float32 or higher
(see `crate_jax.ops`). Over a set of images each quantity is summarised per layer by its
mean and its (population) standard deviation.

In CRATE-alpha, `Z^{l+1}` adds a residual to the sparse code, so its `nonzero_fraction`
is close to 1 and does not measure the codes' sparsity.

`LayerwiseRateReduction.run` returns flat scalars named `{quantity}/layer_{l:02d}` (means)
and `{quantity}_std/layer_{l:02d}`; as an evaluator they are prefixed with the entry name
(`rate_reduction/...`): TensorBoard shows one section per entry with a chart per quantity and
layer, and `write_tensorboard_layout` adds a Custom Scalars
chart per quantity with one line per layer. `plot_layerwise` draws the papers' figures.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import functools
import os
import re
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import matplotlib
from matplotlib import figure
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata

from crate_jax import ops
from crate_jax import xla_cpu

if TYPE_CHECKING:
  from crate_jax import writers

Array = jax.Array

QUANTITIES = (
  "compression_published",
  "compression",
  "expansion",
  "sparse_rate_reduction",
  "nonzero_fraction",
)
PAPER_QUANTITIES = ("compression_published", "nonzero_fraction")  # The papers' figures.
PREFIX = "rate_reduction"
PUBLISHED_EPS_SQ = 0.01

_AXIS_LABELS = {
  "compression_published": r"compression term $R^c$ (published)",
  "compression": r"$R^c_\epsilon(\mathrm{LN}(Z^\ell) \mid U_\ell)$",
  "expansion": r"$R_\epsilon(Z^{\ell+1})$",
  "sparse_rate_reduction": r"$R - R^c - \lambda \|Z^{\ell+1}\|_1$",
  "nonzero_fraction": r"non-zero fraction of $Z^{\ell+1}$",
}


class LayerStats(NamedTuple):
  """Mean and standard deviation over images of one quantity, per layer (shape `(L,)`)."""

  mean: np.ndarray
  std: np.ndarray


# Layer stacks a model may have: (parameter collection, its intermediates in `out`).
STACKS = (("encoder", "intermediates"), ("decoder", "decoder_intermediates"))


def subspaces(params: Mapping[str, Any], stack: str = "encoder") -> Array:
  """The layers' subspace bases `U_l` stacked, `(L, d, K, p)`, of one layer stack.

  Reads `<stack>/layer_{i}/mssa/proj` (or the stacked `<stack>/layers/mssa/proj` of
  `scan_layers` models); boxed (logically partitioned) parameters are unboxed.
  """
  layers = nn.unbox(params[stack])
  if "layers" in layers:
    return layers["layers"]["mssa"]["proj"]
  depth = sum(name.startswith("layer_") for name in layers)
  return jnp.stack([layers[f"layer_{i}"]["mssa"]["proj"] for i in range(depth)])


def layerwise_rate_reduction(
  intermediates: Mapping[str, Array], subspace_bases: Array, *, eps: float = 0.5, lam: float = 0.1
) -> dict[str, Array]:
  """Every quantity of the module doc, per layer and image.

  Args:
    intermediates: a model's `out["intermediates"]`: `head_proj` `(L, B, N, K, p)` and
      `z_full` `(L, B, N, d)`.
    subspace_bases: `U` of every layer, `(L, d, K, p)` (see `subspaces`).
    eps: precision of the plain coding rates.
    lam: sparsity weight of the objective (the model's `lam`).

  Returns:
    `{quantity: (L, B) array}` for the names in `QUANTITIES`.
  """
  head_proj, z_next = intermediates["head_proj"], intermediates["z_full"]
  n, _, p = head_proj.shape[-3:]
  compression_of_output = jax.vmap(ops.compression_rate, in_axes=(0, 0, None))(
    z_next, subspace_bases, eps
  )
  expansion = ops.coding_rate(z_next, eps)
  return {
    "compression_published": ops.published_compression_measure(head_proj, PUBLISHED_EPS_SQ),
    # R^c(LN1(Z^l) | U_l) from W = LN1(Z^l) U_l, as `ops.compression_rate` computes it.
    "compression": 0.5
    * jnp.sum(
      ops.logdet_identity_plus_gram(jnp.moveaxis(head_proj, -2, -3), p / (n * eps**2)), axis=-1
    ),
    "expansion": expansion,
    "sparse_rate_reduction": expansion - compression_of_output - lam * ops.l1_norm(z_next),
    "nonzero_fraction": ops.nonzero_fraction(z_next, batch_dims=2),
  }


def layer_statistics(per_image: Mapping[str, Any]) -> dict[str, LayerStats]:
  """`{quantity: (L, B) values}` -> `{quantity: LayerStats}`, mean and std over the B images."""
  stats = {}
  for name, values in per_image.items():
    values = np.asarray(values, np.float64)
    stats[name] = LayerStats(values.mean(axis=1), values.std(axis=1))
  return stats


def metric_name(quantity: str, layer: int, stack: str = "encoder") -> str:
  """`compression_published/layer_01` for the first (encoder) layer (`layer` counts from 1);
  `.../decoder_layer_01` for a decoder's."""
  return f"{quantity}/{'' if stack == 'encoder' else stack + '_'}layer_{layer:02d}"


def flat_scalars(
  stats: Mapping[str, LayerStats], depths: Mapping[str, int] | None = None
) -> dict[str, float]:
  """Per-layer means named `metric_name(q, l)`, standard deviations `metric_name(q + "_std", l)`.

  `depths` (`{stack: layers}`, in order) splits the layers of `stats` between the stacks;
  by default they are all the encoder's.
  """
  scalars = {}
  for quantity, (mean, std) in stats.items():
    names = [
      (stack, layer)
      for stack, depth in (depths or {"encoder": len(mean)}).items()
      for layer in range(1, depth + 1)
    ]
    for (stack, layer), m, s in zip(names, mean, std):
      scalars[metric_name(quantity, layer, stack)] = float(m)
      scalars[metric_name(f"{quantity}_std", layer, stack)] = float(s)
  return scalars


def _per_image(
  model: nn.Module, eps: float, lam: float, params: Any, images: Array
) -> dict[str, Array]:
  """Every stack's quantities, its layers after the previous stack's: `{q: (L + L', B)}`."""
  # Models that draw random masks get the same ones for every measurement.
  rngs = {stream: jax.random.PRNGKey(0) for stream in model.RNG_STREAMS}
  _, out = model.apply({"params": params}, images, return_intermediates=True, rngs=rngs)
  per_stack = [
    layerwise_rate_reduction(out[key], subspaces(params, stack), eps=eps, lam=lam)
    for stack, key in STACKS
    if key in out
  ]
  return {q: jnp.concatenate([s[q] for s in per_stack]) for q in per_stack[0]}


class LayerwiseRateReduction:
  """Measures the module doc's quantities on a fixed set of images.

  Usage, every few thousand steps of training:

    measure = LayerwiseRateReduction(model, images)
    writer.write_scalars(step, measure.run(params, step=step))
    measure.plot("layerwise.png")  # One curve per evaluated step.

  Attributes:
    history: `{step: {quantity: LayerStats}}` of the `run` calls given a step.
  """

  def __init__(
    self,
    model: nn.Module,
    images: Any,
    *,
    eps: float = 0.5,
    lam: float | None = None,
    batch_size: int | None = None,
    jit: Callable[[Callable[..., Any]], Callable[..., Any]] = jax.jit,
  ):
    """Builds the evaluator.

    Args:
      model: a CRATE or CRATE-alpha `Model`.
      images: `(M, H, W, 3)` images, preprocessed as the model's inputs.
      eps: precision of the plain coding rates.
      lam: sparsity weight of the objective; the model's `lam` by default.
      batch_size: images per forward pass (all M at once by default).
      jit: wraps the measurement `f(params, images) -> {quantity: (L, B)}`; pass e.g.
        `functools.partial(jax.jit, in_shardings=...)` for sharded parameters.
    """
    self._images = np.asarray(images)
    self._batch_size = batch_size or len(self._images)
    lam = model.lam if lam is None else lam
    self._measure = jit(functools.partial(_per_image, model, eps, lam))
    self.history: dict[int, dict[str, LayerStats]] = {}
    # Layers per stack, in measurement order (an encoder, and a decoder if there is one).
    depths = {"encoder": model.dims()["depth"]}
    if hasattr(model, "decoder_depth"):  # An autoencoder: measured through its decoder too.
      depths["decoder"] = model.decoder_depth or model.dims()["depth"]
    self.depths = depths

  def layer_stats(self, params: Any) -> dict[str, LayerStats]:
    """`{quantity: LayerStats}` over all the images."""
    chunks = []
    for start in range(0, len(self._images), self._batch_size):
      per_image = self._measure(params, self._images[start : start + self._batch_size])
      # Gathered in full on every process, however the jitted function shards its outputs.
      chunks.append(multihost_utils.process_allgather(per_image, tiled=True))
    return layer_statistics(
      {name: np.concatenate([c[name] for c in chunks], axis=1) for name in chunks[0]}
    )

  def run(self, params: Any, *, step: int | None = None) -> dict[str, float]:
    """Flat scalars (see `flat_scalars`); with `step`, also records the statistics in `history`."""
    stats = self.layer_stats(params)
    if step is not None:
      self.history[step] = stats
    return flat_scalars(stats, self.depths)

  def plot(
    self,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "",
    quantities: Sequence[str] = PAPER_QUANTITIES,
  ) -> np.ndarray:
    """`plot_layerwise` of `history`, one curve per recorded step."""
    curves = {f"step {step}": stats for step, stats in sorted(self.history.items())}
    boundary = self.depths["encoder"] if len(self.depths) > 1 else None
    return plot_layerwise(curves, path, title=title, quantities=quantities, boundary=boundary)


class Evaluator:
  """The layer-wise measurements on the first `num_images` evaluation images, as an evaluator.

  Every run also redraws `<entry name>.png` in the workdir: the papers' layer-wise figure
  with one curve per evaluated step.
  """

  def __init__(
    self,
    context: Any,
    *,
    num_images: int = 64,
    batch_size: int | None = None,
    eps: float = 0.5,
    lam: float | None = None,
  ):
    if num_images < 1:
      raise ValueError(f"rate_reduction needs num_images >= 1, got {num_images}.")
    self._context = context
    self._measure = LayerwiseRateReduction(
      context.model,
      context.fixed_images(num_images),
      eps=eps,
      lam=lam,
      batch_size=batch_size,
      jit=xla_cpu.eager_on_cpu(),
    )
    if context.writer is not None and context.is_main:
      write_tensorboard_layout(context.writer, prefix=context.name)

  @staticmethod
  def supports(model_cls: type) -> bool:
    return model_cls.HAS_SUBSPACES

  def run(self, params: Any, step: int) -> dict[str, float]:
    scalars = self._measure.run(params, step=step)
    if self._context.workdir is not None and self._context.is_main:
      self._measure.plot(
        self._context.workdir / f"{self._context.name}.png", title=self._context.model.FAMILY
      )
    return scalars


def plot_layerwise(
  curves: Mapping[str, Mapping[str, LayerStats]],
  path: str | os.PathLike[str] | None = None,
  *,
  title: str = "",
  quantities: Sequence[str] = PAPER_QUANTITIES,
  boundary: int | None = None,
  dpi: int = 100,
) -> np.ndarray:
  """Plots quantities against the layer index, as in the CRATE papers' figures.

  One panel per quantity; every curve (e.g. one per training step) is its per-layer mean with
  standard-deviation error bars. Rendered with Agg, without pyplot's global state.

  Args:
    curves: `{label: {quantity: LayerStats}}`, e.g. `{"step 1000": evaluator.layer_stats(p)}`.
    path: where to save the PNG, or None.
    title: the figure's title.
    quantities: the panels, names from `QUANTITIES`.
    boundary: the number of encoder layers when the curves continue through a decoder: a
      dashed line separates them.
    dpi: resolution.

  Returns:
    The rendered figure, `uint8 (H, W, 3)`, e.g. for `MetricWriter.write_images`.
  """
  fig = figure.Figure(figsize=(4.5 * len(quantities), 3.6), dpi=dpi, layout="constrained")
  canvas = backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(quantities), squeeze=False)[0]
  colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(curves)))
  for ax, quantity in zip(axes, quantities):
    for color, (label, stats) in zip(colors, curves.items()):
      mean, std = stats[quantity]
      ax.errorbar(
        np.arange(1, len(mean) + 1),
        mean,
        yerr=std,
        label=label,
        color=color,
        marker="o",
        markersize=4,
        capsize=3,
      )
    if boundary is not None:
      ax.axvline(boundary + 0.5, color="gray", linestyle="--", linewidth=1)
      ax.text(boundary + 0.6, 0.98, "decoder", transform=ax.get_xaxis_transform(), va="top")
      ax.text(
        boundary + 0.4, 0.98, "encoder", transform=ax.get_xaxis_transform(), va="top", ha="right"
      )
    ax.set_xlabel("layer index")
    ax.set_ylabel(_AXIS_LABELS.get(quantity, quantity))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  if len(curves) > 1:
    axes[0].legend(fontsize="small")
  if title:
    fig.suptitle(title)
  canvas.draw()
  if path is not None:
    fig.savefig(path, format="png")
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_tensorboard_layout(
  writer: writers.MetricWriter, *, prefix: str = PREFIX, quantities: Sequence[str] = QUANTITIES
) -> None:
  """Writes a TensorBoard Custom Scalars layout: per quantity one chart, one line per layer.

  Write it once per log directory; it applies to the scalars of the evaluator `prefix` names.
  """
  charts = [
    layout_pb2.Chart(
      title=quantity,
      multiline=layout_pb2.MultilineChartContent(
        tag=[rf"^{re.escape(prefix)}/{quantity}/(decoder_)?layer_\d+$"]
      ),
    )
    for quantity in quantities
  ]
  layout = layout_pb2.Layout(category=[layout_pb2.Category(title=prefix, chart=charts)])
  tag = custom_scalar_metadata.CONFIG_SUMMARY_TAG
  writer.write_summaries(
    0,
    {tag: np.array(layout.SerializeToString(), dtype=object)},
    metadata={tag: custom_scalar_metadata.create_summary_metadata()},
  )
