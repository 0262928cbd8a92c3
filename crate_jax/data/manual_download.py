"""Converting a manual download to tfds array_record without TensorFlow.

Shared by the converters `imagenet21k`, `voc_segmentation` (PASCAL VOC 2012) and
`coco_segmentation` (COCO 2017), each runnable as
`python -m crate_jax.data.<name> --manual_dir=... --data_dir=...`. They store the original
JPEG bytes untouched and segmentation masks as single-channel PNGs, which the evaluation
pipeline decodes, crops and resizes like the image (nearest-neighbour).
"""

from collections.abc import Callable
from collections.abc import Sequence
import importlib.util
import io
import os
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

PathLike = str | os.PathLike


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset converted from a manual download: the original `image` bytes, a `label`,
  the `file_name`, and the features of `_features()`; described by its module's doc."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    """`label` and the dataset's own features."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=sys.modules[type(self).__module__].__doc__,
      features=tfds.features.FeaturesDict(
        {"image": tfds.features.Image(), **self._features(), "file_name": tfds.features.Text()}
      ),
      supervised_keys=("image", "label"),
    )


def segmentation_features(
  class_names: Sequence[str], segmentation_doc: str, instances_doc: str
) -> dict[str, tfds.features.FeatureConnector]:
  """`segmentation` and `instances` masks (uint8[H, W, 1] PNGs, decoded by
  `preprocess.open_image`), the `label` of the largest object and `num_objects`."""

  def mask(doc: str) -> tfds.features.Image:
    return tfds.features.Image(shape=(None, None, 1), encoding_format="png", doc=doc)

  return {
    "segmentation": mask(segmentation_doc),
    "instances": mask(instances_doc),
    "label": tfds.features.ClassLabel(names=class_names),
    "num_objects": tfds.features.Scalar(dtype=np.int32),
  }


def encode_png(mask: np.ndarray) -> bytes:
  """Lossless single-channel PNG of a uint8[H, W] label map."""
  if mask.dtype != np.uint8 or mask.ndim != 2:
    raise ValueError(f"Expected a uint8[H, W] mask, got {mask.dtype}{list(mask.shape)}.")
  buffer = io.BytesIO()
  Image.fromarray(mask).save(buffer, format="PNG")
  return buffer.getvalue()


def find_data_root(manual_dir: PathLike, marker: str, instructions: str) -> pathlib.Path:
  """The folder holding `marker` (a relative path): `manual_dir` or a folder 1-2 levels below.

  So `manual_dir` may be the folder itself or where its archive was extracted.

  Raises:
    FileNotFoundError: nothing holds `marker`; the message ends with `instructions`.
  """
  root = pathlib.Path(manual_dir)  # An existing directory: `build` and tfds check that.
  level = [root]
  for _ in range(3):  # Breadth first: the shallowest match wins.
    for folder in level:
      if (folder / marker).exists():
        return folder
    level = [child for folder in level for child in sorted(folder.iterdir()) if child.is_dir()]
  raise FileNotFoundError(
    f"No {marker} in {root} or the folders 1-2 levels below it. {instructions}"
  )


def check_fits_in_memory(
  split: str, num_bytes: int, advice: str = "Install tensorflow-cpu to build it."
) -> None:
  """Refuses a split that tfds could only write with TensorFlow installed.

  tfds shuffles a split in memory up to `MAX_MEM_BUFFER_SIZE` (1000 MiB) and beyond
  spills to disk through TensorFlow's file API.

  Raises:
    ValueError: `num_bytes` exceeds the buffer and TensorFlow is not installed.
  """
  limit = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  if num_bytes > limit and importlib.util.find_spec("tensorflow") is None:
    raise ValueError(
      f"Split {split!r} holds about {num_bytes / 2**20:.0f} MiB, over tfds' "
      f"{limit / 2**20:.0f} MiB in-memory shuffle buffer, beyond which tfds needs "
      f"TensorFlow (not installed). {advice}"
    )


def build(
  builder_class: type[tfds.core.GeneratorBasedBuilder],
  manual_dir: PathLike,
  data_dir: PathLike | None = None,
) -> None:
  """Converts the download in `manual_dir` to `data_dir`/<name>/<config>/<version>/.

  Raises:
    FileNotFoundError: `manual_dir` is missing or empty (checked here: tfds would only
      assert it), or lacks what the builder needs.
    ValueError: the download is inconsistent or too large to build without TensorFlow.
  """
  root = pathlib.Path(manual_dir)
  if not root.is_dir() or not any(root.iterdir()):
    raise FileNotFoundError(
      f"manual_dir {root} is not a directory or is empty. "
      f"{builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  builder_class(data_dir=data_dir and os.fspath(data_dir)).download_and_prepare(
    file_format="array_record",
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
  )


def main(build_fn: Callable[[str, str | None], None], manual_dir_help: str) -> None:
  """Runs `build_fn(--manual_dir, --data_dir)` as a program (flags defined here, so that
  importing several converters defines none)."""
  manual_dir = flags.DEFINE_string("manual_dir", None, manual_dir_help)
  data_dir = flags.DEFINE_string(
    "data_dir",
    None,
    "tfds data directory to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
  )
  flags.mark_flag_as_required("manual_dir")

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
    try:
      build_fn(manual_dir.value, data_dir.value)
    except (FileNotFoundError, ValueError) as e:
      raise SystemExit(f"Error: {e}") from None  # One line: a bad download, not a bug.

  app.run(run)
