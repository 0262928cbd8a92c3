"""Published checkpoints in and out: formats, containers, inference of sizes, round trips, errors."""

import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import convert
from crate_jax.models import get_model


def _golden_state(golden_dir, name="crate_tiny.npz"):
  golden = np.load(golden_dir / name)
  return golden, {k[len("param:") :]: golden[k] for k in golden.files if k.startswith("param:")}


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_golden_through_the_official_pth(golden_dir):
  pytest.importorskip("torch")
  golden, _ = _golden_state(golden_dir)
  model, variables = convert.load_published(
    str(golden_dir / "crate_tiny_official_format.pth"), heads=4
  )
  logits, _ = model.apply(variables, jnp.asarray(golden["input_nchw"]).transpose(0, 2, 3, 1))
  assert _rel(logits, golden["logits"]) < 1e-5


@pytest.mark.parametrize("container", ["bare", "state_dict_module", "model"])
@pytest.mark.parametrize("ext", [".npz", ".safetensors", ".pth"])
def test_containers_and_formats(golden_dir, tmp_path, container, ext):
  golden, state = _golden_state(golden_dir)
  path = tmp_path / f"ckpt{ext}"
  if ext == ".pth":
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    obj = {
      "bare": tensors,
      "state_dict_module": {
        "epoch": 3,
        "arch": "crate_tiny",
        "best_acc1": torch.tensor(1.0),
        "state_dict": {"module." + k: v for k, v in tensors.items()},
      },
      "model": {"model": tensors, "scaler": {"scale": 1.0}},
    }[container]
    torch.save(obj, path)
  else:
    if container != "bare":
      state = {
        ("module." + k if container == "state_dict_module" else k): v for k, v in state.items()
      }
    convert_write = {
      ".npz": lambda p, s: np.savez(p, **s),
      ".safetensors": lambda p, s: __import__("safetensors.numpy").numpy.save_file(s, str(p)),
    }
    convert_write[ext](path, state)
  model, variables = convert.load_published(str(path), heads=4)
  logits, _ = model.apply(variables, jnp.asarray(golden["input_nchw"]).transpose(0, 2, 3, 1))
  assert _rel(logits, golden["logits"]) < 1e-5


def test_pth_needing_arbitrary_unpickling_is_refused(tmp_path):
  torch = pytest.importorskip("torch")

  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": subprocess.Popen}, path)
  with pytest.raises(convert.ConversionError, match="weights_only=True"):
    convert.load_published(str(path))


# Published-format checkpoints of other shapes, made by the published-code PyTorch model.
TORCH_SHAPES = [
  dict(image_size=(32, 24), patch_size=(8, 4), dim=48, depth=2, heads=3, dim_head=None, pool="cls"),
  dict(image_size=(28, 28), patch_size=14, dim=40, depth=3, heads=4, dim_head=6, pool="mean"),
  dict(image_size=64, patch_size=32, dim=64, depth=1, heads=2, dim_head=None, pool="cls"),
]


@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_published_torch_models_of_other_shapes(torch_reference, tmp_path, shape):
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  ref = torch_reference.CrateTorch(num_classes=7, **shape).eval()
  path = tmp_path / "model.pth"
  torch.save({"model": ref.state_dict()}, path)
  h, w = (shape["image_size"],) * 2 if isinstance(shape["image_size"], int) else shape["image_size"]
  images = torch.randn(3, 3, h, w)
  with torch.no_grad():
    expected = ref(images).double().numpy()
  overrides = dict(heads=shape["heads"], pool=shape["pool"])
  if isinstance(shape["patch_size"], tuple):  # Non-square: shapes cannot tell.
    overrides |= dict(patch_size=shape["patch_size"], image_size=shape["image_size"])
  model, variables = convert.load_published(str(path), **overrides)
  logits, _ = model.apply(variables, jnp.asarray(images.numpy()).transpose(0, 2, 3, 1))
  assert _rel(logits, expected) < 1e-5
  # And back: our export loads into the published model with strict names.
  out = tmp_path / "exported.safetensors"
  convert.export_published(model, variables["params"], str(out))
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  ref.load_state_dict(load_file(str(out)), strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(ref(images).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize(
  "name,kwargs",
  [
    (
      "crate",
      dict(
        width=24, depth=2, heads=3, dim_head=5, patch_size=(4, 8), image_size=(16, 24), pool="mean"
      ),
    ),
    ("crate", dict(width=48, depth=1, heads=4, patch_size=16, image_size=(48, 48))),
    (
      "crate_alpha",
      dict(width=32, depth=3, heads=2, dim_head=8, patch_size=(4, 8), image_size=(16, 32)),
    ),
    (
      "crate_alpha",
      dict(width=48, depth=2, heads=3, patch_size=8, image_size=(24, 24), expansion=2),
    ),
  ],
)
@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_round_trip_is_exact(tmp_path, name, kwargs, ext):
  model = get_model(name, num_classes=6, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, *kwargs["image_size"], 3))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  path = tmp_path / f"published{ext}"
  convert.export_published(model, params, str(path))
  non_square = kwargs["patch_size"] if isinstance(kwargs["patch_size"], tuple) else None
  overrides = dict(heads=kwargs["heads"], pool=kwargs.get("pool", "cls"))
  if non_square or kwargs["image_size"][0] != kwargs["image_size"][1]:
    overrides |= dict(patch_size=kwargs["patch_size"], image_size=kwargs["image_size"])
  loaded, variables = convert.load_published(str(path), **overrides)
  assert loaded.dims() == model.dims()
  assert jax.tree.all(
    jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables["params"], params)
  )
  np.testing.assert_array_equal(
    loaded.apply(variables, x)[0], model.apply({"params": params}, x)[0]
  )


def test_alpha_npz_with_optimizer_state_and_prefixes(golden_dir, tmp_path):
  golden, state = _golden_state(golden_dir, "crate_alpha_tiny.npz")
  with_opt = {"params/" + k: v for k, v in state.items()}
  with_opt |= {"opt/0/mu/" + k: np.zeros_like(v) for k, v in state.items()}
  with_opt["opt/1/count"] = np.array(12)
  np.savez(tmp_path / "alpha.npz", **with_opt)
  model, variables = convert.load_published(str(tmp_path / "alpha.npz"))
  assert _rel(model.apply(variables, jnp.asarray(golden["input_nhwc"]))[0], golden["logits"]) < 1e-5
  # Loading into scanned layers stacks them.
  scanned, svars = convert.load_published(str(tmp_path / "alpha.npz"), scan_layers=True)
  np.testing.assert_allclose(
    scanned.apply(svars, jnp.asarray(golden["input_nhwc"]))[0],
    model.apply(variables, jnp.asarray(golden["input_nhwc"]))[0],
    rtol=1e-5,
    atol=1e-6,
  )


def test_errors_name_the_problem(golden_dir, tmp_path):
  _, state = _golden_state(golden_dir)
  with pytest.raises(convert.ConversionError, match="pass heads"):
    convert.from_published(state)
  with pytest.raises(
    convert.ConversionError, match=r"heads=5 does not divide .*qkv.weight \(96, 96\)"
  ):
    convert.from_published(state, heads=5)
  bad = dict(state)
  bad["transformer.layers.1.1.fn.weight"] = np.zeros((96, 95), np.float32)
  with pytest.raises(
    convert.ConversionError,
    match=r"transformer.layers.1.1.fn.weight has shape \(96, 95\).*\(96, 96\)",
  ):
    convert.from_published(bad, heads=4)
  missing = {k: v for k, v in state.items() if k != "transformer.layers.2.0.norm.bias"}
  with pytest.raises(
    convert.ConversionError, match="Missing key 'transformer.layers.2.0.norm.bias'"
  ):
    convert.from_published(missing, heads=4)
  with pytest.raises(convert.ConversionError, match="image_size"):
    convert.from_published(state, heads=4, image_size=(32, 40))
  with pytest.raises(convert.ConversionError, match="cannot be overridden"):
    convert.from_published(state, heads=4, num_classes=3)
  with pytest.raises(convert.ConversionError, match="Not a published checkpoint of a known format"):
    convert.from_published({"foo": np.zeros(3)})
  with pytest.raises(convert.ConversionError, match="Unexpected keys"):
    convert.from_published(state | {"extra.weight": np.zeros(3)}, heads=4)
  (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(convert.ConversionError, match="is not a .npz file"):
    convert.load_published(str(tmp_path / "corrupt.npz"))
  (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(convert.ConversionError, match="not a readable safetensors"):
    convert.load_published(str(tmp_path / "corrupt.safetensors"))
  with pytest.raises(convert.ConversionError, match="No checkpoint"):
    convert.load_published(str(tmp_path / "absent.pth"))
  (tmp_path / "weights.txt").write_text("")
  with pytest.raises(convert.ConversionError, match="Unsupported checkpoint extension"):
    convert.load_published(str(tmp_path / "weights.txt"))


def test_command_line_round_trip(golden_dir, tmp_path):
  golden, state = _golden_state(golden_dir)
  np.savez(tmp_path / "pub.npz", **state)
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "crate_jax.convert", *args], capture_output=True, text=True, timeout=120
  )
  result = run(f"--input={tmp_path / 'pub.npz'}", f"--output={tmp_path / 'ours.npz'}", "--heads=4")
  assert result.returncode == 0, result.stderr
  assert "parameters" in result.stdout
  model, variables = convert.load_ours(str(tmp_path / "ours.npz"))
  assert (
    _rel(
      model.apply(variables, jnp.asarray(golden["input_nchw"]).transpose(0, 2, 3, 1))[0],
      golden["logits"],
    )
    < 1e-5
  )
  result = run(
    f"--input={tmp_path / 'ours.npz'}",
    f"--output={tmp_path / 'back.safetensors'}",
    "--to=published",
  )
  assert result.returncode == 0, result.stderr
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  back = load_file(str(tmp_path / "back.safetensors"))
  assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
  result = run(f"--input={tmp_path / 'pub.npz'}", f"--output={tmp_path / 'x.npz'}")
  assert (
    result.returncode == 2 and "pass heads=K" in result.stderr and "Traceback" not in result.stderr
  )


@pytest.mark.parametrize(
  "args,message",
  [
    (["--output=OUT/missing/o.npz"], "the directory .* does not exist"),
    (["--output=OUT/o3.pth"], "--to=ours writes a .npz file"),
    (["--output=OUT/o.npz", "--image_size=33,33"], r"not divisible by the patch size"),
    (["--output=OUT/o.npz", "--image_size=33,x"], "is not H,W"),
    (["--input=TEXT.npz", "--output=OUT/o.npz"], "is not a .npz file"),
    (["--input=TEXT.pth", "--output=OUT/o.npz"], "is not a PyTorch checkpoint"),
  ],
)
def test_command_line_errors_are_one_line(golden_dir, tmp_path, args, message):
  _, state = _golden_state(golden_dir)
  np.savez(tmp_path / "pub.npz", **state)
  (tmp_path / "text.npz").write_text("not an archive")
  (tmp_path / "text.pth").write_text("not a checkpoint")
  args = [a.replace("OUT", str(tmp_path)).replace("TEXT", str(tmp_path / "text")) for a in args]
  if not any(a.startswith("--input") for a in args):
    args.append(f"--input={tmp_path / 'pub.npz'}")
  result = subprocess.run(
    [sys.executable, "-m", "crate_jax.convert", "--heads=4", *args],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert re.search(message, result.stderr.strip().splitlines()[-1])
  assert not (tmp_path / "o3.pth").exists() and not (tmp_path / "o3.pth.npz").exists()
