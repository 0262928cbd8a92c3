"""Tests of the PASCAL VOC and COCO converters on small synthetic downloads of the same layout."""

import io
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from crate_jax.data import coco_segmentation
from crate_jax.data import pipeline
from crate_jax.data import voc_segmentation

REPO = pathlib.Path(__file__).resolve().parents[1]


def _jpeg(path, height, width, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, format="JPEG")


def _palette_png(path, label_map):
  image = Image.fromarray(label_map.astype(np.uint8), mode="L").convert("P")
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path)


def _voc_maps(height, width, seed):
  """A class and an object map: two objects (classes 3 and 15), a void outline band."""
  rng = np.random.default_rng(seed)
  classes = np.zeros((height, width), np.uint8)
  objects = np.zeros((height, width), np.uint8)
  top, left = rng.integers(2, 6, 2)
  classes[top : top + 10, left : left + 12], objects[top : top + 10, left : left + 12] = 3, 1
  classes[20:24, 20:26], objects[20:24, 20:26] = 15, 2
  classes[top - 1, left : left + 12] = objects[top - 1, left : left + 12] = voc_segmentation.VOID
  return classes, objects


def _voc_download(root):
  """`root`/VOCdevkit/VOC2012 holding 3 train and 2 val images of various sizes."""
  voc = root / "VOCdevkit" / "VOC2012"
  sets = {"train": ["2007_000001", "2007_000002", "2008_000003"], "val": ["2009_000004", "2009_1"]}
  for image_set, ids in sets.items():
    for seed, image_id in enumerate(ids):
      height, width = 28 + seed, 32 + 2 * seed
      _jpeg(voc / "JPEGImages" / f"{image_id}.jpg", height, width, seed)
      classes, objects = _voc_maps(height, width, seed)
      _palette_png(voc / "SegmentationClass" / f"{image_id}.png", classes)
      _palette_png(voc / "SegmentationObject" / f"{image_id}.png", objects)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Segmentation" / f"{image_set}.txt").write_text("\n".join(ids) + "\n")
  return sets


def _eval_config(dataset, data_dir, image_size=16):
  config = pipeline.default_input_config()
  config.update(
    dataset=dataset,
    data_dir=str(data_dir),
    image_size=image_size,
    eval_split="validation",
    eval_batch_size=4,
    eval_resize_ratio=1.0,
  )
  return config


def _decode(png_bytes):
  return np.asarray(Image.open(io.BytesIO(png_bytes)))


def test_voc_masks_count_void_as_background_and_label_the_largest_object():
  classes, objects = _voc_maps(30, 34, 0)
  example = voc_segmentation.masks(classes, objects)
  np.testing.assert_array_equal(example["segmentation"], (classes >= 1) & (classes <= 20))
  assert set(np.unique(example["instances"])) == {0, 1, 2}
  np.testing.assert_array_equal(example["segmentation"], example["instances"] > 0)
  assert example["label"] == 2  # Object 1 (120 px) of class 3, 'bird'.
  assert voc_segmentation.CLASS_NAMES[example["label"]] == "bird"
  assert example["num_objects"] == 2
  assert voc_segmentation.masks(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)) is None


def test_voc_converts_a_download_into_an_evaluable_dataset(tmp_path):
  sets = _voc_download(tmp_path / "manual")
  data_dir = tmp_path / "tfds"
  voc_segmentation.build(tmp_path / "manual", data_dir)  # The folder above VOCdevkit.

  builder = pipeline._builder(_eval_config("voc_segmentation", data_dir))
  assert builder.info.splits["train"].num_examples == len(sets["train"])
  source = pipeline._data_source(builder, "validation")
  stored = {source[i]["file_name"].decode(): source[i] for i in range(len(source))}
  assert sorted(stored) == sorted(f"{i}.jpg" for i in sets["val"])
  for seed, image_id in enumerate(sets["val"]):
    classes, objects = _voc_maps(28 + seed, 32 + 2 * seed, seed)
    expected = voc_segmentation.masks(classes, objects)
    example = stored[f"{image_id}.jpg"]
    for key in ("segmentation", "instances"):
      np.testing.assert_array_equal(_decode(example[key]), expected[key])

  batch = next(
    iter(
      pipeline.make_eval_iterator(
        _eval_config("voc_segmentation", data_dir), with_segmentation=True
      )
    )
  )
  assert batch["image"].shape == (4, 16, 16, 3)
  assert batch["segmentation"].shape == batch["instances"].shape == (4, 16, 16)
  real = batch["mask"] > 0
  assert real.sum() == 2
  np.testing.assert_array_equal(batch["segmentation"][real] > 0, batch["instances"][real] > 0)
  assert batch["segmentation"][real].any()


def test_voc_without_its_files_says_what_to_download(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="VOCtrainval_11-May-2012.tar"):
    voc_segmentation.build(tmp_path / "empty", tmp_path / "tfds")
  with pytest.raises(pipeline.DatasetNotPreparedError, match="crate_jax.data.voc_segmentation"):
    pipeline.make_eval_iterator(
      _eval_config("voc_segmentation", tmp_path / "tfds"), with_segmentation=True
    )


def _rle_string(counts):
  """COCO's compressed RLE string of `counts` (an independent writer of the documented format)."""
  chars = []
  for i, count in enumerate(counts):
    value = count - counts[i - 2] if i > 2 else count
    while True:
      group = value & 0x1F
      value >>= 5
      more = not (value == 0 and not group & 0x10) and not (value == -1 and group & 0x10)
      chars.append(chr(48 + (group | (0x20 if more else 0))))
      if not more:
        break
  return "".join(chars)


def _column_major_counts(mask):
  """Uncompressed RLE counts of a boolean mask: runs over its columns, starting with zeros."""
  flat, counts, current, run = mask.T.reshape(-1), [], False, 0
  for value in flat:
    if value != current:
      counts.append(run)
      current, run = value, 0
    run += 1
  return counts + [run]


def test_rle_masks_decode_exactly_compressed_or_not():
  rng = np.random.default_rng(0)
  for height, width in ((1, 1), (7, 5), (40, 33)):
    mask = rng.random((height, width)) < 0.3
    mask[0, 0] = True  # A leading zero-length run of background.
    counts = _column_major_counts(mask)
    assert counts[0] == 0
    np.testing.assert_array_equal(coco_segmentation.rle_to_mask(counts, height, width), mask)
    assert coco_segmentation.rle_counts_from_string(_rle_string(counts)) == counts
    segmentation = {"size": [height, width], "counts": _rle_string(counts)}
    np.testing.assert_array_equal(
      coco_segmentation.annotation_mask(segmentation, height, width), mask
    )
  with pytest.raises(ValueError, match="do not cover 3 x 3"):
    coco_segmentation.rle_to_mask([4, 4], 3, 3)
  with pytest.raises(ValueError, match="RLE alphabet"):
    coco_segmentation.rle_counts_from_string(" ")


def test_polygons_rasterise_to_the_region_they_enclose():
  mask = coco_segmentation.polygons_to_mask([[2, 1, 9, 1, 9, 5, 2, 5]], 8, 12)
  expected = np.zeros((8, 12), bool)
  expected[1:6, 2:10] = True  # Edges included.
  np.testing.assert_array_equal(mask, expected)


def _coco_annotations():
  """Image 1: a large polygon person, a small RLE dog on it, a crowd; image 2: crowd only."""
  dog = np.zeros((20, 24), bool)
  dog[4:8, 6:10] = True
  annotations = [
    dict(id=7, image_id=1, category_id=1, iscrowd=0, segmentation=[[2, 2, 15, 2, 15, 15, 2, 15]]),
    dict(
      id=3,
      image_id=1,
      category_id=18,
      iscrowd=0,
      segmentation={"size": [20, 24], "counts": _rle_string(_column_major_counts(dog))},
    ),
    dict(
      id=9,
      image_id=1,
      category_id=1,
      iscrowd=1,
      segmentation={"size": [20, 24], "counts": _column_major_counts(np.eye(20, 24, 18, bool))},
    ),
    dict(id=10, image_id=2, category_id=1, iscrowd=1, segmentation=[[0, 0, 5, 0, 5, 5]]),
  ]
  categories = [dict(id=i, name=name) for i, name in zip((1, 18), ("person", "dog"))]
  images = [
    dict(id=1, file_name="000000000001.jpg", height=20, width=24),
    dict(id=2, file_name="000000000002.jpg", height=10, width=12),
  ]
  return dict(images=images, annotations=annotations, categories=categories), dog


def test_coco_instances_order_by_area_and_crowds_count_as_foreground_only():
  coco, dog = _coco_annotations()
  labels = coco_segmentation._category_labels(coco["categories"])
  image_annotations = [a for a in coco["annotations"] if a["image_id"] == 1]
  example = coco_segmentation.image_masks(image_annotations, 20, 24, labels)
  assert example["num_objects"] == 2
  assert coco_segmentation.CATEGORY_NAMES[example["label"]] == "person"  # The largest.
  np.testing.assert_array_equal(example["instances"] == 2, dog)  # Smaller, painted on top.
  assert (example["instances"] == 1).sum() == 14 * 14 - dog.sum()
  crowd = np.eye(20, 24, 18, bool)
  np.testing.assert_array_equal(example["segmentation"] > 0, (example["instances"] > 0) | crowd)
  crowd_only = [a for a in coco["annotations"] if a["image_id"] == 2]
  assert coco_segmentation.image_masks(crowd_only, 10, 12, labels) is None


def test_coco_converts_a_download_into_an_evaluable_dataset(tmp_path):
  coco, dog = _coco_annotations()
  root = tmp_path / "manual" / "coco"
  for seed, info in enumerate(coco["images"]):
    _jpeg(root / "val2017" / info["file_name"], info["height"], info["width"], seed)
  (root / "annotations").mkdir()
  (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
  data_dir = tmp_path / "tfds"
  coco_segmentation.build(tmp_path / "manual", data_dir)

  builder = pipeline._builder(_eval_config("coco_segmentation", data_dir))
  assert set(builder.info.splits) == {"validation"}  # No train2017/: no train split.
  source = pipeline._data_source(builder, "validation")
  assert len(source) == 1  # The crowd-only image is skipped.
  np.testing.assert_array_equal(_decode(source[0]["instances"]) == 2, dog)

  config = _eval_config("coco_segmentation", data_dir, image_size=20)
  batch = next(iter(pipeline.make_eval_iterator(config, with_segmentation=True)))
  assert batch["instances"].shape == (4, 20, 20)
  assert set(np.unique(batch["instances"][0])) == {0, 1, 2}


@pytest.mark.parametrize("converter", ["voc_segmentation", "coco_segmentation", "imagenet21k"])
def test_converter_commands_name_a_bad_manual_dir_in_one_line(tmp_path, converter):
  result = subprocess.run(
    [sys.executable, "-m", f"crate_jax.data.{converter}", f"--manual_dir={tmp_path / 'no'}"],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert result.returncode == 1
  assert result.stderr.strip().startswith(f"Error: manual_dir {tmp_path / 'no'} is not a directory")
  assert len(result.stderr.strip().splitlines()) == 1
