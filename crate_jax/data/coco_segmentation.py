r"""`coco_segmentation`: COCO 2017 instance masks as tfds array_record, without TensorFlow.

Download `val2017.zip` (0.8 GB) and `annotations_trainval2017.zip` from
https://cocodataset.org/#download, extract both into one folder (it then holds `val2017/`
and `annotations/instances_val2017.json`) and convert:

    python -m crate_jax.data.coco_segmentation --manual_dir=/data/coco --data_dir=$TFDS_DATA_DIR

`manual_dir` may also be a folder 1-2 levels above that one. Splits: `validation`
(val2017), and `train` only when `train2017/` and `annotations/instances_train2017.json` are
there too. Images without a non-crowd instance are skipped (no label is defined): the 48
of val2017's 5,000 images that have no annotation, and any with only crowd regions. tfds shuffles a split in memory up to 1000 MiB and beyond needs TensorFlow: the
validation split fits (about 0.8 GB), train2017 (18 GB) does not, so its build stops with
an error unless TensorFlow is installed; move `train2017/` out of `manual_dir` to build
only the validation split.

Features:
  image: the original JPEG bytes.
  segmentation: uint8[H, W, 1] PNG, 1 on the union of the masks of all the image's
    annotations, crowd annotations (`iscrowd=1`, groups of objects) included: they are
    objects too.
  instances: uint8[H, W, 1] PNG, 0 background, else 1..num_objects: the non-crowd
    annotations in order of decreasing mask area (pixels; ties in annotation id order), the
    255 largest at most. Smaller objects are painted over larger ones where they overlap,
    so an id can be partly (rarely wholly) hidden. Crowd regions are 0.
  label: `ClassLabel` over `CATEGORY_NAMES` (the 80 categories in id order), the category
    of the largest non-crowd instance.
  num_objects: the number of instance ids (non-crowd annotations with a non-empty mask).
  file_name: e.g. `000000000139.jpg`.

Polygons are rasterised with PIL (`ImageDraw.polygon`, edges included), which may differ
from pycocotools' rasteriser by a pixel along the edges; RLE masks (uncompressed `counts`
lists and compressed strings) are decoded exactly, here, without pycocotools.
"""

import collections
import json
import os
import pathlib

import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds

from crate_jax.data import manual_download

CATEGORY_NAMES = (
  "person",
  "bicycle",
  "car",
  "motorcycle",
  "airplane",
  "bus",
  "train",
  "truck",
  "boat",
  "traffic light",
  "fire hydrant",
  "stop sign",
  "parking meter",
  "bench",
  "bird",
  "cat",
  "dog",
  "horse",
  "sheep",
  "cow",
  "elephant",
  "bear",
  "zebra",
  "giraffe",
  "backpack",
  "umbrella",
  "handbag",
  "tie",
  "suitcase",
  "frisbee",
  "skis",
  "snowboard",
  "sports ball",
  "kite",
  "baseball bat",
  "baseball glove",
  "skateboard",
  "surfboard",
  "tennis racket",
  "bottle",
  "wine glass",
  "cup",
  "fork",
  "knife",
  "spoon",
  "bowl",
  "banana",
  "apple",
  "sandwich",
  "orange",
  "broccoli",
  "carrot",
  "hot dog",
  "pizza",
  "donut",
  "cake",
  "chair",
  "couch",
  "potted plant",
  "bed",
  "dining table",
  "toilet",
  "tv",
  "laptop",
  "mouse",
  "remote",
  "keyboard",
  "cell phone",
  "microwave",
  "oven",
  "toaster",
  "sink",
  "refrigerator",
  "book",
  "clock",
  "vase",
  "scissors",
  "teddy bear",
  "hair drier",
  "toothbrush",
)
MAX_INSTANCES = 255  # uint8 ids.
# tfds split name -> COCO's name of the image folder and annotation file.
SPLITS = {"train": "train2017", "validation": "val2017"}
# The PNG masks add a few percent to the JPEG bytes of a split: a margin.
_MASK_OVERHEAD = 1.1


def rle_counts_from_string(string: str | bytes) -> list[int]:
  """The run lengths encoded by a COCO compressed RLE string (pycocotools' format).

  Each count is a signed integer written in 5-bit groups, least significant first, one
  character per group (its code minus 48): bit 0x20 says that another group follows and
  bit 0x10 of the last group is the sign. From the fourth count on, the string holds the
  difference to the count two places before.
  """
  if isinstance(string, bytes):
    string = string.decode("ascii")
  counts: list[int] = []
  value = shift = 0
  for char in string:
    group = ord(char) - 48
    if not 0 <= group < 64:
      raise ValueError(f"Character {char!r} is not in COCO's RLE alphabet.")
    value |= (group & 0x1F) << shift
    shift += 5
    if group & 0x20:
      continue
    if group & 0x10:
      value -= 1 << shift  # Negative: sign-extend the last group.
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
    value = shift = 0
  if shift:
    raise ValueError(f"RLE string {string!r} ends inside a count.")
  return counts


def rle_to_mask(counts, height: int, width: int) -> np.ndarray:
  """bool[height, width] of run lengths over the column-major pixels, from a 0-run."""
  counts = np.asarray(counts, np.int64)
  if np.any(counts < 0) or counts.sum() != height * width:
    raise ValueError(f"RLE counts do not cover {height} x {width} pixels.")
  values = np.arange(counts.size) % 2 == 1
  return np.repeat(values, counts).reshape(width, height).T


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
  """bool[height, width], the union of polygons `[x1, y1, x2, y2, ...]` (pixel units)."""
  image = Image.new("L", (width, height))
  draw = ImageDraw.Draw(image)
  for polygon in polygons:
    if len(polygon) >= 6:  # At least a triangle.
      draw.polygon([float(v) for v in polygon], fill=1, outline=1)
  return np.asarray(image, bool)


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray:
  """bool[height, width] of a COCO annotation's `segmentation`: polygons or RLE."""
  if isinstance(segmentation, list):
    return polygons_to_mask(segmentation, height, width)
  if list(segmentation["size"]) != [height, width]:
    raise ValueError(f"RLE of size {segmentation['size']} on a {height} x {width} image.")
  counts = segmentation["counts"]
  if isinstance(counts, (str, bytes)):
    counts = rle_counts_from_string(counts)
  return rle_to_mask(counts, height, width)


def image_masks(annotations, height: int, width: int, category_labels: dict[int, int]):
  """`segmentation`, `instances`, `label` and `num_objects` of one image's annotations
  (as the module doc defines them); None without a non-empty non-crowd instance."""
  foreground = np.zeros((height, width), bool)
  objects = []  # (area, label, mask) of the non-crowd annotations.
  for annotation in sorted(annotations, key=lambda a: a["id"]):
    mask = annotation_mask(annotation["segmentation"], height, width)
    foreground |= mask
    area = int(mask.sum())
    if not annotation.get("iscrowd") and area:
      objects.append((area, category_labels[annotation["category_id"]], mask))
  if not objects:
    return None
  objects.sort(key=lambda o: -o[0])  # Stable: ties stay in id order.
  objects = objects[:MAX_INSTANCES]
  instances = np.zeros((height, width), np.uint8)
  for instance_id, (_, _, mask) in enumerate(objects, start=1):
    instances[mask] = instance_id  # Smaller (later) objects over larger ones.
  return {
    "segmentation": foreground.astype(np.uint8),
    "instances": instances,
    "label": objects[0][1],
    "num_objects": len(objects),
  }


def _category_labels(categories) -> dict[int, int]:
  """COCO category id -> index into `CATEGORY_NAMES`."""
  labels = {}
  for category in categories:
    if category["name"] not in CATEGORY_NAMES:
      raise ValueError(f"Unknown COCO category {category}.")
    labels[category["id"]] = CATEGORY_NAMES.index(category["name"])
  return labels


class CocoSegmentation(manual_download.Builder):
  """COCO 2017 instance masks (validation, optionally train) from a manual directory."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017", description="COCO 2017.")]
  # The file whose folder is the dataset root (`manual_dir` or 1-2 levels below it).
  MANUAL_MARKER = "annotations/instances_val2017.json"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download val2017.zip and annotations_trainval2017.zip from "
    "https://cocodataset.org/#download and extract both into manual_dir, so that it holds "
    "val2017/ and annotations/instances_val2017.json (train2017/ is optional)."
  )

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    return manual_download.segmentation_features(
      CATEGORY_NAMES,
      "1 on any annotation's mask (crowd included), else 0.",
      "0 background, else 1..num_objects: non-crowd instances by decreasing area.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = manual_download.find_data_root(
      dl_manager.manual_dir, self.MANUAL_MARKER, self.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
    generators = {}
    for split, name in SPLITS.items():
      images = root / name
      annotations = root / "annotations" / f"instances_{name}.json"
      if not (images.is_dir() and annotations.exists()):
        if split == "validation":
          raise FileNotFoundError(f"No {images}/. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        continue
      num_bytes = sum(entry.stat().st_size for entry in os.scandir(images))
      manual_download.check_fits_in_memory(
        split,
        int(num_bytes * _MASK_OVERHEAD),
        f"Install tensorflow-cpu, or move {images} out of the manual directory to build "
        "only the validation split.",
      )
      generators[split] = self._generate_examples(images, annotations)
    return generators

  def _generate_examples(self, images: pathlib.Path, annotations_path: pathlib.Path):
    coco = json.loads(annotations_path.read_text())
    category_labels = _category_labels(coco["categories"])
    annotations = collections.defaultdict(list)
    for annotation in coco["annotations"]:
      annotations[annotation["image_id"]].append(annotation)
    for info in sorted(coco["images"], key=lambda i: i["id"]):
      height, width = info["height"], info["width"]
      example = image_masks(annotations[info["id"]], height, width, category_labels)
      if example is None:
        continue
      path = images / info["file_name"]
      with Image.open(path) as image:
        if image.size != (width, height):
          raise ValueError(f"{path} is {image.size}, its annotations {(width, height)}.")
      for key in ("segmentation", "instances"):
        example[key] = manual_download.encode_png(example[key])
      yield info["file_name"], {**example, "image": path.read_bytes(), "file_name": path.name}


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
  """Converts the COCO 2017 download in `manual_dir` into `data_dir`/coco_segmentation."""
  manual_download.build(CocoSegmentation, manual_dir, data_dir)


if __name__ == "__main__":
  manual_download.main(
    build, "Folder holding val2017/ and annotations/instances_val2017.json (COCO 2017)."
  )
