"""Tests of the `crate_scenes` dataset and the evaluation masks it feeds."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from crate_jax import data
from crate_jax.data import crate_scenes
from crate_jax.data import crate_shapes
from crate_jax.data import preprocess

TINY = crate_scenes.CrateScenesConfig(name="tiny", image_size=32, train_size=120, test_size=30)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  crate_scenes.build(TINY, data_dir)
  return data_dir


def _stored(data_dir, split="train", name="crate_scenes/tiny"):
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return [source[i] for i in range(len(source))]


def test_masks_are_consistent_with_each_other_and_the_label(data_dir):
  examples = _stored(data_dir)
  assert {int(e["label"]) for e in examples} == set(range(len(crate_scenes.CLASS_NAMES)))
  assert {int(e["num_objects"]) for e in examples} == {1, 2, 3}
  # An object fits in a circle of radius max_radius * S, plus a pixel of anti-aliasing.
  max_extent = 2 * TINY.max_radius * TINY.image_size + 2
  for example in examples:
    segmentation, instances, parts = (
      example[key] for key in ("segmentation", "instances", "parts")
    )
    assert segmentation.shape == instances.shape == parts.shape == (32, 32)
    assert set(np.unique(segmentation)) <= {0, 1}
    np.testing.assert_array_equal(segmentation, instances > 0)
    np.testing.assert_array_equal(segmentation, parts > 0)
    assert parts.max() <= len(crate_scenes.PART_NAMES)
    # Every object is visible, and there is no other.
    num_objects = int(example["num_objects"])
    assert set(np.unique(instances)) - {0} == set(range(1, num_objects + 1))
    class_parts = set(crate_scenes.CLASS_PART_TYPES[example["label"]])
    for instance in range(1, num_objects + 1):
      # Its pixels lie within one object's extent and show only its class's parts.
      y, x = np.nonzero(instances == instance)
      extent = np.hypot(x[:, None] - x[None], y[:, None] - y[None]).max()
      assert extent <= max_extent
      assert set(np.unique(parts[instances == instance])) <= class_parts


def _interior(mask):
  """`mask` eroded by one pixel (4-neighbourhood; the image border erodes too)."""
  padded = np.pad(mask, 1)
  return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def test_parts_are_uniformly_coloured_and_distinct(data_dir):
  checked = 0
  for example in _stored(data_dir, "test"):
    image, instances, parts = (
      example["image"].astype(np.float32),
      example["instances"],
      example["parts"],
    )
    for instance in range(1, int(example["num_objects"]) + 1):
      colours = []
      for part in np.unique(parts[instances == instance]):
        interior = _interior((instances == instance) & (parts == part))
        if interior.sum() < 8:
          continue
        # One colour plus pixel noise, but for a few pixels that other objects' edges touch.
        pixels = image[interior]
        median = np.median(pixels, axis=0)
        # Noise: std 7.7, so a median absolute deviation of 5.2 (noisy on few pixels).
        assert np.median(np.abs(pixels - median), axis=0).max() < 15
        colours.append(median)
      for i, first in enumerate(colours):
        for second in colours[i + 1 :]:
          assert np.linalg.norm(first - second) > 60  # Picked >= 0.4 * 255 apart.
          checked += 1
  assert checked > 10


def test_generation_is_deterministic(tmp_path, data_dir):
  labels = np.arange(20) % len(crate_scenes.CLASS_NAMES)
  first = crate_scenes.render(labels, 32, np.random.default_rng(3))
  again = crate_scenes.render(labels, 32, np.random.default_rng(3))
  other = crate_scenes.render(labels, 32, np.random.default_rng(4))
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first["image"], other["image"])
  # Rebuilt, the dataset holds the same examples. (Not always the same file bytes
  # across processes: the protobuf runtime may order the features differently.)
  crate_scenes.build(
    crate_scenes.CrateScenesConfig(name="tiny", image_size=32, train_size=120, test_size=30),
    tmp_path,
  )
  for split in ("train", "test"):
    for rebuilt, example in zip(_stored(tmp_path, split), _stored(data_dir, split), strict=True):
      assert rebuilt.keys() == example.keys()
      for key in example:
        np.testing.assert_array_equal(rebuilt[key], example[key])


def test_objects_are_spread_over_the_image_unlike_crate_shapes():
  labels = np.arange(400)
  scenes = crate_scenes.render(labels % len(crate_scenes.CLASS_NAMES), 32, np.random.default_rng(0))
  shapes = crate_shapes.render(labels % len(crate_shapes.SHAPE_NAMES), 32, np.random.default_rng(0))
  scenes, shapes = scenes["segmentation"].mean(0), shapes[1].mean(0)

  def spread(mean_map):  # Relative variation of the mean foreground map.
    return mean_map.std() / mean_map.mean()

  assert spread(scenes) < 0.5 * spread(shapes)
  # Objects reach the corners too.
  assert scenes[:8, :8].mean() > 0.4 * scenes.mean()  # crate_shapes: 0.14.


@pytest.mark.parametrize("image_size, resize_ratio", [(32, 1.0), (16, 2.0)])
def test_eval_emits_instances_and_parts_cropped_like_the_image(data_dir, image_size, resize_ratio):
  config = data.default_input_config()
  config.update(
    dataset="crate_scenes/tiny",
    data_dir=str(data_dir),
    image_size=image_size,
    eval_resize_ratio=resize_ratio,
    eval_batch_size=16,  # 30 examples: the second batch ends with 2 padding examples.
  )
  batches = list(data.make_eval_iterator(config, with_segmentation=True))
  batch = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  assert set(batch) == {"image", "label", "mask", "segmentation", "instances", "parts"}
  crop = slice(8, 24) if resize_ratio == 2.0 else slice(None)
  for i, example in enumerate(_stored(data_dir, "test")):
    expected_image = preprocess.normalize(
      example["image"][crop, crop], preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD
    )
    np.testing.assert_array_equal(batch["image"][i], expected_image)
    for key in ("segmentation", "instances", "parts"):
      assert batch[key].dtype == np.uint8
      np.testing.assert_array_equal(batch[key][i], example[key][crop, crop])
  padding = batch["mask"] == 0
  assert padding.sum() == 2
  for key in ("segmentation", "instances", "parts"):
    assert not batch[key][padding].any()
  # Without masks asked for, none is emitted.
  assert set(next(data.make_eval_iterator(config))) == {"image", "label", "mask"}


def test_eval_of_a_dataset_without_instances_emits_segmentation_only(tmp_path):
  crate_shapes.build(
    crate_shapes.CrateShapesConfig(name="t", image_size=32, train_size=20, test_size=10), tmp_path
  )
  config = data.default_input_config()
  config.update(dataset="crate_shapes/t", data_dir=str(tmp_path), eval_batch_size=8)
  batch = next(data.make_eval_iterator(config, with_segmentation=True))
  assert set(batch) == {"image", "label", "mask", "segmentation"}


def test_prepare_builds_registered_crate_scenes(tmp_path, monkeypatch):
  monkeypatch.setattr(crate_scenes.CrateScenes.builder_configs["64"], "train_size", 20)
  monkeypatch.setattr(crate_scenes.CrateScenes.builder_configs["64"], "test_size", 10)
  config = data.default_input_config()
  config.update(dataset="crate_scenes/64", data_dir=str(tmp_path), image_size=64)
  data.prepare_dataset(config)
  assert data.num_examples(config, "train") == 20
  example = tfds.data_source("crate_scenes/64", split="test", data_dir=tmp_path)[0]
  assert example["image"].shape == (64, 64, 3) and example["parts"].shape == (64, 64)
  with pytest.raises(ValueError, match="CrateScenesConfig"):
    crate_scenes.prepare("crate_scenes/48", tmp_path)
