r"""No-model baselines of patch-level foreground segmentation on an embedded dataset.

What maps that do not come from a model score against the objects' masks (scored by
`crate_jax.evaluators.segmentation.map_scores`, exactly as attention maps are):

  position prior: the mean training foreground map, as patches, for every test image.
  centred Gaussian: a Gaussian blob at the image centre (a quarter of the side wide).
  colour contrast: each patch's colour distance from its image's mean colour: uses the
      test image but learns nothing (a low-level saliency cue).
  patch-aligned ground truth: the test mask coarsened to patches (>= 50% covered): the
      best IoU any patch-level mask can reach (its AUROC is 1 by definition).

    python benchmarks/scenes_baselines.py --dataset=crate_scenes/64 [--data_dir=...] [--patch=8]

Registered configs of the embedded datasets are built on first use.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crate_jax.data import pipeline  # noqa: E402
from crate_jax.evaluators import segmentation  # noqa: E402
from crate_jax.interpretability import maps  # noqa: E402
from crate_jax.interpretability import scores  # noqa: E402

_TRAIN_IMAGES = 10_000  # Training masks averaged into the position prior.


def _split(dataset: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  """(images in [0, 1], foreground masks) of a split, unaugmented."""
  config = pipeline.default_input_config()
  config.update(
    dataset=dataset, data_dir=data_dir, eval_split=split, mean=(0.0,) * 3, std=(1.0,) * 3
  )
  config.image_size = pipeline.dataset_features(config)["image"].shape[0]
  batches = list(
    pipeline.make_eval_iterator(config, with_segmentation=True, process_index=0, process_count=1)
  )
  keep = lambda key: np.concatenate([b[key][b["mask"] > 0] for b in batches])
  return keep("image"), keep("segmentation")


def baselines(dataset: str, patch: int, data_dir: str | None = None) -> dict[str, dict[str, float]]:
  """`{baseline: segmentation.map_scores(...)}` on the test split."""
  config = pipeline.default_input_config()
  config.update(dataset=dataset, data_dir=data_dir)
  pipeline.prepare_dataset(config)
  _, train = _split(dataset, f"train[:{_TRAIN_IMAGES}]", data_dir)
  images, test = _split(dataset, "test", data_dir)
  fractions, labels = (np.asarray(x) for x in maps.patch_level_targets(test, patch))
  prior = scores.position_prior(np.asarray(maps.patch_level_targets(train, patch)[0]))
  score_maps = {
    "position prior": np.broadcast_to(prior, fractions.shape),
    "centred Gaussian": np.broadcast_to(scores.centred_blob(fractions.shape[1:]), fractions.shape),
    "colour contrast (no learning)": scores.colour_contrast(images, patch),
  }
  results = {
    name: segmentation.map_scores(m, test, (patch, patch)) for name, m in score_maps.items()
  }
  best = np.asarray(maps.upsample(labels, patch))  # The coarsened mask itself: no threshold.
  iou = float(np.sum(best & (test > 0)) / np.sum(best | (test > 0)))
  results["patch-aligned ground truth"] = dict(
    auroc=1.0, auroc_image=1.0, iou=iou, miou=scores.mean_iou(best, test > 0)
  )
  return results


def main(argv: list[str]) -> None:
  del argv
  args = flags.FLAGS
  results = baselines(args.dataset, args.patch, args.data_dir)
  print(f"{args.dataset}, test split, {args.patch} x {args.patch} patches")
  print("| baseline | AUROC (image) | AUROC (pooled) | IoU | mIoU |")
  print("|---|---|---|---|---|")
  for name, r in results.items():
    print(
      f"| {name} | {r['auroc_image']:.3f} | {r['auroc']:.3f} | {r['iou']:.3f} | {r['miou']:.3f} |"
    )


if __name__ == "__main__":  # Flags only here: the driver of the benchmark imports `baselines`.
  flags.DEFINE_string("dataset", "crate_scenes/64", "tfds name/config of the dataset.")
  flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds').")
  flags.DEFINE_integer("patch", 8, "Patch side in pixels.")
  app.run(main)
