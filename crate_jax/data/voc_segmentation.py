r"""`voc_segmentation`: PASCAL VOC 2012 segmentation masks as tfds array_record, without TensorFlow.

Download `VOCtrainval_11-May-2012.tar` (2 GB, http://host.robots.ox.ac.uk/pascal/VOC/voc2012/),
extract it and convert:

    python -m crate_jax.data.voc_segmentation --manual_dir=/data/VOCtrainval_11-May-2012 \
        --data_dir=$TFDS_DATA_DIR

`manual_dir` may be where the tar was extracted, its `VOCdevkit` or its `VOC2012` folder
(the one holding `JPEGImages`, `SegmentationClass`, `SegmentationObject` and
`ImageSets/Segmentation/{train,val}.txt`). Splits: `train` (1,464 images) and `validation`
(VOC's `val`, 1,449), written in tfds' hashed (random) order.

Features:
  image: the original JPEG bytes.
  segmentation: uint8[H, W, 1] PNG, 1 on the pixels of the 20 object classes (class ids
    1..20 of `SegmentationClass`), 0 on the background (0) and on VOC's void label 255
    (the 5-pixel band along object outlines and ambiguous regions): void counts as
    background.
  instances: uint8[H, W, 1] PNG, `SegmentationObject`'s object ids (0 background, 1..n
    objects, in the order of the image's XML annotation), void 255 -> 0. On every pixel
    segmentation == (instances > 0).
  label: `ClassLabel` over `CLASS_NAMES`, the class of the largest object (most pixels in
    `instances`; the first id on ties). VOC images show several classes, so this is a
    convenience, not a classification benchmark.
  num_objects: the number of object ids present.
  file_name: the JPEG's name, e.g. `2007_000033.jpg`.
Images without any object pixel would be skipped (there are none in VOC 2012).
"""

import os
import pathlib

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from crate_jax.data import manual_download

CLASS_NAMES = (
  "aeroplane",
  "bicycle",
  "bird",
  "boat",
  "bottle",
  "bus",
  "car",
  "cat",
  "chair",
  "cow",
  "diningtable",
  "dog",
  "horse",
  "motorbike",
  "person",
  "pottedplant",
  "sheep",
  "sofa",
  "train",
  "tvmonitor",
)
VOID = 255
# tfds split name -> VOC image set.
SPLITS = {"train": "train", "validation": "val"}


def read_label_map(path: pathlib.Path) -> np.ndarray:
  """The palette indices (VOC's class or object ids) of a palette PNG, uint8[H, W]."""
  with Image.open(path) as image:
    if image.mode not in ("P", "L"):
      raise ValueError(f"{path}: expected a palette (or grey) PNG, got mode {image.mode}.")
    return np.asarray(image)


def masks(classes: np.ndarray, objects: np.ndarray) -> dict[str, np.ndarray | int] | None:
  """`segmentation`, `instances`, `label` and `num_objects` from VOC's class and object
  maps (uint8[H, W] palette indices); None when the image has no object pixel."""
  instances = np.where(objects == VOID, 0, objects).astype(np.uint8)
  ids, counts = np.unique(instances[instances > 0], return_counts=True)
  if not ids.size:
    return None
  largest = instances == ids[np.argmax(counts)]
  object_classes = classes[largest]
  object_classes = object_classes[(object_classes >= 1) & (object_classes <= len(CLASS_NAMES))]
  if not object_classes.size:
    raise ValueError(f"Object {ids[np.argmax(counts)]} has no class pixel.")
  label = np.bincount(object_classes).argmax() - 1  # Its (majority) class.
  segmentation = ((classes >= 1) & (classes <= len(CLASS_NAMES))).astype(np.uint8)
  return {
    "segmentation": segmentation,
    "instances": instances,
    "label": int(label),
    "num_objects": int(ids.size),
  }


class VocSegmentation(manual_download.Builder):
  """PASCAL VOC 2012 segmentation (train / val) from the extracted trainval tar."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2012", description="PASCAL VOC 2012.")]
  # The file whose folder is the dataset root (`manual_dir` or 1-2 levels below it).
  MANUAL_MARKER = "ImageSets/Segmentation/val.txt"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download VOCtrainval_11-May-2012.tar from "
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and extract it: manual_dir is the "
    "extraction folder, its VOCdevkit or its VOC2012 folder."
  )

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    return manual_download.segmentation_features(
      CLASS_NAMES, "1 on object classes 1..20, else 0.", "0 background, else VOC's object id."
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = manual_download.find_data_root(
      dl_manager.manual_dir, self.MANUAL_MARKER, self.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
    generators = {}
    for split, image_set in SPLITS.items():
      ids = (root / "ImageSets" / "Segmentation" / f"{image_set}.txt").read_text().split()
      paths = [self._paths(root, image_id) for image_id in ids]
      missing = [path for triple in paths for path in triple if not path.exists()]
      if missing:
        raise FileNotFoundError(f"{len(missing)} files of VOC {image_set} missing: {missing[0]}")
      manual_download.check_fits_in_memory(
        split, sum(path.stat().st_size for triple in paths for path in triple)
      )
      generators[split] = self._generate_examples(paths)
    return generators

  @staticmethod
  def _paths(root: pathlib.Path, image_id: str) -> tuple[pathlib.Path, ...]:
    return (
      root / "JPEGImages" / f"{image_id}.jpg",
      root / "SegmentationClass" / f"{image_id}.png",
      root / "SegmentationObject" / f"{image_id}.png",
    )

  def _generate_examples(self, paths):
    for jpeg_path, class_path, object_path in paths:
      classes, objects = read_label_map(class_path), read_label_map(object_path)
      with Image.open(jpeg_path) as image:
        size = image.size[::-1]
      if classes.shape != size or objects.shape != size:
        raise ValueError(
          f"{jpeg_path.stem}: image {size}, class map {classes.shape}, object map "
          f"{objects.shape} differ in size."
        )
      example = masks(classes, objects)
      if example is None:
        continue
      for key in ("segmentation", "instances"):
        example[key] = manual_download.encode_png(example[key])
      yield (
        jpeg_path.stem,
        {**example, "image": jpeg_path.read_bytes(), "file_name": jpeg_path.name},
      )


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
  """Converts the VOC 2012 download in `manual_dir` into `data_dir`/voc_segmentation."""
  manual_download.build(VocSegmentation, manual_dir, data_dir)


if __name__ == "__main__":
  manual_download.main(
    build, "The extracted VOCtrainval_11-May-2012.tar (or its VOCdevkit or VOC2012 folder)."
  )
