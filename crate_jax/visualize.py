r"""Draws what a model attends to: `python -m crate_jax.visualize`.

    python -m crate_jax.visualize --checkpoint=/tmp/crate_demo --images=tfds:crate_shapes/32 \
        --outdir=/tmp/crate_demo/figures
    python -m crate_jax.visualize --checkpoint=crate_base.pth --images=photos/ --outdir=figs

`--checkpoint`: one of our workdirs (its latest checkpoint; the config is its
`config.json`), a checkpoint step directory, or a published checkpoint file read by
`crate_jax.convert` (`--heads` where its shapes cannot tell). `--images`: image files
(comma-separated), a folder of them, or `tfds:<dataset>[:<split>]` (the first
`--num_images`, from `--data_dir`). Writes into `--outdir`:

  attention_layer<l>.png   every head's CLS attention map over each image, and their mean
  heads_layer<l>.png       one row per head, its map on every image (the papers' figure)
  pca.png                  PCA foreground and part colours of the last layer's key features
  maskcut.png              MaskCut masks of the last layer's key features
  rate_reduction.png       compression and sparsity per layer on these images (MSSA models)
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from crate_jax import config_utils
from crate_jax import convert
from crate_jax import pretrained
from crate_jax import train_state
from crate_jax.data import pipeline
from crate_jax.data import preprocess
from crate_jax.evaluators import rate_reduction
from crate_jax.interpretability import figures
from crate_jax.interpretability import maps
from crate_jax.interpretability import segmentation
from crate_jax.models import common
from crate_jax.models import get_model

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, step directory or published file.")
_IMAGES = flags.DEFINE_string("images", None, "Image files, a folder, or tfds:<dataset>[:<split>].")
_OUTDIR = flags.DEFINE_string("outdir", None, "Where to write the PNGs.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images drawn (at most).")
_LAYERS = flags.DEFINE_list(
  "layers", ["-1"], "Layers whose attention is drawn (negative: from the last)."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input side (default: the model's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory for tfds: images.")
_HEADS = flags.DEFINE_integer(
  "heads", None, "Heads of a published model, where shapes cannot tell."
)
flags.mark_flags_as_required(["checkpoint", "images", "outdir"])

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _workdir_config(path: pathlib.Path) -> ml_collections.ConfigDict:
  for candidate in (path, path.parent.parent):  # A workdir, or workdir/checkpoints/<step>.
    if (candidate / "config.json").exists():
      return ml_collections.ConfigDict(json.loads((candidate / "config.json").read_text()))
  raise ValueError(f"{path} holds no config.json (is it a crate_jax workdir or step directory?).")


def load_model(checkpoint: str, heads: int | None = None) -> tuple[Any, Any, tuple, tuple]:
  """`(model, params, mean, std)`: the model, its parameters and its input normalisation."""
  path = pathlib.Path(checkpoint)
  if not path.exists():
    raise ValueError(f"--checkpoint={checkpoint!r} does not exist.")
  if path.is_file():
    model, variables = convert.load_published(str(path), **({"heads": heads} if heads else {}))
    return model, variables["params"], preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD
  config = _workdir_config(path)
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  with config.unlocked():
    config.init.checkpoint, config.init.format = str(path), "workdir"
  params = pretrained.load(config)
  expected = flax.traverse_util.flatten_dict(
    train_state.abstract_params(model, config.input.image_size)
  )
  found = flax.traverse_util.flatten_dict(params)
  wrong = [
    f"{'/'.join(k)}: {np.shape(found.get(k))} vs {v.shape}"
    for k, v in expected.items()
    if k not in found or np.shape(found[k]) != v.shape
  ]
  if wrong:
    raise ValueError(f"{checkpoint} does not match its config.json's model: {wrong[:5]}.")
  return model, params, tuple(config.input.mean), tuple(config.input.std)


def _read_image(path: pathlib.Path, size: int) -> np.ndarray:
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except OSError as e:
    raise ValueError(f"Cannot read image {str(path)!r}: {e}") from e
  scale = size / min(image.size)
  w, h = (max(size, round(s * scale)) for s in image.size)
  image = image.resize((w, h), Image.BICUBIC)
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0


def load_images(spec: str, num: int, size: int, data_dir: str | None = None) -> np.ndarray:
  """`(B, size, size, 3)` images in [0, 1] from files, a folder or `tfds:<dataset>[:<split>]`."""
  if spec.startswith("tfds:"):
    dataset, _, split = spec[len("tfds:") :].partition(":")
    config = pipeline.default_input_config()
    config.update(
      dataset=dataset,
      eval_split=split or "test",
      image_size=size,
      eval_batch_size=num,
      data_dir=data_dir,
      mean=(0.0,) * 3,
      std=(1.0,) * 3,
    )
    pipeline.prepare_dataset(config)
    batch = next(iter(pipeline.make_eval_iterator(config, process_index=0, process_count=1)))
    return np.asarray(batch["image"][batch["mask"] > 0][:num])
  paths = [pathlib.Path(p) for p in spec.split(",")]
  if len(paths) == 1 and paths[0].is_dir():
    paths = sorted(p for p in paths[0].iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
      raise ValueError(f"--images={spec!r} is a folder without images ({_IMAGE_SUFFIXES}).")
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise ValueError(f"--images: no such file(s) {missing[:5]}.")
  return np.stack([_read_image(p, size) for p in paths[:num]])


def draw(model, params, images: np.ndarray, mean, std, outdir: str, layers: list[int]) -> list[str]:
  """Writes the module doc's figures for `images` in [0, 1]; returns their paths."""
  os.makedirs(outdir, exist_ok=True)
  inputs = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  patch = common.pair(model.dims()["patch_size"])
  grid = common.grid_size(images.shape[1:3], patch)
  encode = jax.jit(
    lambda p, x: model.apply({"params": p}, x, method="encode", return_intermediates=True)
  )
  _, out = jax.device_get(encode(params, jnp.asarray(inputs)))
  inter, name = out["intermediates"], model.FAMILY
  written = []
  for layer in layers:
    cls_maps = np.asarray(maps.cls_attention_maps(inter["attn"][layer], grid))
    number = layer % inter["attn"].shape[0] + 1
    for kind, fn in (("attention", figures.attention_grid), ("heads", figures.head_montage)):
      path = os.path.join(outdir, f"{kind}_layer{number}.png")
      fn(images, cls_maps, patch, title=f"{name}, layer {number}", path=path)
      written.append(path)
  keys = np.asarray(maps.patch_tokens(maps.key_features(inter["head_proj"][-1])))
  foreground, _ = segmentation.pca_foreground(keys, grid)
  parts = np.stack([segmentation.pca_parts(k, f) for k, f in zip(keys, foreground)])
  path = os.path.join(outdir, "pca.png")
  figures.segmentation_grid(
    images,
    {"PCA foreground": foreground, "PCA parts": parts},
    patch,
    title=f"{name}, last layer",
    path=path,
  )
  written.append(path)
  cuts = [segmentation.maskcut(k, grid).masks for k in keys]
  labels = np.stack([np.max(c * np.arange(1, len(c) + 1)[:, None, None], axis=0) for c in cuts])
  path = os.path.join(outdir, "maskcut.png")
  figures.segmentation_grid(
    images, {"MaskCut": labels}, patch, title=f"{name}, last layer", path=path
  )
  written.append(path)
  if model.HAS_SUBSPACES:
    measure = rate_reduction.LayerwiseRateReduction(model, inputs)
    measure.run(params, step=0)
    path = os.path.join(outdir, "rate_reduction.png")
    measure.plot(path, title=name)
    written.append(path)
  return written


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  try:
    model, params, mean, std = load_model(_CHECKPOINT.value, _HEADS.value)
    size = _IMAGE_SIZE.value or common.pair(model.image_size)[0]
    images = load_images(_IMAGES.value, _NUM_IMAGES.value, size, _DATA_DIR.value)
    layers = [int(v) for v in _LAYERS.value]
    for path in draw(model, params, images, mean, std, _OUTDIR.value, layers):
      print(path)
  except (ValueError, convert.ConversionError, pipeline.DatasetNotPreparedError) as e:
    sys.exit(f"FATAL {type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main)
