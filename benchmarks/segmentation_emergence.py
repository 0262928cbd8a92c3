r"""Does segmentation emerge in CRATE and not in a ViT trained the same way? Trains, scores, tabulates.

    python benchmarks/segmentation_emergence.py --outdir=/tmp/seg_bench \
        [--models=crate,vit,crate_mae] [--seeds=0,1,2] [--steps=2000] [--data_dir=...]

For every model and seed: `python -m crate_jax.main --config=configs/segmentation_benchmark.py`
into `<outdir>/<model>_s<seed>` (skipped when already finished: reruns resume), then
`python -m crate_jax.evaluate` on its last checkpoint (the test split's top-1 and the
`segmentation` evaluator; the linear probe for the autoencoder) into `metrics.json`. The
no-model baselines of `benchmarks/scenes_baselines.py` (position prior, centred Gaussian,
colour contrast, patch-aligned ground truth) are scored on the same images with the same
functions, as head-averaged maps. Writes `table.md` (mean
+- standard deviation over seeds) and `results.json` into `outdir`, and prints the table.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import scenes_baselines  # noqa: E402
from configs import segmentation_benchmark  # noqa: E402

_OUTDIR = flags.DEFINE_string("outdir", None, "Where the runs and the table go.")
_MODELS = flags.DEFINE_list("models", ["crate", "vit", "crate_mae"], "Models to train.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per model.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the config's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds').")
flags.mark_flags_as_required(["outdir"])

# Columns of the table: (metric key, heading).
COLUMNS = (
  ("eval/top1", "top-1"),
  ("segmentation/attention/auroc_image_mean_map", "attn AUROC/img (mean map)"),
  ("segmentation/attention/auroc_image_best_head", "attn AUROC/img (best head)"),
  ("segmentation/attention/iou_mean_map", "attn IoU (mean map)"),
  ("segmentation/attention/iou_best_head", "attn IoU (best head)"),
  ("segmentation/pca/iou", "PCA IoU"),
  ("segmentation/maskcut/ap50", "MaskCut AP50"),
  ("segmentation/parts/consistency_best", "head-part consistency (best)"),
  ("segmentation/parts/chance", "(its chance level)"),
  ("linear_probe/mean/top1", "linear probe top-1"),
)


def _config_arg(model: str, seed: str) -> str:
  arg = f"model={model},seed={seed}"
  return arg + (f",steps={_STEPS.value}" if _STEPS.value else "")


def _overrides() -> list[str]:
  return [f"--config.input.data_dir={_DATA_DIR.value}"] if _DATA_DIR.value else []


def _run(command: list[str], log: pathlib.Path) -> None:
  with open(log, "a") as out:
    status = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
  if status:
    raise SystemExit(f"{' '.join(command)} failed ({status}); see {log}.")


def train_and_score(model: str, seed: str, outdir: pathlib.Path) -> dict[str, float]:
  """The run's metrics (from its metrics.json, computed once)."""
  workdir = outdir / f"{model}_s{seed}"
  metrics_path = workdir / "metrics.json"
  if not metrics_path.exists():
    config = f"--config=configs/segmentation_benchmark.py:{_config_arg(model, seed)}"
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "log.txt"
    python = [sys.executable, "-m"]
    _run(python + ["crate_jax.main", config, f"--workdir={workdir}", *_overrides()], log)
    evals = (
      "eval,segmentation"
      if model in segmentation_benchmark.CLASSIFIERS
      else "segmentation,linear_probe"
    )
    _run(
      python
      + [
        "crate_jax.evaluate",
        config,
        f"--checkpoint={workdir}",
        f"--evals={evals}",
        f"--output={metrics_path}",
        *_overrides(),
      ],
      log,
    )
  nested = json.loads(metrics_path.read_text())
  return {
    f"{name}/{key}": value for name, metrics in nested.items() for key, value in metrics.items()
  }


def table(rows: dict[str, list[dict[str, float]]]) -> str:
  lines = [
    "| model | runs | " + " | ".join(h for _, h in COLUMNS) + " |",
    "|---|---|" + "---|" * len(COLUMNS),
  ]
  for name, runs in rows.items():
    cells = []
    for key, _ in COLUMNS:
      values = [r[key] for r in runs if key in r and np.isfinite(r[key])]
      if not values:
        cells.append("")
      elif len(values) == 1:
        cells.append(f"{values[0]:.3f}")
      else:
        cells.append(f"{np.mean(values):.3f} +- {np.std(values, ddof=1):.3f}")
    lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  outdir = pathlib.Path(_OUTDIR.value)
  outdir.mkdir(parents=True, exist_ok=True)
  rows = {
    model: [train_and_score(model, s, outdir) for s in _SEEDS.value] for model in _MODELS.value
  }
  config = segmentation_benchmark.get_config()
  baselines = scenes_baselines.baselines(
    config.input.dataset, config.model.patch_size[0], _DATA_DIR.value
  )
  rows.update(
    {
      name: [{f"segmentation/attention/{k}_mean_map": v for k, v in r.items()}]
      for name, r in baselines.items()
    }
  )
  text = table(rows)
  (outdir / "table.md").write_text(text + "\n")
  (outdir / "results.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
  print(text)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
