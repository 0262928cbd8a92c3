r"""`imagenet21k`: converts an ImageNet-21K release to tfds array_record.

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

The converter itself needs no TensorFlow, but tfds shuffles a split in memory only up to
1000 MiB and beyond writes its buckets through TensorFlow: a whole release needs
`tensorflow-cpu` installed where it is converted (a clear error says so before it starts).
"""

import os
import tarfile

import tensorflow_datasets as tfds

from crate_jax.data import manual_download


class Imagenet21k(manual_download.Builder):
  """ImageNet-21K from the manual directory of per-synset tar files."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download an ImageNet-21K release (e.g. winter21_whole.tar.gz) from "
    "https://image-net.org and extract it: manual_dir must hold the "
    "per-synset tar files n*.tar."
  )

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    return {"label": tfds.features.ClassLabel()}  # Named after the synsets found.

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    synset_tars = sorted(dl_manager.manual_dir.glob("n*.tar"))
    if not synset_tars:
      raise FileNotFoundError(
        f"No n*.tar in {dl_manager.manual_dir}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    manual_download.check_fits_in_memory("full", sum(os.path.getsize(path) for path in synset_tars))
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
  manual_download.build(Imagenet21k, manual_dir, data_dir)


if __name__ == "__main__":
  manual_download.main(build, "Directory of the n*.tar files.")
