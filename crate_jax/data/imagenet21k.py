r"""`imagenet21k`: converts an ImageNet-21K release to tfds array_record, without TensorFlow.

The releases (winter21 `winter21_whole.tar.gz`: 19,167 classes, 13.2M images;
fall11 `fall11_whole.tar`: 21,841 classes) are an archive of one tar per
synset (`n01440764.tar`, ...). Extract the outer archive into a directory and
convert:

    python -m crate_jax.data.imagenet21k --manual_dir=/data/winter21_whole \
        --data_dir=$TFDS_DATA_DIR

The original JPEG bytes are stored untouched (the pipeline decodes them, PNG and
CMYK files included). Labels index the synsets in sorted order. The releases
have no held-out split, so there is one split, `full`, written in tfds' hashed
(random) order: hold out its head, as big_vision does, e.g.
`train_split='full[102400:]'`, `eval_split='full[:102400]'`.
"""

import os
import tarfile

from absl import app
from absl import flags
import tensorflow_datasets as tfds


class Imagenet21k(tfds.core.GeneratorBasedBuilder):
  """ImageNet-21K from the manual directory of per-synset tar files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download an ImageNet-21K release (e.g. winter21_whole.tar.gz) from "
    "https://image-net.org and extract it: manual_dir must hold the "
    "per-synset tar files n*.tar."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(),
          "label": tfds.features.ClassLabel(),  # Named after the synsets found.
          "file_name": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    synset_tars = sorted(dl_manager.manual_dir.glob("n*.tar"))
    if not synset_tars:
      raise FileNotFoundError(
        f"No n*.tar in {dl_manager.manual_dir}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    self.info.features["label"].names = [path.stem for path in synset_tars]
    return {"full": self._generate_examples(synset_tars)}

  def _generate_examples(self, synset_tars):
    for label, path in enumerate(synset_tars):
      with tarfile.open(path, "r|") as synset_tar:  # Streamed: the tars are large.
        for member in synset_tar:
          if member.isfile():
            image = synset_tar.extractfile(member).read()
            yield member.name, {"image": image, "label": label, "file_name": member.name}


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> None:
  """Converts the per-synset tars in `manual_dir` into `data_dir`/imagenet21k."""
  Imagenet21k(data_dir=data_dir and os.fspath(data_dir)).download_and_prepare(
    file_format="array_record",
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
  )


if __name__ == "__main__":
  _MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory of the n*.tar files.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory to write to.")
  flags.mark_flag_as_required("manual_dir")
  app.run(lambda argv: build(_MANUAL_DIR.value, _DATA_DIR.value))
