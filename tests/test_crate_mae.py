"""CRATE-MAE: golden outputs of the published code, masking, loss, decoder, options, converter."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import convert
from crate_jax import ops
from crate_jax.models import common
from crate_jax.models import crate_mae
from crate_jax.models import get_model

# The golden file (shared/golden/crate_mae_tiny.npz) holds float64 outputs of the published
# PyTorch code. We compute in float32 (unit roundoff 6e-8): two encoder and two decoder
# layers of LayerNorms, softmaxes and 64-channel matmuls accumulate a few ulps per op; we
# measured <= 7.3e-7 relative (max |error| / max |golden|) on every array (loss 4e-8).
# 1e-5, the spec's float32 bound, leaves a >10x margin and still catches small slips:
# lam 0.1 instead of 0.5 moves the latent by 4e-2, the layers' LayerNorm eps 1e-6 instead
# of 1e-5 by 8e-4, even the final norms' eps 1e-5 instead of 1e-6 by 1.7e-5.
RTOL = 1e-5


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _golden(golden_dir):
  golden = np.load(golden_dir / "crate_mae_tiny.npz")
  state = {k[len("param:") :]: golden[k] for k in golden.files if k.startswith("param:")}
  return golden, state


def _images(golden):
  return jnp.asarray(golden["input_nchw"], jnp.float32).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def golden_model(golden_dir, tmp_path_factory):
  golden, state = _golden(golden_dir)
  path = tmp_path_factory.mktemp("mae") / "published.npz"
  np.savez(path, **state)
  model, variables = convert.load_published(str(path), heads=4)
  return golden, state, model, variables


def _forward(model, variables, images, noise):
  return model.apply(variables, images, noise, return_intermediates=True)


# --------------------------------------------------------------------------------------
# Exactness against the published code.
# --------------------------------------------------------------------------------------


def test_golden_every_array(golden_model):
  golden, _, model, variables = golden_model
  assert model.dims()["decoder_depth"] == 2 and model.mask_ratio == 0.75
  pred, out = _forward(model, variables, _images(golden), jnp.asarray(golden["noise"]))
  np.testing.assert_array_equal(out["mask"], golden["mask"])
  np.testing.assert_array_equal(out["ids_restore"], golden["ids_restore"])
  for i in range(2):
    assert _rel(out["intermediates"]["z_full"][i], golden[f"encoder_out_{i}"]) < RTOL, i
    assert _rel(out["decoder_intermediates"]["z_full"][i], golden[f"decoder_out_{i}"]) < RTOL, i
  assert _rel(out["latent"], golden["latent"]) < RTOL
  assert pred.shape == (3, 16, 192) and _rel(pred, golden["pred"]) < RTOL
  assert abs(float(out["loss"]) - golden["loss"]) / golden["loss"] < RTOL
  # On the unmasked image: the last encoder layer's attention and qkv(LN1(Z)).
  _, enc = model.apply(variables, _images(golden), True, method="encode")
  assert _rel(enc["intermediates"]["attn"][-1], golden["attn_last"]) < RTOL
  key = enc["intermediates"]["head_proj"][-1]
  assert _rel(key.reshape(*key.shape[:2], -1), golden["key_last"]) < RTOL


def test_decoder_subtracts_the_attention(golden_model):
  golden, _, model, variables = golden_model
  noise = jnp.asarray(golden["noise"])
  flipped = jax.tree.map(lambda x: x, variables)
  for i in range(2):  # -MSSA = the same attention with a negated output map and bias.
    mssa = flipped["params"]["decoder"][f"layer_{i}"]["mssa"]
    mssa["out"], mssa["out_bias"] = -mssa["out"], -mssa["out_bias"]
  _, out = _forward(model, variables, _images(golden), noise)
  _, out_added = _forward(model, flipped, _images(golden), noise)
  assert _rel(out["decoder_intermediates"]["z_full"][0], golden["decoder_out_0"]) < RTOL
  assert _rel(out_added["decoder_intermediates"]["z_full"][0], golden["decoder_out_0"]) > 1e-2


def test_decoder_layer_without_attention_is_the_linear_dictionary_step():
  layer = crate_mae.DecoderLayer(heads=2, dim_head=8, collect=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  params = nn.unbox(layer.init(jax.random.PRNGKey(1), x)["params"])
  params["mssa"]["out"] = jnp.zeros_like(params["mssa"]["out"])
  params["mssa"]["out_bias"] = jnp.zeros_like(params["mssa"]["out_bias"])
  params["norm1"]["scale"] = 1.0 + jax.random.normal(jax.random.PRNGKey(2), (16,))
  params["norm1"]["bias"] = jax.random.normal(jax.random.PRNGKey(3), (16,))
  out, inter = layer.apply({"params": params}, x)
  xn = np.asarray(x, np.float64)
  ln = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
  ln = ln * np.asarray(params["norm1"]["scale"]) + np.asarray(params["norm1"]["bias"])
  expected = ln @ np.asarray(params["dict"]["E"], np.float64).T
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(inter["z_half"], out)  # y = x' when the attention is zero.
  assert inter["head_proj"].shape == (2, 5, 2, 8) and inter["attn"].shape == (2, 2, 5, 5)


@pytest.mark.parametrize(
  "variant,with_tables,params_only",
  [
    ("T/16", 11_555_328, 11_404_032),
    ("S/16", 25_405_824, 25_178_880),
    ("B/16", 44_638_464, 44_335_872),
    ("L/16", 154_274_560, 153_871_104),
  ],
)
def test_published_parameter_counts(variant, with_tables, params_only):
  model = get_model("crate_mae", variant=variant)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  tables = 2 * (model.num_patches() + 1) * model.dims()["width"]  # pos_embed, decoder_pos_embed
  assert n == params_only and n + tables == with_tables


def test_sincos_table_layout():
  table = ops.sincos_position_table(8, (2, 3))
  assert table.shape == (7, 8) and not table[0].any()  # CLS row zero.
  # Token 1 + 3 i + j: the first half encodes the column j, the second half the row i.
  omega = 1.0 / 10000.0 ** (np.arange(2) / 2)
  i, j = 1, 2
  expected = np.concatenate(
    [np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
  )
  np.testing.assert_allclose(table[1 + 3 * i + j], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="divisible by 4"):
    ops.sincos_position_table(6, (2, 2))


# --------------------------------------------------------------------------------------
# Masking and the loss.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [16, 49, 196])
@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.75, 0.9])
def test_masking_properties(length, ratio):
  noise = jax.random.uniform(jax.random.PRNGKey(length), (3, length))
  ids_keep, mask, ids_restore = ops.random_masking(noise, ratio)
  keep = int(length * (1 - ratio))
  assert ids_keep.shape == (3, keep)
  np.testing.assert_array_equal(np.sum(1 - np.asarray(mask), axis=1), keep)
  # The kept patches are the `keep` smallest noises, unmasked.
  order = np.argsort(np.asarray(noise), axis=1)
  np.testing.assert_array_equal(np.sort(ids_keep, 1), np.sort(order[:, :keep], 1))
  assert not np.take_along_axis(np.asarray(mask), np.asarray(ids_keep), 1).any()
  # ids_restore inverts the shuffle: shuffled[ids_restore] is the grid order again.
  shuffled = np.take_along_axis(np.arange(length)[None].repeat(3, 0), order, 1)
  np.testing.assert_array_equal(
    np.take_along_axis(shuffled, np.asarray(ids_restore), 1), np.arange(length)[None].repeat(3, 0)
  )
  again = ops.random_masking(noise, ratio)  # Deterministic given the noise.
  np.testing.assert_array_equal(again[1], mask)
  np.testing.assert_array_equal(again[2], ids_restore)


def _tiny(**kw):
  kw = dict(width=32, depth=2, heads=2, patch_size=8, image_size=(32, 32)) | kw
  return get_model("crate_mae", **kw)


@pytest.fixture(scope="module")
def tiny():
  model = _tiny()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  rngs = {"params": jax.random.PRNGKey(1), "masking": jax.random.PRNGKey(2)}
  return model, nn.unbox(model.init(rngs, x)["params"]), x


def test_masks_come_from_the_rng_stream(tiny):
  model, params, x = tiny
  big = jnp.ones((4, 64, 64, 3))  # 64 patches: C(64, 16) masks, a collision is negligible.
  apply = lambda key: model.apply({"params": params}, big, rngs={"masking": key})[1]["mask"]
  mask = np.asarray(apply(jax.random.PRNGKey(5)))
  assert mask.shape == (4, 64) and (mask.sum(1) == 48).all()
  assert len({m.tobytes() for m in mask}) == 4  # Every image its own mask.
  np.testing.assert_array_equal(apply(jax.random.PRNGKey(5)), mask)
  assert not np.array_equal(apply(jax.random.PRNGKey(6)), mask)
  with pytest.raises(ValueError, match="masking"):
    model.apply({"params": params}, x)
  with pytest.raises(ValueError, match="noise must have shape"):
    model.apply({"params": params}, x, jnp.zeros((4, 15)))


def test_loss_counts_masked_patches_only(tiny):
  model, params, x = tiny
  noise = jax.random.uniform(jax.random.PRNGKey(3), (4, 16))
  pred, out = model.apply({"params": params}, x, noise)
  target = common.patchify(x, (8, 8))
  assert float(out["loss"]) == pytest.approx(
    float(ops.masked_patch_loss(pred, target, out["mask"])), rel=1e-6
  )
  visible = 1.0 - out["mask"]
  changed = pred + 10.0 * visible[..., None]  # Only the visible patches' predictions move.
  assert float(ops.masked_patch_loss(changed, target, out["mask"])) == pytest.approx(
    float(out["loss"]), rel=1e-6
  )
  assert float(ops.masked_patch_loss(pred + 1.0, target, out["mask"])) != pytest.approx(
    float(out["loss"]), rel=1e-3
  )
  # Against numpy, norm_pix_loss with the unbiased variance.
  p, t, m = (np.asarray(a, np.float64) for a in (pred, target, out["mask"]))
  tn = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
  expected = (((p - tn) ** 2).mean(-1) * m).sum() / m.sum()
  _, out_norm = model.clone(norm_pix_loss=True).apply({"params": params}, x, noise)
  assert float(out_norm["loss"]) == pytest.approx(expected, rel=1e-5)
  biased = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  assert float(out_norm["loss"]) != pytest.approx(
    (((p - biased) ** 2).mean(-1) * m).sum() / m.sum(), rel=1e-5
  )


# --------------------------------------------------------------------------------------
# Options: visible-token encoder, encode, jit/grad, scan, bfloat16, widths, FLOPs.
# --------------------------------------------------------------------------------------


def test_visible_encoder_tokens(tiny):
  model, params, x = tiny
  visible = model.clone(encoder_tokens="visible")
  noise = jax.random.uniform(jax.random.PRNGKey(4), (4, 16))
  pred, out = visible.apply({"params": params}, x, noise, return_intermediates=True)
  assert out["intermediates"]["z_full"].shape == (2, 4, 1 + 4, 32)  # CLS + int(16 * 0.25).
  assert out["decoder_intermediates"]["z_full"].shape == (2, 4, 17, 32)
  assert pred.shape == (4, 16, 192) and np.isfinite(float(out["loss"]))
  ref_pred, ref_out = model.apply({"params": params}, x, noise)
  np.testing.assert_array_equal(out["mask"], ref_out["mask"])
  assert not np.allclose(pred, ref_pred)
  # Without masking both encoders see every patch: the same latent up to the shuffle.
  lat_vis = visible.clone(mask_ratio=0.0).apply({"params": params}, x, noise)[1]
  lat_all = model.clone(mask_ratio=0.0).apply({"params": params}, x, noise)[1]["latent"]
  restored = jnp.take_along_axis(lat_vis["latent"][:, 1:], lat_vis["ids_restore"][..., None], 1)
  np.testing.assert_allclose(restored, lat_all[:, 1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lat_vis["latent"][:, 0], lat_all[:, 0], rtol=1e-5, atol=1e-5)
  assert visible.forward_flops(8) < model.forward_flops(8)


def test_encode_is_the_unmasked_encoder_at_any_size(tiny):
  model, params, x = tiny
  unmasked = model.clone(mask_ratio=0.0)
  _, out = unmasked.apply({"params": params}, x, jnp.zeros((4, 16)), return_intermediates=True)
  latent, enc = model.apply({"params": params}, x, return_intermediates=True, method="encode")
  np.testing.assert_allclose(latent, out["latent"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    enc["intermediates"]["attn"], out["intermediates"]["attn"], rtol=1e-6, atol=1e-6
  )
  assert "intermediates" not in model.apply({"params": params}, x, method="encode")[1]
  big = jnp.ones((2, 48, 40, 3))
  latent, enc = model.apply({"params": params}, big, return_intermediates=True, method="encode")
  assert latent.shape == (2, 1 + 6 * 5, 32) and enc["intermediates"]["attn"].shape[-1] == 31


def test_jit_and_grad_of_the_loss(tiny):
  model, params, x = tiny
  noise = jax.random.uniform(jax.random.PRNGKey(7), (4, 16))
  loss = lambda p: model.apply({"params": p}, x, noise)[1]["loss"]
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for path in [("encoder", "layer_0", "ista", "D"), ("decoder", "layer_1", "dict", "E"), ("cls",)]:
    g = grads
    for k in path:
      g = g[k]
    assert np.abs(g).max() > 0, path
  assert not np.abs(grads["decoder_embed"]["kernel"]).any()  # Unused at equal widths.


def test_scan_layers_and_remat_compute_the_same_function(tiny):
  model, params, x = tiny
  scanned = _tiny(decoder_depth=3, scan_layers=True, remat_policy="full")
  unrolled = _tiny(decoder_depth=3)
  params = nn.unbox(unrolled.init(jax.random.PRNGKey(1), x)["params"])
  stacked = common.stack_layer_params(params)
  assert stacked["decoder"]["layers"]["dict"]["E"].shape == (3, 32, 32)
  noise = jax.random.uniform(jax.random.PRNGKey(8), (4, 16))
  ref, ref_out = unrolled.apply({"params": params}, x, noise, return_intermediates=True)
  got, got_out = scanned.apply({"params": stacked}, x, noise, return_intermediates=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_out["loss"], ref_out["loss"], rtol=1e-5)
  for key in ("intermediates", "decoder_intermediates"):
    np.testing.assert_allclose(got_out[key]["z_full"], ref_out[key]["z_full"], atol=1e-5)
  init_shapes = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x))
  assert jax.tree.map(jnp.shape, nn.unbox(init_shapes["params"])) == jax.tree.map(
    jnp.shape, stacked
  )


def test_bfloat16_runs(tiny):
  model, params, x = tiny
  noise = jax.random.uniform(jax.random.PRNGKey(9), (4, 16))
  pred, out = model.clone(dtype=jnp.bfloat16).apply({"params": params}, x, noise)
  ref, ref_out = model.apply({"params": params}, x, noise)
  assert pred.dtype == jnp.float32 and out["loss"].dtype == jnp.float32
  assert np.isfinite(np.asarray(pred)).all()
  np.testing.assert_allclose(pred, ref, atol=0.2 * float(np.abs(ref).max()))
  assert float(out["loss"]) == pytest.approx(float(ref_out["loss"]), rel=0.1)


@pytest.mark.parametrize("encoder_tokens", ["all", "visible"])
def test_decoder_of_another_width(encoder_tokens):
  model = _tiny(decoder_width=48, decoder_heads=3, decoder_depth=1, encoder_tokens=encoder_tokens)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  rngs = {"params": jax.random.PRNGKey(1), "masking": jax.random.PRNGKey(2)}
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(rngs, x))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32), shapes)
  assert params["decoder_embed"]["kernel"].shape == (32, 48)
  assert params["decoder"]["layer_0"]["mssa"]["proj"].shape == (48, 3, 16)
  assert params["mask_token"].shape == (1, 1, 32 if encoder_tokens == "all" else 48)
  pred, out = model.apply({"params": params}, x, rngs=rngs, return_intermediates=True)
  assert pred.shape == (2, 16, 192) and np.isfinite(float(out["loss"]))
  assert out["decoder_intermediates"]["z_full"].shape == (1, 2, 17, 48)


@pytest.mark.parametrize("encoder_tokens", ["all", "visible"])
def test_forward_flops_match_xla_count(encoder_tokens):
  model = _tiny(
    image_size=(64, 64), decoder_width=48, decoder_heads=3, encoder_tokens=encoder_tokens
  )
  x = jnp.zeros((2, 64, 64, 3))
  rngs = {"params": jax.random.PRNGKey(1), "masking": jax.random.PRNGKey(2)}
  variables = jax.eval_shape(lambda: model.init(rngs, x))
  lowered = jax.jit(lambda v, x: model.apply(v, x, rngs=rngs)[0]).lower(variables, x)
  # XLA also counts the elementwise work (norms, softmax, ISTA): a few percent above the matmuls.
  assert 1.0 < lowered.cost_analysis()["flops"] / model.forward_flops(2) < 1.15


def test_bad_fields_are_reported():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="encoder_tokens"):
    _tiny(encoder_tokens="some").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="mask_ratio"):
    _tiny(mask_ratio=1.5).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="channels last"):
    _tiny().init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32)))


# --------------------------------------------------------------------------------------
# The converter.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".pth:state_dict", ".pth:model"])
def test_golden_through_other_containers(golden_dir, tmp_path, ext):
  golden, state = _golden(golden_dir)
  ext, _, container = ext.partition(":")
  path = tmp_path / f"ckpt{ext}"
  if ext == ".pth":
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    if container == "state_dict":  # A training checkpoint of a DistributedDataParallel model.
      obj = {
        "epoch": 7,
        "state_dict": {"module." + k: v for k, v in tensors.items()},
        "optimizer": {"state": {}},
      }
    else:  # A fine-tuning checkpoint.
      obj = {"model": tensors, "scaler": {"scale": 1.0}}
    torch.save(obj, path)
  else:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    save_file(state, str(path))
  model, variables = convert.load_published(str(path), heads=4)
  pred, out = model.apply(variables, _images(golden), jnp.asarray(golden["noise"]))
  assert _rel(pred, golden["pred"]) < RTOL
  assert abs(float(out["loss"]) - golden["loss"]) / golden["loss"] < RTOL


def _published_state(*, width, depth, image, patch, decoder_depth=None, decoder_width=None, seed=0):
  """A state dict with the published names and shapes, random values, the sin-cos tables."""
  rng = np.random.default_rng(seed)
  rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  decoder_depth, dd = decoder_depth or depth, decoder_width or width
  grid = (image[0] // patch, image[1] // patch)
  state = {
    "patch_embed.proj.weight": rand(width, 3, patch, patch),
    "patch_embed.proj.bias": rand(width),
    "cls_token": rand(1, 1, width),
    "mask_token": rand(1, 1, width),
    "pos_embed": ops.sincos_position_table(width, grid)[None],
    "decoder_pos_embed": ops.sincos_position_table(dd, grid)[None],
    "norm.weight": rand(width),
    "norm.bias": rand(width),
    "decoder_embed.weight": rand(dd, width),
    "decoder_embed.bias": rand(dd),
    "decoder_norm.weight": rand(dd),
    "decoder_norm.bias": rand(dd),
    "decoder_pred.weight": rand(3 * patch * patch, dd),
    "decoder_pred.bias": rand(3 * patch * patch),
  }
  for i in range(depth):
    t = f"blocks.{i}.layers.0."
    state |= {
      t + "0.norm.weight": rand(width),
      t + "0.norm.bias": rand(width),
      t + "0.fn.qkv.weight": rand(width, width),
      t + "0.fn.to_out.0.weight": rand(width, width),
      t + "0.fn.to_out.0.bias": rand(width),
      t + "1.norm.weight": rand(width),
      t + "1.norm.bias": rand(width),
      t + "1.fn.weight": rand(width, width),
    }
  for i in range(decoder_depth):
    t = f"decoder_blocks.{i}.layers.0."
    state |= {
      t + "0.norm.weight": rand(dd),
      t + "0.norm.bias": rand(dd),
      t + "0.fn.weight": rand(dd, dd),
      t + "1.norm.weight": rand(dd),
      t + "1.norm.bias": rand(dd),
      t + "1.fn.qkv.weight": rand(dd, dd),
      t + "1.fn.to_out.0.weight": rand(dd, dd),
      t + "1.fn.to_out.0.bias": rand(dd),
    }
  return state


ROUND_TRIPS = [
  # (published shapes, overrides, expected fields)
  (
    dict(width=48, depth=2, image=(48, 48), patch=8, decoder_depth=3),
    dict(heads=3, mask_ratio=0.5),
    dict(heads=3, dim_head=16, decoder_depth=3, decoder_heads=3, mask_ratio=0.5),
  ),
  (
    dict(width=40, depth=1, image=(32, 48), patch=8),
    dict(heads=5, image_size=(32, 48), norm_pix_loss=True, mask_ratio=0.6),
    dict(heads=5, image_size=(32, 48), norm_pix_loss=True, mask_ratio=0.6),
  ),
  (
    dict(width=32, depth=2, image=(56, 56), patch=14, decoder_depth=1),
    dict(heads=2, decoder_heads=4, patch_size=14),
    dict(heads=2, decoder_heads=4, decoder_depth=1, patch_size=(14, 14)),
  ),
  (
    dict(width=384, depth=12, image=(224, 224), patch=16),
    dict(),  # A preset's width and depth: heads inferred (T: 6).
    dict(heads=6, dim_head=64, decoder_heads=6, image_size=(224, 224)),
  ),
]


@pytest.mark.parametrize("shapes,overrides,fields", ROUND_TRIPS)
def test_round_trip_of_published_files_is_exact(tmp_path, shapes, overrides, fields):
  state = _published_state(**shapes)
  src = tmp_path / "published.npz"
  np.savez(src, **state)
  model, variables = convert.load_published(str(src), **overrides)
  for name, value in fields.items():
    assert model.dims().get(name, getattr(model, name)) == value, name
  for ext in (".npz", ".safetensors"):
    out = tmp_path / f"exported{ext}"
    convert.export_published(model, variables["params"], str(out))
    back = convert.read_state_dict(str(out))
    assert set(back) == set(state)
    for k in state:
      np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  if shapes["width"] <= 48:  # The loaded model runs (tiny shapes only).
    images = jnp.ones((1, *shapes["image"], 3))
    pred, out = model.apply(variables, images, rngs={"masking": jax.random.PRNGKey(0)})
    patches = (shapes["image"][0] // shapes["patch"]) * (shapes["image"][1] // shapes["patch"])
    assert pred.shape == (1, patches, 3 * shapes["patch"] ** 2)
    assert int(out["mask"].sum()) == patches - model.num_visible(patches)


def test_round_trip_of_our_models_is_exact(tmp_path):
  model = _tiny(width=24, heads=3, dim_head=5, decoder_width=36, decoder_heads=4, decoder_depth=1)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: rng.standard_normal(s.shape).astype(np.float32), nn.unbox(shapes["params"])
  )
  path = tmp_path / "published.safetensors"
  convert.export_published(model, params, str(path))
  loaded, variables = convert.load_published(str(path), heads=3, decoder_heads=4)
  assert loaded.dims() == model.dims()
  flat = lambda p: flax.traverse_util.flatten_dict(p)
  assert flat(variables["params"]).keys() == flat(params).keys()
  for k, v in flat(params).items():
    np.testing.assert_array_equal(flat(variables["params"])[k], v)


def test_converter_errors_name_the_problem(golden_dir):
  _, state = _golden(golden_dir)
  with pytest.raises(convert.ConversionError, match="pass heads=K"):
    convert.from_published(state)
  with pytest.raises(convert.ConversionError, match="heads=5 does not divide"):
    convert.from_published(state, heads=5)
  missing = {k: v for k, v in state.items() if k != "decoder_blocks.1.layers.0.0.fn.weight"}
  with pytest.raises(
    convert.ConversionError, match="Missing key 'decoder_blocks.1.layers.0.0.fn.weight'"
  ):
    convert.from_published(missing, heads=4)
  no_table = {k: v for k, v in state.items() if k != "decoder_pos_embed"}
  with pytest.raises(convert.ConversionError, match="Missing key 'decoder_pos_embed'"):
    convert.from_published(no_table, heads=4)
  bad = dict(state)
  bad["blocks.1.layers.0.1.fn.weight"] = np.zeros((64, 63), np.float32)
  with pytest.raises(
    convert.ConversionError, match=r"blocks.1.layers.0.1.fn.weight has shape \(64, 63\)"
  ):
    convert.from_published(bad, heads=4)
  learned = dict(state)
  learned["decoder_pos_embed"] = state["decoder_pos_embed"] + 0.01
  with pytest.raises(
    convert.ConversionError, match="decoder_pos_embed is not the fixed 2-D sin-cos"
  ):
    convert.from_published(learned, heads=4)
  permuted = dict(state)  # The table of the transposed grid (rows and columns swapped).
  permuted["pos_embed"] = state["pos_embed"][:, [0] + [1 + 4 * (t % 4) + t // 4 for t in range(16)]]
  with pytest.raises(convert.ConversionError, match="pos_embed is not the fixed"):
    convert.from_published(permuted, heads=4)
  with pytest.raises(convert.ConversionError, match="image_size"):
    convert.from_published(state, heads=4, image_size=(32, 40))
  with pytest.raises(convert.ConversionError, match="patch_size"):
    convert.from_published(state, heads=4, patch_size=16)
  with pytest.raises(convert.ConversionError, match="cannot be overridden"):
    convert.from_published(state, heads=4, decoder_depth=3)
  scanned, variables = convert.from_published(state, heads=4, scan_layers=True)
  assert {"layers"} == set(variables["params"]["encoder"]) == set(variables["params"]["decoder"])
  exported = convert.to_published(scanned, variables["params"])
  assert set(exported) == set(state)
  for name, value in state.items():
    np.testing.assert_allclose(exported[name], value, atol=1e-5, err_msg=name)
  with pytest.raises(convert.ConversionError, match="Unexpected keys"):
    convert.from_published(state | {"extra.weight": np.zeros(3)}, heads=4)
  other = _published_state(width=32, depth=1, image=(32, 32), patch=8, decoder_width=48)
  with pytest.raises(convert.ConversionError, match="pass decoder_heads=K"):
    convert.from_published(other, heads=2)
  model, _ = convert.from_published(other, heads=2, decoder_heads=3)
  assert model.dims()["decoder_width"] == 48
