"""`crate_scenes`: synthetic scenes of compound objects, with object, instance and part masks.

A sibling of `crate_shapes` made to test emergent segmentation. In `crate_shapes`
one large, centred object fills each image, so a fixed map of where objects
usually are already separates them from the background; here every image shows
one to three objects of its class (`CLASS_NAMES`), each of a random size
(circumradius 20-40% of the image side by default) at a uniformly random
position, over the same cluttered backgrounds as `crate_shapes`. Objects may
reach past the border by up to 70% of their circumradius (their centre stays at
least 0.3 circumradii inside), which keeps the mean foreground map fairly flat:
see the baselines in docs/data.md.

Objects are compound: a class is an arrangement of parts whose types
(`PART_NAMES`) are mostly shared across classes (a house, a tree and a rocket are
all bars and triangles), so most classes differ by how their parts are arranged.
Every part type of an object gets its own random colour, far from the object's
other part colours and from the background under it; objects turn by up to +-15
degrees and are mirrored at random. Objects may overlap a little (centres at least 0.8
times the sum of their circumradii apart); smaller objects are drawn over
larger ones, so every object stays visible.

    prepare('crate_scenes/64', data_dir)    # Builds it once (~30 s), then no-op.
    tfds.data_source('crate_scenes/64', split='train', data_dir=data_dir)

Registered configs, named by resolution: '64' (default; 20,000 train and 2,000
test images) and '96' (15,000 and 2,000). Other variants:
`build(CrateScenesConfig(...), data_dir)`. Train with `num_classes=8`.

Features, stored as raw bytes like `crate_shapes`:
  image: uint8[S, S, 3].
  label: class index into `CLASS_NAMES`.
  segmentation: uint8[S, S], 1 where objects cover at least half of the pixel.
  instances: uint8[S, S], 0 background, else 1..num_objects (largest object first).
  parts: uint8[S, S], 0 background, else part type 1..len(PART_NAMES) (`PART_NAMES[id - 1]`).
  num_objects: number of objects (1..max_objects).
On every pixel segmentation == (instances > 0) == (parts > 0).
"""

import dataclasses
import math
import os

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from crate_jax.data import crate_shapes

PART_NAMES = ("disk", "bar", "triangle", "dome", "ring", "petal")

CLASS_NAMES = (
  "lollipop",
  "tree",
  "house",
  "snowman",
  "car",
  "key",
  "flower",
  "rocket",
)

# Inside tests of the part types in the part's frame (x right, y up), where
# the part spans about [-1, 1] on both axes.
_PART_SHAPES = {
  "disk": crate_shapes._SHAPES["disk"],
  "bar": lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= 1),
  "triangle": lambda u, v: (v >= -1) & (2 * np.abs(u) <= 1 - v),  # Apex up.
  "dome": lambda u, v: (v >= 0) & (u * u + v * v <= 1),  # Half disk, flat side down.
  "ring": crate_shapes._SHAPES["ring"],
  "petal": crate_shapes._SHAPES["disk"],  # An ellipse, as parts scale each axis.
}
assert tuple(_PART_SHAPES) == PART_NAMES


def _petal(angle_degrees: float) -> tuple:
  angle = math.radians(angle_degrees)
  return ("petal", 0.5 * math.cos(angle), 0.5 * math.sin(angle), 0.2, 0.38, angle_degrees - 90)


# Classes as parts drawn in order (later over earlier): (part type, centre x,
# centre y, half width, half height, rotation in degrees), x right and y up, in
# arbitrary units: `_normalised` fits each into the unit circle.
_CLASS_PARTS = {
  "lollipop": [("bar", 0, -0.45, 0.1, 0.55, 0), ("disk", 0, 0.5, 0.45, 0.45, 0)],
  "tree": [
    ("bar", 0, -0.72, 0.13, 0.25, 0),
    ("triangle", 0, -0.15, 0.6, 0.45, 0),
    ("triangle", 0, 0.4, 0.45, 0.4, 0),
  ],
  "house": [("bar", 0, -0.35, 0.55, 0.45, 0), ("triangle", 0, 0.4, 0.72, 0.3, 0)],
  "snowman": [
    ("disk", 0, -0.45, 0.5, 0.5, 0),
    ("disk", 0, 0.3, 0.36, 0.36, 0),
    ("disk", 0, 0.83, 0.24, 0.24, 0),
  ],
  "car": [
    ("dome", 0, 0.1, 0.5, 0.4, 0),
    ("bar", 0, 0, 0.95, 0.25, 0),
    ("disk", -0.5, -0.3, 0.22, 0.22, 0),
    ("disk", 0.5, -0.3, 0.22, 0.22, 0),
  ],
  "key": [
    ("ring", -0.6, 0, 0.4, 0.4, 0),
    ("bar", 0.3, 0, 0.55, 0.11, 0),
    ("bar", 0.62, -0.2, 0.08, 0.13, 0),
    ("bar", 0.8, -0.2, 0.08, 0.13, 0),
  ],
  "flower": [*(_petal(60 * i + 90) for i in range(6)), ("disk", 0, 0, 0.3, 0.3, 0)],
  "rocket": [
    ("triangle", -0.35, -0.5, 0.18, 0.3, 0),
    ("triangle", 0.35, -0.5, 0.18, 0.3, 0),
    ("bar", 0, -0.1, 0.25, 0.6, 0),
    ("triangle", 0, 0.75, 0.25, 0.25, 0),
  ],
}
assert tuple(_CLASS_PARTS) == CLASS_NAMES


def _part_coordinates(part, x, y):
  """Coordinates of points (x, y) of the object frame in the frame of `part`."""
  _, centre_x, centre_y, half_width, half_height, angle = part
  x, y = x - centre_x, y - centre_y
  if angle:
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x, y = cos * x + sin * y, cos * y - sin * x
  return x / half_width, y / half_height


def _normalised(parts):
  """`parts` moved and scaled so that the object's smallest enclosing circle is ~the unit circle."""
  y, x = np.mgrid[-2:2:801j, -2:2:801j]
  inside = np.zeros(x.shape, bool)
  for part in parts:
    inside |= _PART_SHAPES[part[0]](*_part_coordinates(part, x, y))
  x, y = x[inside], y[inside]
  # The bounding box's centre, then a few steps towards the farthest point.
  centre = np.array([(x.min() + x.max()) / 2, (y.min() + y.max()) / 2])
  for step in np.geomspace(0.1, 0.001, 30):
    distance = np.hypot(x - centre[0], y - centre[1])
    farthest = np.argmax(distance)
    centre += step * (np.array([x[farthest], y[farthest]]) - centre)
  radius = np.hypot(x - centre[0], y - centre[1]).max()
  return [
    (name, (cx - centre[0]) / radius, (cy - centre[1]) / radius, w / radius, h / radius, angle)
    for name, cx, cy, w, h, angle in parts
  ]


_CLASSES = [_normalised(parts) for parts in _CLASS_PARTS.values()]
# Part type ids (1-based) of each class, in drawing order of first appearance.
CLASS_PART_TYPES = tuple(
  tuple(dict.fromkeys(PART_NAMES.index(part[0]) + 1 for part in parts)) for parts in _CLASSES
)


def _layout(rng, n, size, *, max_objects, radius_range, min_separation, overhang, tries=16):
  """Sizes and positions of up to `max_objects` objects per image.

  Each image wants a uniform number of objects in 1..max_objects; each object
  takes the first of `tries` random (radius, uniform centre) draws whose centre
  is at least `1 - overhang` circumradii inside the image and at least
  `min_separation` times the sum of the circumradii from the objects placed
  before it; when none fits the image has fewer.

  Returns:
    (radius float32[n, K], centre float32[n, K, 2] as (x, y)), K = max_objects,
    largest object first, radius 0 for no object.
  """
  wanted = rng.integers(1, max_objects + 1, n)
  radii = crate_shapes._uniform(rng, *radius_range, n, max_objects, tries) * size
  margin = (1 - overhang) * radii[..., None]
  centres = margin + crate_shapes._uniform(rng, 0, 1, n, max_objects, tries, 2) * (
    size - 2 * margin
  )
  radius = np.zeros((n, max_objects), np.float32)
  centre = np.zeros((n, max_objects, 2), np.float32)
  for k in range(max_objects):
    fits = np.broadcast_to((k < wanted)[:, None], (n, tries)).copy()
    for j in range(k):
      distance = np.linalg.norm(centres[:, k] - centre[:, j, None], axis=-1)
      separated = distance >= min_separation * (radii[:, k] + radius[:, j, None])
      fits &= separated | (radius[:, j, None] == 0)
    first = np.argmax(fits, axis=1)
    placed = fits[np.arange(n), first]
    radius[:, k] = np.where(placed, radii[np.arange(n), k, first], 0)
    centre[:, k] = np.where(placed[:, None], centres[np.arange(n), k, first], 0)
  order = np.argsort(-radius, axis=1, kind="stable")
  radius = np.take_along_axis(radius, order, 1)
  centre = np.take_along_axis(centre, order[..., None], 1)
  return radius, centre


def _majority(samples: list[np.ndarray]) -> np.ndarray:
  """Per pixel, the most frequent non-zero value among the sub-sample `samples` (0 if none)."""
  counts = np.stack([sum((a == b).view(np.uint8) for b in samples) * (a > 0) for a in samples])
  return np.take_along_axis(np.stack(samples), counts.argmax(0)[None], 0)[0]


def render(
  labels: np.ndarray,
  image_size: int,
  rng: np.random.Generator,
  *,
  max_objects: int = 3,
  radius_range: tuple[float, float] = (0.2, 0.4),
  min_separation: float = 0.8,
  overhang: float = 0.7,
  max_rotation_degrees: float = 15.0,
  num_scribbles: int = 2,
) -> dict[str, np.ndarray]:
  """Draws 1..max_objects objects of class `labels[i]` per image over a cluttered background.

  Args:
    labels: int[N] indices into `CLASS_NAMES`.
    image_size: side S of the square images.
    rng: source of all randomness.
    max_objects: most objects per image.
    radius_range: object circumradius, as fractions of S.
    min_separation: object centres are at least this times the sum of their
      circumradii apart (1.0: enclosing circles disjoint; less: some overlap).
    overhang: how far objects may reach past the image border, as a fraction
      of their circumradius (0: always whole).
    max_rotation_degrees: objects turn by a uniform angle in +-this.
    num_scribbles: line segments drawn over each background.

  Returns:
    The features of the module docstring but `label`, batched over N: image,
    segmentation, instances, parts and num_objects.
  """
  n, size = len(labels), image_size
  supersample = crate_shapes.supersampling(size)
  fine = size * supersample
  num_parts = len(PART_NAMES)
  radius, centre = _layout(
    rng,
    n,
    size,
    max_objects=max_objects,
    radius_range=radius_range,
    min_separation=min_separation,
    overhang=overhang,
  )
  max_rotation = np.deg2rad(max_rotation_degrees)
  angle = crate_shapes._uniform(rng, -max_rotation, max_rotation, n, max_objects)
  mirror = np.where(rng.random((n, max_objects)) < 0.5, -1, 1).astype(np.float32)

  # Surfaces: 0 background, else 1 + object * num_parts + part type - 1, at
  # sub-sample resolution. Each object is drawn in a window around it.
  surfaces = np.zeros((n, fine, fine), np.uint8)
  for k in range(max_objects):
    for label, parts in enumerate(_CLASSES):
      (selected,) = np.nonzero((labels == label) & (radius[:, k] > 0))
      if not len(selected):
        continue
      r, (centre_x, centre_y) = radius[selected, k, None], centre[selected, k].T[..., None]
      window = min(fine, math.ceil(2 * r.max() * supersample) + 2)
      top = np.clip(np.floor((centre_y - r) * supersample).astype(int) - 1, 0, fine - window)
      left = np.clip(np.floor((centre_x - r) * supersample).astype(int) - 1, 0, fine - window)
      steps = (np.arange(window, dtype=np.float32) + 0.5) / supersample
      dy = (top / np.float32(supersample) + steps - centre_y)[:, :, None]  # Down.
      dx = (left / np.float32(supersample) + steps - centre_x)[:, None, :]
      cos, sin = np.cos(angle[selected, k]), np.sin(angle[selected, k])
      cos, sin, r = cos[:, None, None], sin[:, None, None], r[..., None]
      x = (cos * dx + sin * dy) / r * mirror[selected, k, None, None]
      y = (sin * dx - cos * dy) / r  # Up.
      drawn = np.zeros(x.shape, np.uint8)
      for part in parts:
        surface = 1 + k * num_parts + PART_NAMES.index(part[0])
        drawn[_PART_SHAPES[part[0]](*_part_coordinates(part, x, y))] = surface
      rows = (top + np.arange(window))[:, :, None]
      columns = (left + np.arange(window))[:, None, :]
      index = (selected[:, None, None], rows, columns)
      surfaces[index] = np.where(drawn > 0, drawn, surfaces[index])

  backdrop = crate_shapes.background(rng, n, size, num_scribbles)
  # Mean background under each surface (pixels whose first sub-sample it covers).
  num_surfaces = 1 + max_objects * num_parts
  flat = np.arange(n)[:, None, None] * num_surfaces + surfaces[:, ::supersample, ::supersample]
  count = np.bincount(flat.ravel(), minlength=n * num_surfaces).reshape(n, num_surfaces, 1)
  covered = np.stack(
    [np.bincount(flat.ravel(), backdrop[..., c].ravel(), n * num_surfaces) for c in range(3)],
    -1,
  ).reshape(n, num_surfaces, 3)
  covered = np.where(count > 0, covered / np.maximum(count, 1), backdrop.mean((1, 2))[:, None])
  # Each part type of an object gets the first of 16 random colours that is
  # far from the background under it and from the object's other part colours.
  colours = np.zeros((n, num_surfaces, 3), np.float32)
  for k in range(max_objects):
    for label, part_types in enumerate(CLASS_PART_TYPES):
      (selected,) = np.nonzero((labels == label) & (radius[:, k] > 0))
      candidates = crate_shapes._uniform(rng, 0, 1, len(selected), 16, 3)
      chosen = []
      for part_type in part_types:
        surface = 1 + k * num_parts + part_type - 1
        below = covered[selected, surface][:, None]
        good = np.linalg.norm(candidates - below, axis=-1) >= 0.45
        for other in chosen:
          good &= np.linalg.norm(candidates - other[:, None], axis=-1) >= 0.4
        colour = candidates[np.arange(len(selected)), np.argmax(good, axis=1)]
        colours[selected, surface] = colour
        chosen.append(colour)

  # Anti-aliasing: each pixel averages the colours of its sub-samples.
  samples = [
    surfaces[:, i::supersample, j::supersample]
    for i in range(supersample)
    for j in range(supersample)
  ]
  table = colours.reshape(-1, 3)
  offset = (np.arange(n, dtype=np.int32) * num_surfaces)[:, None, None]
  image = np.zeros(backdrop.shape, np.float32)
  for sample in samples:
    image += np.where((sample > 0)[..., None], np.take(table, offset + sample, axis=0), backdrop)
  image /= len(samples)
  image += np.float32(0.03) * rng.standard_normal(image.shape, dtype=np.float32)
  images = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)

  # Masks: a pixel is foreground when objects cover at least half of its
  # sub-samples; it then shows the surface covering most of them.
  segmentation = 2 * sum((sample > 0).view(np.uint8) for sample in samples) >= len(samples)
  segmentation = segmentation.astype(np.uint8)
  surface = _majority(samples) if supersample > 1 else surfaces
  surface = np.where(segmentation > 0, surface, 0).astype(np.int32) - 1
  instances = np.where(surface >= 0, surface // num_parts + 1, 0)
  # An object may show no pixel (mostly beyond the border and under another):
  # it is not counted, and the ids of the others close the gap.
  visible = np.stack([(instances == k).any((1, 2)) for k in range(1, max_objects + 1)], 1)
  new_ids = np.concatenate([np.zeros((n, 1), int), np.cumsum(visible, 1)], 1)
  return {
    "image": images,
    "segmentation": segmentation,
    "instances": np.take_along_axis(new_ids, instances.reshape(n, -1), 1)
    .reshape(instances.shape)
    .astype(np.uint8),
    "parts": np.where(surface >= 0, surface % num_parts + 1, 0).astype(np.uint8),
    "num_objects": visible.sum(1).astype(np.int32),
  }


@dataclasses.dataclass(eq=False)
class CrateScenesConfig(tfds.core.BuilderConfig):
  """A variant of `crate_scenes`: resolution, split sizes and difficulty.

  Attributes:
    image_size: side of the square images, in pixels.
    train_size: number of training examples.
    test_size: number of test examples.
    max_objects: most objects per image (uniform in 1..max_objects).
    min_radius: smallest object circumradius, as a fraction of the image side.
    max_radius: largest object circumradius, as a fraction of the image side.
    min_separation: object centres are at least this times the sum of their
      circumradii apart.
    overhang: objects may reach past the image border by this fraction of
      their circumradius.
    max_rotation_degrees: objects turn by a uniform angle in +-this.
    num_scribbles: line segments in each background.
    seed: the data are a deterministic function of the seed and the fields above.
  """

  image_size: int = 64
  train_size: int = 20_000
  test_size: int = 2_000
  max_objects: int = 3
  min_radius: float = 0.2
  max_radius: float = 0.4
  min_separation: float = 0.8
  overhang: float = 0.7
  max_rotation_degrees: float = 15.0
  num_scribbles: int = 2
  seed: int = 0


class CrateScenes(tfds.core.GeneratorBasedBuilder):
  """Synthetic scenes of compound objects, with object, instance and part masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    CrateScenesConfig(name="64", image_size=64),
    # Under tfds' in-memory shuffle limit (see `_split_generators`).
    CrateScenesConfig(name="96", image_size=96, train_size=15_000),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size

    def mask():
      return tfds.features.Tensor(shape=(size, size), dtype=np.uint8, encoding="bytes")

    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="bytes"),
          "label": tfds.features.ClassLabel(names=CLASS_NAMES),
          "segmentation": mask(),
          "instances": mask(),
          "parts": mask(),
          "num_objects": tfds.features.Scalar(dtype=np.int32),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    # tfds shuffles a split in memory up to 1000 MiB, and beyond spills to disk
    # through TensorFlow, which we do not have: refuse early and clearly.
    split_bytes = max(config.train_size, config.test_size) * (6 * config.image_size**2 + 64)
    if split_bytes > tfds_shuffle.MAX_MEM_BUFFER_SIZE:
      raise ValueError(
        f"A split of {max(config.train_size, config.test_size)} images of "
        f"{config.image_size} px takes {split_bytes / 2**20:.0f} MiB, over tfds' "
        f"{tfds_shuffle.MAX_MEM_BUFFER_SIZE / 2**20:.0f} MiB in-memory shuffle buffer, "
        "beyond which tfds needs TensorFlow; use fewer images."
      )
    return {
      "train": self._generate_examples(config.train_size, split_id=0),
      "test": self._generate_examples(config.test_size, split_id=1),
    }

  def _generate_examples(self, num_examples: int, split_id: int):
    config = self.builder_config
    labels = np.random.default_rng([config.seed, split_id]).permutation(
      np.arange(num_examples) % len(CLASS_NAMES)
    )
    chunk = crate_shapes.chunk_size(config.image_size)

    def render_chunk(start):
      features = render(
        labels[start : start + chunk],
        config.image_size,
        np.random.default_rng([config.seed, split_id, start]),
        max_objects=config.max_objects,
        radius_range=(config.min_radius, config.max_radius),
        min_separation=config.min_separation,
        overhang=config.overhang,
        max_rotation_degrees=config.max_rotation_degrees,
        num_scribbles=config.num_scribbles,
      )
      return {**features, "label": labels[start : start + chunk]}

    yield from crate_shapes.generate_in_chunks(render_chunk, num_examples, chunk)


def build(config: CrateScenesConfig, data_dir: str | os.PathLike | None = None) -> CrateScenes:
  """Generates `crate_scenes/<config.name>` under `data_dir` unless present.

  Concurrency as `crate_shapes.build`. The examples are a deterministic function
  of the config; the file bytes may differ between processes (the protobuf
  runtime may serialise the features in another order).

  Args:
    config: which config to build; its name must not clash with a registered
      config of different content.
    data_dir: tfds data directory; None is the tfds default.

  Returns:
    The prepared builder.
  """
  return crate_shapes.build_with(CrateScenes, config, data_dir)


def prepare(name: str = "crate_scenes/64", data_dir: str | os.PathLike | None = None) -> None:
  """Builds the registered `crate_scenes` config `name` unless already built.

  Args:
    name: 'crate_scenes' or 'crate_scenes/<config>' with a registered config.
    data_dir: tfds data directory; None is the tfds default.
  """
  crate_shapes.prepare_with(CrateScenes, name, data_dir)
