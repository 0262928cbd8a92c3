r"""Input pipeline throughput per CPU core.

Part 1 times ImageNet-style training preprocessing (JPEG decode, random-resized
crop, flip, normalise) stage by stage on synthetic photo-like JPEGs of
ImageNet's typical size (350-500 x 300-400, quality 90, ~75 kB), with and
without PIL's reduced-size JPEG decoding (`draft`), then the pipeline's own
transforms end to end. Part 2 runs the whole grain pipeline on crate_shapes/32.
Single-threaded; images/s is per core (CPU time of this process, best of 5).

    python benchmarks/input_pipeline.py [--num_images=300] [--num_batches=40]

Recorded numbers: benchmarks/README.md. `draft` engages only for crops at least twice the
output size, so rarely for 224 px crops of ImageNet-sized photos.
"""

import io
import math
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from crate_jax import data
from crate_jax.data import crate_shapes
from crate_jax.data import preprocess

_NUM_IMAGES = flags.DEFINE_integer("num_images", 300, "Synthetic JPEGs to time.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 40, "crate_shapes batches to time.")


def synthetic_jpegs(count: int, rng: np.random.Generator) -> list[bytes]:
  """Photo-like JPEGs (1/f noise over several octaves) of ~400x350, quality 90."""
  jpegs = []
  for _ in range(count):
    width, height = int(rng.integers(350, 500)), int(rng.integers(300, 400))
    pixels = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 60), (16, 30), (64, 15), (256, 8)):
      noise = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), np.uint8))
      pixels += (
        amplitude
        / 128
        * (np.asarray(noise.resize((width, height), Image.Resampling.BICUBIC), np.float32) - 128)
      )
    pixels += 128 + rng.normal(0, 16, pixels.shape)  # Sensor-like noise: ~75 kB files.
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    jpegs.append(buffer.getvalue())
  return jpegs


def _cpu_seconds(fn, items, repeats: int = 5) -> tuple[float, list]:
  """CPU seconds per item of `[fn(item) for item in items]`, best of `repeats`."""
  best = float("inf")
  for _ in range(repeats):
    start = time.process_time()
    outputs = [fn(item) for item in items]
    best = min(best, (time.process_time() - start) / len(items))
  return best, outputs


def time_train_stages(jpegs: list[bytes], *, draft: bool, size: int = 224) -> dict[str, float]:
  """Seconds per image of each stage of 224 px random-resized-crop training,
  and the fraction of JPEGs that `draft` let the decoder shrink."""
  rng = np.random.default_rng(0)
  boxes = [
    preprocess.sample_crop_box(
      *Image.open(io.BytesIO(jpeg)).size, rng, min_area=0.08, crop="random_resized"
    )
    for jpeg in jpegs
  ]

  def decode(item):
    jpeg, box = item
    image = Image.open(io.BytesIO(jpeg))
    original_size = image.size
    if draft:  # As `crop_and_resize` does: stop at 1/2, 1/4, 1/8 scale above `size`.
      image.draft(
        "RGB",
        (
          math.ceil(original_size[0] * size / (box[2] - box[0])),
          math.ceil(original_size[1] * size / (box[3] - box[1])),
        ),
      )
    image.load()
    scale_x, scale_y = image.size[0] / original_size[0], image.size[1] / original_size[1]
    return image, (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)

  def crop_and_resize(item):
    image, box = item
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)

  def flip_and_normalize(image):
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return preprocess.normalize(
      np.asarray(flipped), preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD
    )

  decode_s, decoded = _cpu_seconds(decode, list(zip(jpegs, boxes)))
  resize_s, resized = _cpu_seconds(crop_and_resize, decoded)
  normalize_s, _ = _cpu_seconds(flip_and_normalize, resized)
  reduced = np.mean(
    [image.size != Image.open(io.BytesIO(jpeg)).size for (image, _), jpeg in zip(decoded, jpegs)]
  )
  return {"decode": decode_s, "crop+resize": resize_s, "flip+normalise": normalize_s}, reduced


def time_train_preprocess(jpegs: list[bytes], size: int = 224) -> float:
  """Seconds per image of the pipeline's own per-example and batch transforms."""
  example_preprocess = preprocess.TrainExamplePreprocess(
    image_size=size, crop="random_resized", crop_min_area=0.08
  )
  batch_preprocess = preprocess.TrainBatchPreprocess(num_classes=1000)
  rng = np.random.default_rng(0)

  def preprocess_batch(batch_jpegs):
    examples = [example_preprocess({"image": jpeg, "label": 0}, rng) for jpeg in batch_jpegs]
    batch_preprocess(
      {
        "image": np.stack([e["image"] for e in examples]),
        "label": np.array([e["label"] for e in examples]),
      },
      rng,
    )

  batches = [jpegs[i : i + 32] for i in range(0, len(jpegs), 32)]
  return _cpu_seconds(preprocess_batch, batches)[0] * len(batches) / len(jpegs)


def time_crate_shapes_pipeline(num_batches: int, batch_size: int = 256) -> float:
  """Seconds per image of the full grain pipeline on crate_shapes/32, in-process."""
  with tempfile.TemporaryDirectory() as data_dir:
    crate_shapes.build(
      crate_shapes.CrateShapesConfig(name="bench", train_size=4000, test_size=10), data_dir
    )
    config = data.default_input_config()
    config.update(
      dataset="crate_shapes/bench", data_dir=data_dir, global_batch_size=batch_size, num_threads=0
    )
    iterator = data.make_train_iterator(config, seed=0)
    next(iterator)  # Warm up.
    seconds, _ = _cpu_seconds(lambda _: next(iterator), range(num_batches))
    return seconds / batch_size


def main(argv):
  del argv
  jpegs = synthetic_jpegs(_NUM_IMAGES.value, np.random.default_rng(0))
  print(f"{len(jpegs)} synthetic JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB")
  for size in (224, 112):
    print(f"{size} px random-resized crop, ms per image on one core:")
    print(f"  {'':16}{'decode':>10}{'crop+resize':>13}{'flip+norm':>11}{'total':>9}{'img/s':>8}")
    for draft in (False, True):
      stages, reduced = time_train_stages(jpegs, draft=draft, size=size)
      total = sum(stages.values())
      row = "".join(f"{1e3 * s:>{w}.2f}" for s, w in zip(stages.values(), (10, 13, 11)))
      print(
        f"  {'draft decode' if draft else 'full decode':16}{row}{1e3 * total:>9.2f}"
        f"{1 / total:>8.0f}   ({100 * reduced:.0f}% decoded at reduced size)"
      )
  seconds = time_train_preprocess(jpegs)
  print(
    f"  TrainExamplePreprocess + TrainBatchPreprocess: {1e3 * seconds:.2f} ms, "
    f"{1 / seconds:.0f} img/s per core"
  )
  seconds = time_crate_shapes_pipeline(_NUM_BATCHES.value)
  print(
    f"crate_shapes/32 grain pipeline, default config (read, shuffle, flip, batch, normalise): "
    f"{1e6 * seconds:.0f} us, {1 / seconds:.0f} img/s per core"
  )


if __name__ == "__main__":
  app.run(main)
