"""CRATE, CRATE-alpha and ViT models: published parameter counts, golden outputs, options."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import convert
from crate_jax import ops
from crate_jax.models import common
from crate_jax.models import get_model


def _num_params(model, image_size=(224, 224)):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


@pytest.mark.parametrize(
  "name,variant,expected",
  [
    ("crate", "T/16", 6_090_856),
    ("crate", "S/16", 13_116_328),
    ("crate", "B/16", 22_796_008),
    ("crate", "L/16", 77_641_192),
    ("crate_alpha", "B/16", 72_328_936),
  ],
)
def test_published_parameter_counts(name, variant, expected):
  assert _num_params(get_model(name, variant=variant, num_classes=1000)) == expected


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_crate_golden_logits_and_every_intermediate(golden_dir):
  golden = np.load(golden_dir / "crate_tiny.npz")
  model, variables = convert.from_published(
    {k[len("param:") :]: golden[k] for k in golden.files if k.startswith("param:")},
    heads=json.loads(str(golden["config_json"]))["heads"],
  )
  images = jnp.asarray(golden["input_nchw"]).transpose(0, 2, 3, 1)
  logits, out = jax.jit(lambda v, x: model.apply(v, x, return_intermediates=True))(
    variables, images
  )
  assert _rel(logits, golden["logits"]) < 1e-5
  inter = out["intermediates"]
  for i in range(model.dims()["depth"]):
    assert _rel(inter["z_half"][i], golden[f"z_half_{i}"]) < 1e-5, i
    assert _rel(inter["z_full"][i], golden[f"z_full_{i}"]) < 1e-5, i
    assert _rel(inter["attn"][i], golden[f"attn_{i}"]) < 1e-5, i
    rate = ops.published_compression_measure(inter["head_proj"][i])
    assert _rel(rate, golden[f"coding_rate_{i}"]) < 1e-5, i
    np.testing.assert_allclose(
      ops.nonzero_fraction(inter["z_full"][i]), golden[f"nonzero_fraction_{i}"], atol=1e-6
    )


def test_crate_alpha_golden_logits(golden_dir):
  golden = np.load(golden_dir / "crate_alpha_tiny.npz")
  model, variables = convert.from_published(
    {k[len("param:") :]: golden[k] for k in golden.files if k.startswith("param:")}
  )
  logits, _ = model.apply(variables, jnp.asarray(golden["input_nhwc"]))
  assert _rel(logits, golden["logits"]) < 1e-5


def _tiny(name="crate", **kw):
  kw = dict(width=32, depth=2, heads=2, patch_size=8, image_size=(32, 32), num_classes=5) | kw
  return get_model(name, **kw)


@pytest.mark.parametrize("name", ["crate", "crate_alpha", "vit"])
def test_common_interface_and_free_intermediates(name):
  model = _tiny(name)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  logits, out = model.apply(variables, x)
  assert logits.shape == (3, 5) and "intermediates" not in out
  logits2, out2 = model.apply(variables, x, return_intermediates=True)
  np.testing.assert_array_equal(logits, logits2)
  inter = out2["intermediates"]
  assert inter["z_half"].shape == inter["z_full"].shape == (2, 3, 17, 32)
  assert inter["head_proj"].shape == (2, 3, 17, 2, 16)
  assert inter["attn"].shape == (2, 3, 2, 17, 17)
  np.testing.assert_allclose(inter["attn"].sum(-1), 1.0, rtol=1e-5)
  # "At no cost": the plain forward's compiled program computes no attention output.
  plain = jax.jit(lambda v, x: model.apply(v, x)[0]).lower(variables, x).compile()
  full = (
    jax.jit(lambda v, x: model.apply(v, x, return_intermediates=True)).lower(variables, x).compile()
  )
  assert len(plain.as_text()) < len(full.as_text())


@pytest.mark.parametrize("name", ["crate", "crate_alpha", "vit"])
def test_scan_and_remat_compute_the_same_function(name):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  unrolled = _tiny(name)
  params = nn.unbox(unrolled.init(jax.random.PRNGKey(1), x)["params"])
  scanned = _tiny(name, scan_layers=True, remat_policy="full")
  stacked = common.stack_layer_params(params)
  ref, ref_out = unrolled.apply({"params": params}, x, return_intermediates=True)
  got, got_out = scanned.apply({"params": stacked}, x, return_intermediates=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    got_out["intermediates"]["z_full"], ref_out["intermediates"]["z_full"], atol=1e-5
  )
  grad = lambda m, p: jax.grad(lambda p: m.apply({"params": p}, x)[0].sum())(p)
  np.testing.assert_allclose(
    grad(scanned, stacked)["encoder"]["layers"]["norm1"]["scale"][1],
    grad(unrolled, params)["encoder"]["layer_1"]["norm1"]["scale"],
    rtol=1e-4,
    atol=1e-6,
  )
  back = common.unstack_layer_params(stacked)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


def test_crate_options_change_the_function_as_specified():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  base = _tiny(heads=4, dim_head=6)  # K * p = 24 != d = 32
  params = nn.unbox(base.init(jax.random.PRNGKey(1), x)["params"])
  assert params["encoder"]["layer_0"]["mssa"]["proj"].shape == (32, 4, 6)
  logits_cls, _ = base.apply({"params": params}, x)
  logits_mean, _ = base.clone(pool="mean").apply({"params": params}, x)
  assert not np.allclose(logits_cls, logits_mean)
  # lam shifts the ISTA threshold: a larger lam gives sparser codes.
  nz = lambda m: float(
    ops.nonzero_fraction(
      m.apply({"params": params}, x, return_intermediates=True)[1]["intermediates"]["z_full"][0]
    ).mean()
  )
  assert nz(base.clone(lam=2.0)) < nz(base)
  # Paper-form MSSA has no output projection and a kappa step.
  paper = _tiny(mssa_form="paper", kappa=0.3)
  pparams = nn.unbox(paper.init(jax.random.PRNGKey(1), x)["params"])
  assert set(pparams["encoder"]["layer_0"]["mssa"]) == {"proj"}
  with pytest.raises(ValueError, match="pool"):
    base.clone(pool="max").apply({"params": params}, x)


@pytest.mark.parametrize(
  "patch,image", [((8, 8), (32, 32)), ((8, 4), (32, 24)), ((14, 14), (28, 42))]
)
def test_any_patch_and_image_size(patch, image):
  model = _tiny(patch_size=patch, image_size=image)
  x = jnp.ones((1, *image, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  grid = (image[0] // patch[0], image[1] // patch[1])
  assert nn.unbox(variables["params"])["pos_embedding"].shape == (1, 1 + grid[0] * grid[1], 32)
  assert model.apply(variables, x)[0].shape == (1, 5)
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    model.apply(variables, jnp.ones((1, image[0] + 1, image[1], 3)))


def test_variant_strings():
  assert _tiny(
    width=None, depth=None, heads=None, patch_size=None, variant="S/16x8"
  ).dims() == dict(width=576, depth=12, heads=12, dim_head=48, patch_size=(16, 8))
  with pytest.raises(ValueError, match="Unknown variant"):
    get_model("crate", variant="Q/16").dims()
  with pytest.raises(ValueError, match="Unknown model"):
    get_model("resnet")


def test_position_embedding_resampling():
  posemb = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 4 * 4, 8))
  same = common.resample_posemb(posemb, (4, 4), (4, 4))
  np.testing.assert_array_equal(same, posemb)
  up = common.resample_posemb(posemb, (4, 4), (8, 6))
  assert up.shape == (1, 1 + 48, 8)
  np.testing.assert_array_equal(up[:, 0], posemb[:, 0])  # CLS row kept.
  # A constant field stays constant under bicubic resampling.
  const = jnp.ones((1, 17, 8))
  np.testing.assert_allclose(common.resample_posemb(const, (4, 4), (7, 5)), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="prefix"):
    common.resample_posemb(posemb, (5, 5), (4, 4))


def test_model_runs_other_resolutions_by_resampling():
  model = _tiny()
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
  logits, out = model.apply(variables, jnp.ones((2, 48, 64, 3)), return_intermediates=True)
  assert logits.shape == (2, 5) and out["intermediates"]["attn"].shape[-1] == 1 + 6 * 8


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _tiny(dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
  logits, _ = model.apply(variables, x)
  ref, _ = _tiny().apply(variables, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, atol=0.15)


def test_parameters_carry_logical_axes():
  model = _tiny(name="crate_alpha")
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
  specs = nn.get_partition_spec(variables)["params"]["encoder"]["layer_0"]
  assert tuple(specs["mssa"]["proj"]) == ("embed", "heads", "head_dim")
  assert tuple(specs["odl"]["D"]) == ("embed", "dict")


@pytest.mark.parametrize(
  "shape,dtype,message",
  [
    ((2, 16, 16, 1), np.float32, "convert grayscale or RGBA images to RGB"),
    ((2, 16, 16, 4), np.float32, "convert grayscale or RGBA images to RGB"),
    ((16, 16, 3), np.float32, r"add a batch axis, images\[None\]"),
    ((2, 3, 16, 16), np.float32, r"looks like NCHW: transpose with images.transpose\(0, 2, 3, 1\)"),
    ((2, 16, 16, 3), np.uint8, "takes normalised float images; got uint8"),
    ((2, 18, 18, 3), np.float32, r"not divisible by the patch size \(8, 8\)"),
  ],
)
@pytest.mark.parametrize("name", ["crate", "vit", "crate_mae"])
def test_images_of_the_wrong_kind_are_one_clear_error(name, shape, dtype, message):
  kwargs = dict(width=16, depth=1, heads=2, patch_size=8, image_size=(16, 16))
  model = get_model(name, **kwargs)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), np.zeros(shape, dtype))
