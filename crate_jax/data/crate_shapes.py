"""`crate_shapes`: the embedded synthetic dataset, generated locally in seconds.

Every image shows one object of `SHAPE_NAMES` (its class) with a random
colour, size (circumscribed circle 60-90% of the image side), position and
rotation (+-15 degrees by default), drawn over a cluttered background: a colour
gradient, low-frequency colour noise, stripes and thin half-transparent
scribbles (never whole shapes), plus pixel noise on top. Each example also
carries the object's ground-truth foreground mask. The difficulty is tuned so
that a small CRATE learns the classes in minutes on a CPU; free rotation and
more scribbles make it much harder (`CrateShapesConfig`).

The dataset is a real tfds builder written in the array_record format without
TensorFlow, so the training pipeline reads it exactly like ImageNet:

    prepare('crate_shapes/32', data_dir)    # Builds it once (~20 s), then no-op.
    tfds.data_source('crate_shapes/32', split='train', data_dir=data_dir)

Registered configs: '32' (default), '64' and '224', named by resolution.
Other sizes and resolutions: `build(CrateShapesConfig(...), data_dir)`; tfds
then reads `crate_shapes/<config name>` from its files like any other config.

Features: `image` uint8[S, S, 3], `segmentation` uint8[S, S] (1 = object),
`label` (class index into `SHAPE_NAMES`). Images are stored as raw bytes
(`tfds.features.Tensor(encoding='bytes')`): they decode for free, while PNG of
noisy images would cost time for little space.
"""

import collections
from collections.abc import Callable
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SHAPE_NAMES = (
  "disk",
  "ring",
  "ellipse",
  "crescent",
  "heart",
  "triangle",
  "square",
  "star",
  "cross",
  "arrow",
)

_Coverage = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Object circumradius, as a fraction of the image side.
_RADIUS_RANGE = (0.3, 0.45)


def _regular_polygon(num_vertices: int, radii=(1.0,)) -> np.ndarray:
  """Vertices [V, 2] at evenly spaced angles, cycling through `radii`."""
  angles = np.pi / 2 + 2 * np.pi * np.arange(num_vertices) / num_vertices
  r = np.resize(np.asarray(radii, np.float32), num_vertices)
  return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=-1)


def _polygon(vertices: np.ndarray) -> _Coverage:
  """Even-odd (crossing number) point-in-polygon test, vectorised over points."""

  def inside(u, v):
    result = np.zeros(u.shape, bool)
    for (u0, v0), (u1, v1) in zip(vertices, np.roll(vertices, -1, axis=0)):
      if v0 == v1:
        continue  # A horizontal edge is never crossed by a horizontal ray.
      crosses = (v0 > v) != (v1 > v)
      result ^= crosses & (u < u0 + (u1 - u0) * (v - v0) / (v1 - v0))
    return result

  return inside


def _heart(u, v):
  x, y = 1.15 * u, 0.2 - 1.15 * v
  return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


# Inside tests in the object frame, where the shape's circumradius is ~1.
_SHAPES: dict[str, _Coverage] = {
  "disk": lambda u, v: u * u + v * v <= 1,
  "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55**2),
  "ellipse": lambda u, v: u * u + (v / 0.5) ** 2 <= 1,
  "crescent": lambda u, v: (u * u + v * v <= 1) & ((u - 0.45) ** 2 + v * v > 0.8**2),
  "heart": _heart,
  "triangle": _polygon(_regular_polygon(3)),
  "square": _polygon(np.array([(1, 1), (-1, 1), (-1, -1), (1, -1)]) / np.sqrt(2)),
  "star": _polygon(_regular_polygon(10, radii=(1.0, 0.5))),
  "cross": _polygon(
    np.array(
      [
        (0.3, 1),
        (0.3, 0.3),
        (1, 0.3),
        (1, -0.3),
        (0.3, -0.3),
        (0.3, -1),
        (-0.3, -1),
        (-0.3, -0.3),
        (-1, -0.3),
        (-1, 0.3),
        (-0.3, 0.3),
        (-0.3, 1),
      ]
    )
  ),
  "arrow": _polygon(
    np.array(
      [
        (-1, 0.2),
        (0.1, 0.2),
        (0.1, 0.55),
        (1, 0),
        (0.1, -0.55),
        (0.1, -0.2),
        (-1, -0.2),
      ]
    )
  ),
}
assert tuple(_SHAPES) == SHAPE_NAMES


def _uniform(rng, low, high, n, *trailing):
  return rng.uniform(low, high, (n, *trailing)).astype(np.float32)


def _bilinear_matrix(size: int, grid: int) -> np.ndarray:
  """[size, grid] matrix that linearly interpolates `grid` knots to `size` pixels."""
  position = np.linspace(0, grid - 1, size)
  return np.maximum(0, 1 - np.abs(position[:, None] - np.arange(grid)[None]))


def supersampling(image_size: int) -> int:
  """Anti-aliasing sub-samples per axis when rendering images of side `image_size`."""
  return max(1, min(2, 128 // image_size))


def background(rng: np.random.Generator, n: int, size: int, num_scribbles: int) -> np.ndarray:
  """Cluttered backgrounds, float32[n, size, size, 3] in [0, 1] (shared with crate_scenes)."""
  y, x = (np.mgrid[:size, :size].astype(np.float32) + 0.5) / size
  # Linear gradient between two random colours.
  angle = _uniform(rng, 0, 2 * np.pi, n, 1, 1)
  t = 0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)
  start, end = _uniform(rng, 0, 1, n, 1, 1, 3), _uniform(rng, 0, 1, n, 1, 1, 3)
  image = start + (end - start) * np.clip(t, 0, 1)[..., None]
  # Low-frequency colour noise: a random 5x5 grid, bilinearly upsampled.
  upsample = _bilinear_matrix(size, 5).astype(np.float32)
  knots = _uniform(rng, -0.25, 0.25, n, 5, 5, 3)
  image += np.einsum("yi,nijc,xj->nyxc", upsample, knots, upsample, optimize=True)
  # Stripes of random colour, frequency, orientation and phase.
  angle = _uniform(rng, 0, np.pi, n, 1, 1)
  cycles = _uniform(rng, 2, 6, n, 1, 1)
  phase = _uniform(rng, 0, 2 * np.pi, n, 1, 1)
  wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
  strength = _uniform(rng, 0, 0.4, n, 1, 1, 1) * (rng.random((n, 1, 1, 1)) < 0.6)
  stripe_colour = _uniform(rng, 0, 1, n, 1, 1, 3)
  image += strength * (0.5 + 0.5 * wave[..., None]) * (stripe_colour - image)
  # Scribbles: thin, half-transparent line segments in random colours.
  for _ in range(num_scribbles):
    p0, p1 = _uniform(rng, 0, 1, n, 2, 1, 1), _uniform(rng, 0, 1, n, 2, 1, 1)
    d = p1 - p0
    along = ((x - p0[:, 0]) * d[:, 0] + (y - p0[:, 1]) * d[:, 1]) / ((d * d).sum(1) + 1e-6)
    along = np.clip(along, 0, 1)
    distance = np.hypot(x - p0[:, 0] - along * d[:, 0], y - p0[:, 1] - along * d[:, 1])
    width = _uniform(rng, 0.5, 1.5, n, 1, 1) / size + 0.01
    opacity = _uniform(rng, 0.3, 0.6, n, 1, 1)
    ink = opacity * np.clip((width - distance) * size + 0.5, 0, 1)
    image += ink[..., None] * (_uniform(rng, 0, 1, n, 1, 1, 3) - image)
  return np.clip(image, 0, 1)


def render(
  labels: np.ndarray,
  image_size: int,
  rng: np.random.Generator,
  *,
  max_rotation_degrees: float = 15.0,
  num_scribbles: int = 4,
):
  """Draws one object of class `labels[i]` per image over a cluttered background.

  Args:
    labels: int[N] indices into `SHAPE_NAMES`.
    image_size: side S of the square images.
    rng: source of all randomness.
    max_rotation_degrees: objects turn by a uniform angle in +-this.
    num_scribbles: line segments drawn over each background.

  Returns:
    (images uint8[N, S, S, 3], masks uint8[N, S, S]); a mask is 1 where the
    object covers at least half of the pixel.
  """
  n, size = len(labels), image_size
  supersample = supersampling(size)
  radius = _uniform(rng, *_RADIUS_RANGE, n, 1, 1) * size
  centre = radius[..., None] + _uniform(rng, 0, 1, n, 1, 1, 2) * (size - 2 * radius[..., None])
  max_rotation = np.deg2rad(max_rotation_degrees)
  angle = _uniform(rng, -max_rotation, max_rotation, n, 1, 1)
  fine = (np.arange(size * supersample, dtype=np.float32) + 0.5) / supersample
  dy, dx = fine[None, :, None] - centre[..., 1], fine[None, None, :] - centre[..., 0]
  u = (np.cos(angle) * dx + np.sin(angle) * dy) / radius
  v = (np.cos(angle) * dy - np.sin(angle) * dx) / radius
  inside = np.zeros(u.shape, bool)
  for label, shape_name in enumerate(SHAPE_NAMES):
    selected = labels == label
    inside[selected] = _SHAPES[shape_name](u[selected], v[selected])
  hits = inside.reshape(n, size, supersample, size, supersample).sum((2, 4), dtype=np.uint8)
  coverage = hits[..., None].astype(np.float32) / supersample**2

  backdrop = background(rng, n, size, num_scribbles)
  # The object colour must stand out from the background it covers.
  covered = (backdrop * coverage).sum((1, 2)) / coverage.sum((1, 2))
  colour = _uniform(rng, 0, 1, n, 3)
  too_close = np.linalg.norm(colour - covered, axis=-1, keepdims=True) < 0.5
  colour = np.where(too_close, (covered + 0.5) % 1.0, colour)
  image = backdrop + coverage * (colour[:, None, None] - backdrop)
  image += rng.normal(0, 0.03, image.shape).astype(np.float32)
  images = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  return images, (coverage[..., 0] >= 0.5).astype(np.uint8)


@dataclasses.dataclass(eq=False)
class CrateShapesConfig(tfds.core.BuilderConfig):
  """A variant of `crate_shapes`: resolution, split sizes and difficulty.

  Attributes:
    image_size: side of the square images, in pixels.
    train_size: number of training examples.
    test_size: number of test examples.
    max_rotation_degrees: objects turn by a uniform angle in +-this; 180 for
      any orientation (much harder to learn: see docs/data.md).
    num_scribbles: line segments in each background (the hardest clutter).
    seed: the data are a deterministic function of the seed and the fields above.
  """

  image_size: int = 32
  train_size: int = 20_000
  test_size: int = 2_000
  max_rotation_degrees: float = 15.0
  num_scribbles: int = 4
  seed: int = 0


class CrateShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes on cluttered backgrounds, with foreground masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    CrateShapesConfig(name="32", image_size=32),
    CrateShapesConfig(name="64", image_size=64),
    CrateShapesConfig(name="224", image_size=224, train_size=5_000, test_size=1_000),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="bytes"),
          "segmentation": tfds.features.Tensor(
            shape=(size, size), dtype=np.uint8, encoding="bytes"
          ),
          "label": tfds.features.ClassLabel(names=SHAPE_NAMES),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
      "train": self._generate_examples(config.train_size, split_id=0),
      "test": self._generate_examples(config.test_size, split_id=1),
    }

  def _generate_examples(self, num_examples: int, split_id: int):
    config = self.builder_config
    labels = np.random.default_rng([config.seed, split_id]).permutation(
      np.arange(num_examples) % len(SHAPE_NAMES)
    )
    chunk = chunk_size(config.image_size)

    def render_chunk(start):
      rng = np.random.default_rng([config.seed, split_id, start])
      images, masks = render(
        labels[start : start + chunk],
        config.image_size,
        rng,
        max_rotation_degrees=config.max_rotation_degrees,
        num_scribbles=config.num_scribbles,
      )
      return {"image": images, "segmentation": masks, "label": labels[start : start + chunk]}

    yield from generate_in_chunks(render_chunk, num_examples, chunk)


# Pixels rendered at once (small images count as 128 x 128): bounds memory.
_CHUNK_PIXELS = 1 << 22


def chunk_size(image_size: int) -> int:
  """Images rendered at once at side `image_size`."""
  return max(1, _CHUNK_PIXELS // (max(image_size, 128) ** 2))


def generate_in_chunks(render_chunk: Callable[[int], dict], num_examples: int, chunk: int):
  """Yields `(index, example)` for `_generate_examples` from chunks rendered in threads.

  Args:
    render_chunk: maps `start` to a dict of per-feature arrays for examples
      `start` up to `start + chunk` (the same keys every time).
    num_examples: examples in the split.
    chunk: examples per `render_chunk` call.
  """
  # NumPy releases the GIL, so threads render ahead while tfds serialises.
  chunks = _ordered_thread_map(
    lambda start: (start, render_chunk(start)), range(0, num_examples, chunk)
  )
  for start, features in chunks:
    for offset in range(len(next(iter(features.values())))):
      yield start + offset, {key: value[offset] for key, value in features.items()}


def _ordered_thread_map(fn, items, num_threads: int = os.cpu_count() or 1):
  """Yields `fn(item)` in order, computing at most `num_threads + 1` ahead."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) > num_threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


@contextlib.contextmanager
def _exclusive_lock(data_dir: epath.Path):
  """Holds an advisory lock on `data_dir` across processes (local disks only)."""
  data_dir.mkdir(parents=True, exist_ok=True)
  with open(data_dir / ".crate_shapes.lock", "a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> epath.Path:
  """`data_dir`, or tfds' default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return epath.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()


def build(config: CrateShapesConfig, data_dir: str | os.PathLike | None = None) -> CrateShapes:
  """Generates `crate_shapes/<config.name>` under `data_dir` unless present.

  Safe to call from several processes at once on a local `data_dir`: one
  builds, the others wait and then reuse its files. On a shared network
  `data_dir` without POSIX locks, build on one process first; or give every
  host a local `data_dir`: generation is deterministic, so all hosts agree.

  Args:
    config: which config to build; its name must not clash with a registered
      config of different content.
    data_dir: tfds data directory; None is the tfds default.

  Returns:
    The prepared builder.
  """
  return build_with(CrateShapes, config, data_dir)


def build_with(
  builder_class: type[tfds.core.GeneratorBasedBuilder],
  config: tfds.core.BuilderConfig,
  data_dir: str | os.PathLike | None = None,
) -> tfds.core.GeneratorBasedBuilder:
  """`build` for any builder class of this kind (crate_shapes, crate_scenes)."""
  data_dir = resolve_data_dir(data_dir)
  builder = builder_class(config=config, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    with _exclusive_lock(data_dir):
      builder.download_and_prepare(file_format="array_record")
  return builder


def prepare(name: str = "crate_shapes/32", data_dir: str | os.PathLike | None = None) -> None:
  """Builds the registered `crate_shapes` config `name` unless already built.

  Cheap when the data exist. Concurrency as in `build`.

  Args:
    name: 'crate_shapes' or 'crate_shapes/<config>' with a registered config.
    data_dir: tfds data directory; None is the tfds default.
  """
  prepare_with(CrateShapes, name, data_dir)


def prepare_with(
  builder_class: type[tfds.core.GeneratorBasedBuilder],
  name: str,
  data_dir: str | os.PathLike | None = None,
) -> None:
  """`prepare` for any builder class of this kind (crate_shapes, crate_scenes)."""
  dataset, _, config_name = name.partition("/")
  if dataset != builder_class.name:
    raise ValueError(f"Not a {builder_class.name} dataset: {name!r}.")
  configs = {config.name: config for config in builder_class.BUILDER_CONFIGS}
  if config_name and config_name not in configs:
    raise ValueError(
      f"Unknown config {name!r}; registered: {sorted(configs)}. Build other configs with "
      f"{builder_class.__module__}.build({type(configs[next(iter(configs))]).__name__}(...))."
    )
  build_with(builder_class, configs[config_name or builder_class.BUILDER_CONFIGS[0].name], data_dir)
