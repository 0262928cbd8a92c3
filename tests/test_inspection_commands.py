"""`python -m crate_jax.visualize` and `python -m crate_jax.evaluate` on a trained workdir and
on a published-format file: the figures and metrics they write, and their one-line errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import demo
from crate_jax import convert
from crate_jax import pretrained
from crate_jax import train
from crate_jax.data import crate_shapes
from crate_jax.models import get_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = crate_shapes.CrateShapesConfig(name="cli_tiny", image_size=16, train_size=64, test_size=24)
ARCH = "width=16,depth=2,heads=2,patch=4"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
  """A tiny CRATE trained for 2 steps on a tiny crate_shapes."""
  config = demo.get_config(f"{ARCH},steps=2")
  config.input.update(
    dataset=f"crate_shapes/{TINY.name}",
    data_dir=str(data_dir),
    image_size=16,
    global_batch_size=8,
    eval_batch_size=8,
    num_threads=1,
  )
  config.schedule.warmup_steps = 1
  config.evals.rate_reduction.num_images = 4
  path = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(config, str(path))
  return path, data_dir


def _run(module, *args):
  return subprocess.run(
    [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


def test_visualize_draws_every_figure_from_a_workdir_and_image_files(workdir, tmp_path):
  path, data_dir = workdir
  for i in range(3):
    Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
  for images in (f"tfds:crate_shapes/{TINY.name}", str(tmp_path)):
    out = tmp_path / "figures"
    result = _run(
      "crate_jax.visualize",
      f"--checkpoint={path}",
      f"--images={images}",
      f"--data_dir={data_dir}",
      f"--outdir={out}",
      "--num_images=3",
      "--layers=0,-1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = {
      "attention_layer1",
      "attention_layer2",
      "heads_layer1",
      "heads_layer2",
      "pca",
      "maskcut",
      "rate_reduction",
    }
    assert {p.stem for p in out.glob("*.png")} == expected
    for png in out.glob("*.png"):
      with Image.open(png) as image:
        assert np.asarray(image).std() > 5, png  # Drawn, not blank.


@pytest.mark.parametrize(
  "args,message",
  [
    (["--checkpoint=/nonexistent/run", "--images=a.png"], "does not exist"),
    (["--checkpoint=WORKDIR", "--images=/nonexistent.png"], "no such file"),
    (["--checkpoint=WORKDIR", "--images=NOTANIMAGE"], "Cannot read image"),
    (["--checkpoint=WORKDIR_OTHER", "--images=NOTANIMAGE"], "does not match its config.json"),
  ],
)
def test_visualize_errors_are_one_line(workdir, tmp_path, args, message):
  path, _ = workdir
  (tmp_path / "text.png").write_text("not an image")
  other = tmp_path / "other"
  other.mkdir()
  config = json.loads((path / "config.json").read_text())
  config["model"]["width"] = 32
  (other / "config.json").write_text(json.dumps(config))
  (other / "checkpoints").symlink_to(path / "checkpoints")
  args = [
    a.replace("WORKDIR_OTHER", str(other))
    .replace("WORKDIR", str(path))
    .replace("NOTANIMAGE", str(tmp_path / "text.png"))
    for a in args
  ]
  result = _run("crate_jax.visualize", *args, f"--outdir={tmp_path / 'out'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert message in result.stderr.strip().splitlines()[-1]


def test_evaluate_scores_our_workdir_and_a_published_file(workdir, tmp_path):
  path, data_dir = workdir
  common_args = [
    f"--config=configs/demo.py:{ARCH}",
    f"--config.input.dataset=crate_shapes/{TINY.name}",
    f"--config.input.data_dir={data_dir}",
    "--config.input.image_size=16",
    "--config.input.eval_batch_size=8",
    "--evals=eval,segmentation",
  ]
  ours = _run(
    "crate_jax.evaluate", *common_args, f"--checkpoint={path}", f"--output={tmp_path / 'a.json'}"
  )
  assert ours.returncode == 0, ours.stderr[-2000:]
  metrics = json.loads((tmp_path / "a.json").read_text())
  assert metrics["eval"]["num_examples"] == TINY.test_size
  assert 0.0 <= metrics["segmentation"]["pca/auroc"] <= 1.0
  # The same parameters exported under the published names give the same metrics.
  config = demo.get_config(ARCH)
  with config.unlocked():
    config.init.checkpoint = str(path)
  params = pretrained.load(config)
  model = get_model(
    "crate", width=16, depth=2, heads=2, patch_size=4, image_size=16, num_classes=10
  )
  convert.export_published(model, params, str(tmp_path / "published.safetensors"))
  published = _run(
    "crate_jax.evaluate",
    *common_args,
    f"--checkpoint={tmp_path / 'published.safetensors'}",
    "--heads=2",
    f"--output={tmp_path / 'b.json'}",
  )
  assert published.returncode == 0, published.stderr[-2000:]
  assert json.loads((tmp_path / "b.json").read_text())["eval"] == pytest.approx(metrics["eval"])
