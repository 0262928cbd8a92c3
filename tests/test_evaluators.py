"""Layer-wise rate-reduction measurements and the classification evaluator."""

import functools
import json
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from crate_jax import convert
from crate_jax import evaluators
from crate_jax import models
from crate_jax import writers
from crate_jax.evaluators import classification
from crate_jax.evaluators import rate_reduction
from crate_jax.evaluators import segmentation as segmentation_evaluator
from crate_jax.models import get_model

EPS, LAM = 0.5, 0.1


@pytest.fixture(scope="module")
def crate():
  """A tiny random CRATE, 6 images, their intermediates and per-image measurements."""
  model = get_model(
    "crate", width=32, depth=2, heads=2, patch_size=8, image_size=(16, 16), num_classes=5
  )
  # Parameters drawn with numpy: compiling `model.init`'s initialisers takes seconds on CPU.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: (rng.normal(size=x.shape) / np.sqrt(x.shape[0])).astype("f4"), shapes["params"]
  )
  images = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)

  @jax.jit
  def measure(params, images):
    _, out = model.apply({"params": params}, images, return_intermediates=True)
    return out["intermediates"], rate_reduction.layerwise_rate_reduction(
      out["intermediates"], rate_reduction.subspaces(params), eps=EPS, lam=LAM
    )

  intermediates, per_image = jax.device_get(measure(params, images))
  return types.SimpleNamespace(
    model=model, params=params, images=images, intermediates=intermediates, per_image=per_image
  )


def _logdet(a):
  sign, value = np.linalg.slogdet(a)
  assert np.all(sign > 0)
  return value


def _layer_norm(z, scale, bias):
  return (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5) * scale + bias


def test_layerwise_quantities_match_numpy_from_the_parameters(crate):
  """Layer 2 measured from Z^2 = z_full[0] and layer 2's parameters, in float64 numpy."""
  layer = jax.tree.map(lambda x: np.asarray(x, np.float64), crate.params["encoder"]["layer_1"])
  z_in, z_out = (np.asarray(crate.intermediates["z_full"][i], np.float64) for i in (0, 1))
  u = layer["mssa"]["proj"]
  (b, n, d), p = z_out.shape, u.shape[-1]
  w = np.einsum("bnd,dkp->bknp", _layer_norm(z_in, **layer["norm1"]), u)  # (B, K, N, p)
  x = w / np.linalg.norm(w, axis=-1, keepdims=True)
  gram = lambda a: np.swapaxes(a, -1, -2) @ a  # A^T A
  compression = lambda w: 0.5 * _logdet(np.eye(p) + p / (n * EPS**2) * gram(w)).sum(1)
  expansion = 0.5 * _logdet(np.eye(d) + d / (n * EPS**2) * gram(z_out))
  token_gram = x @ np.swapaxes(x, -1, -2)  # X_k X_k^T, (B, K, N, N), as the papers write it.
  expected = {
    "compression_published": 0.5 * _logdet(np.eye(n) + p / (n * 0.01) * token_gram).sum(1),
    "compression": compression(w),
    "expansion": expansion,
    "sparse_rate_reduction": (
      expansion
      - compression(np.einsum("bnd,dkp->bknp", z_out, u))
      - LAM * np.abs(z_out).sum((1, 2))
    ),
    "nonzero_fraction": (z_out != 0).mean((1, 2)),
  }
  measured = crate.per_image
  assert set(measured) == set(rate_reduction.QUANTITIES)
  for name, value in expected.items():
    assert measured[name].shape == (2, b), name
    np.testing.assert_allclose(measured[name][1], value, rtol=1e-4, err_msg=name)
  assert np.all((measured["nonzero_fraction"] > 0) & (measured["nonzero_fraction"] < 1))


def test_evaluator_scalars_statistics_and_history(crate):
  assert crate.model.lam == LAM  # The evaluator's default.
  evaluator = rate_reduction.LayerwiseRateReduction(crate.model, crate.images, batch_size=3)
  scalars = evaluator.run(crate.params, step=100)
  assert set(scalars) == {
    f"{q}{suffix}/layer_{layer:02d}"
    for layer in (1, 2)
    for q in rate_reduction.QUANTITIES
    for suffix in ("", "_std")
  }
  # Two forward passes of 3 images give the statistics of all 6.
  for q, values in crate.per_image.items():
    for layer in (1, 2):
      values_l = np.asarray(values[layer - 1], np.float64)
      np.testing.assert_allclose(scalars[f"{q}/layer_{layer:02d}"], values_l.mean(), rtol=1e-5)
      np.testing.assert_allclose(
        scalars[f"{q}_std/layer_{layer:02d}"], values_l.std(), rtol=1e-3, atol=1e-6
      )
  assert list(evaluator.history) == [100]
  np.testing.assert_allclose(
    evaluator.history[100]["nonzero_fraction"].mean,
    [scalars[f"nonzero_fraction/layer_{layer:02d}"] for layer in (1, 2)],
  )


def test_evaluator_reproduces_the_golden_published_measurements(golden_dir):
  golden = np.load(golden_dir / "crate_tiny.npz")
  model, variables = convert.from_published(
    {k[len("param:") :]: golden[k] for k in golden.files if k.startswith("param:")},
    heads=json.loads(str(golden["config_json"]))["heads"],
  )
  images = golden["input_nchw"].transpose(0, 2, 3, 1)
  evaluator = rate_reduction.LayerwiseRateReduction(model, images)
  stats = evaluator.layer_stats(variables["params"])
  for name, golden_name in [
    ("compression_published", "coding_rate"),
    ("nonzero_fraction", "nonzero_fraction"),
  ]:
    per_layer = np.stack([golden[f"{golden_name}_{i}"] for i in range(3)])
    np.testing.assert_allclose(stats[name].mean, per_layer.mean(1), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(
      stats[name].std, per_layer.std(1), rtol=1e-3, atol=1e-6, err_msg=name
    )


def _random_orthogonal(rng, n):
  q, r = np.linalg.qr(rng.normal(size=(n, n)))
  return q * np.sign(np.diagonal(r))


def test_measurements_are_invariant_to_rotations():
  """R and R^c depend on Gram matrices: rotating features (Z Q, with U -> Q^T U) or each head
  (W_k R) changes none of them; the published measure is also blind to token scales."""
  rng = np.random.default_rng(0)
  head_proj = rng.normal(size=(2, 3, 7, 2, 4))
  z = np.maximum(rng.normal(size=(2, 3, 7, 8)), 0.0)
  u = rng.normal(size=(2, 8, 2, 4))
  q, r = _random_orthogonal(rng, 8), _random_orthogonal(rng, 4)
  measure = jax.jit(
    lambda h, z, u: rate_reduction.layerwise_rate_reduction(
      {"head_proj": h, "z_full": z}, u, eps=EPS, lam=0.0
    )
  )
  base = measure(head_proj, z, u)
  rotated = measure(head_proj @ r, z @ q, np.einsum("de,ldkp->lekp", q, u))
  for name in ("compression_published", "compression", "expansion", "sparse_rate_reduction"):
    np.testing.assert_allclose(rotated[name], base[name], rtol=1e-4, err_msg=name)
  scaled = measure(head_proj * rng.uniform(0.5, 2.0, size=(2, 3, 7, 2, 1)), z, u)
  np.testing.assert_allclose(
    scaled["compression_published"], base["compression_published"], rtol=1e-5
  )
  assert not np.allclose(scaled["compression"], base["compression"], rtol=1e-2)


def _stats(rng, depth=6):
  return {
    q: rate_reduction.LayerStats(rng.uniform(0.2, 1.0, depth), rng.uniform(0.0, 0.1, depth))
    for q in rate_reduction.QUANTITIES
  }


def test_plot_layerwise_writes_a_png(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "layerwise.png"
  pixels = rate_reduction.plot_layerwise(
    {"step 0": _stats(rng), "step 1000": _stats(rng)}, path, title="CRATE-T"
  )
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
  with Image.open(path) as image:  # One panel per quantity of the papers' figures, side by side.
    assert image.size == (pixels.shape[1], pixels.shape[0]) and image.size[0] > 2 * image.size[1]
  assert pixels.dtype == np.uint8 and pixels.std() > 10  # Not a blank canvas.


def test_tensorboard_layout_has_a_chart_per_quantity(tmp_path):
  writer = writers.TensorBoardWriter(tmp_path)
  rate_reduction.write_tensorboard_layout(writer)
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  (event,) = acc.Tensors("custom_scalars__config__")
  layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
  charts = layout.category[0].chart
  assert [c.title for c in charts] == list(rate_reduction.QUANTITIES)
  pattern = re.compile(charts[0].multiline.tag[0])
  name = lambda quantity: "rate_reduction/" + rate_reduction.metric_name(quantity, 12)
  assert pattern.match(name(rate_reduction.QUANTITIES[0]))
  assert not pattern.match(name(rate_reduction.QUANTITIES[0] + "_std"))


class _Linear(nn.Module):
  classes: int = 10

  @nn.compact
  def __call__(self, images):
    return nn.Dense(self.classes)(images.reshape(images.shape[0], -1)), {}


def test_classification_is_exact_over_padded_uneven_batches():
  rng = np.random.default_rng(0)
  model = _Linear()
  images = rng.normal(size=(10, 2, 2, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
  logits = np.asarray(model.apply({"params": params}, images)[0], np.float64)
  # Label of image i is its (i mod 7)-th most likely class: top-1 hits 2, top-5 hits 8 of 10.
  labels = np.argsort(-logits, axis=1)[np.arange(10), np.arange(10) % 7].astype(np.int32)
  batches, sizes = [], (4, 4, 2)  # The last batch is padded with NaN images and label -1.
  for start, size in zip((0, 4, 8), sizes):
    pad = 4 - size
    batches.append(
      {
        "image": np.concatenate(
          [images[start : start + size], np.full((pad, 2, 2, 3), np.nan, np.float32)]
        ),
        "label": np.concatenate([labels[start : start + size], np.full(pad, -1, np.int32)]),
        "mask": np.concatenate([np.ones(size, np.float32), np.zeros(pad, np.float32)]),
      }
    )
  step = jax.jit(functools.partial(classification.eval_sums, model))
  metrics = classification.summarize([step(params, batch) for batch in batches])

  shifted = logits - logits.max(1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  rank = (logits > logits[np.arange(10), labels][:, None]).sum(1)
  assert metrics["num_examples"] == 10
  assert metrics["top1"] == np.mean(rank == 0) == 0.2
  assert metrics["top5"] == np.mean(rank < 5) == 0.8
  np.testing.assert_allclose(metrics["loss"], -log_probs[np.arange(10), labels].mean(), rtol=1e-6)


def test_classification_rejects_an_empty_set():
  model = _Linear()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)))["params"]
  batch = {
    "image": np.zeros((2, 2, 2, 3), np.float32),
    "label": np.zeros(2, np.int32),
    "mask": np.zeros(2, np.float32),
  }
  with pytest.raises(ValueError, match="no real examples"):
    classification.summarize([classification.eval_sums(model, params, batch)])


@pytest.mark.parametrize(
  "entry,message",
  [
    (dict(every_steps=5), "has no `type`"),
    (dict(type="segmentaton"), "unknown type 'segmentaton'"),
    (dict(type="rate_reduction", num_imgs=4), r"num_imgs.*its fields: \['num_images'"),
    (dict(type="classification", every_steps=-1), "every_steps must be an int >= 0"),
  ],
)
def test_check_names_the_entry_and_the_problem(entry, message):
  with pytest.raises(ValueError, match=message):
    evaluators.check({"probe": entry}, models.model_class("crate"))


def test_check_refuses_measurements_a_model_cannot_give():
  evaluators.check({"rr": dict(type="rate_reduction")}, models.model_class("crate_alpha"))
  with pytest.raises(ValueError, match="cannot measure a ViT model"):
    evaluators.check({"rr": dict(type="rate_reduction")}, models.model_class("vit"))


def test_built_evaluators_run_by_name_with_their_entry_fields(crate, tmp_path, monkeypatch):
  context = evaluators.Context(crate.model, ml_collections.ConfigDict(), workdir=tmp_path)
  monkeypatch.setattr(evaluators.Context, "fixed_images", lambda self, num: crate.images[:num])
  (scheduled,) = evaluators.build(
    {"layerwise": dict(type="rate_reduction", every_steps=4, num_images=3)}, context
  )
  assert (scheduled.name, scheduled.due(8), scheduled.due(6)) == ("layerwise", True, False)
  scalars = scheduled.evaluator.run(crate.params, step=8)
  expected = rate_reduction.LayerwiseRateReduction(crate.model, crate.images[:3])
  assert scalars == pytest.approx(expected.run(crate.params), rel=1e-4, abs=1e-5)
  assert (tmp_path / "layerwise.png").exists()  # Named after the entry.


def test_segmentation_scores_a_head_that_sees_the_objects_and_one_that_does_not():
  """Head 0 attends to the object patches, head 1 uniformly: the scores tell them apart."""
  rng = np.random.default_rng(0)
  b, grid, patch = 12, 4, 2
  foreground = np.zeros((b, 8, 8), np.uint8)
  parts = np.zeros((b, 8, 8), np.uint8)
  for i in range(b):  # A 2 x 2-patch object at a random position, its top row part 1.
    r, c = rng.integers(0, 3, 2)
    foreground[i, 2 * r : 2 * r + 4, 2 * c : 2 * c + 4] = 1
    parts[i, 2 * r : 2 * r + 4, 2 * c : 2 * c + 4] = 2
    parts[i, 2 * r : 2 * r + 2, 2 * c : 2 * c + 4] = 1
  object_patches = foreground[:, ::patch, ::patch].astype(np.float32)
  head_maps = np.stack([object_patches + 1e-3, np.ones_like(object_patches)], axis=1)
  head_maps /= head_maps.sum((2, 3), keepdims=True)
  keys = np.where(object_patches.reshape(b, grid * grid, 1) > 0, 1.0, -1.0) * np.ones((1, 1, 4))
  keys = keys + 0.01 * rng.normal(size=keys.shape)
  collected = segmentation_evaluator.Collected(head_maps, keys, foreground, foreground, parts)
  results = segmentation_evaluator.score(collected, (patch, patch), best_head=0)
  assert results["attention/auroc_best_head"] == pytest.approx(1.0)
  assert results["attention/auroc_image_best_head"] == pytest.approx(1.0)
  assert results["attention/iou_best_head"] == pytest.approx(0.75)  # 60% of the mass: 3 of 4.
  assert results["attention/auroc_heads"] == pytest.approx(0.75)  # Mean of 1.0 and 0.5.
  assert results["pca/iou"] > 0.9 and results["maskcut/ap50"] > 0.9
  assert results["parts/consistency_best"] == pytest.approx(1.0)
  assert results["parts/chance"] < 1.0
