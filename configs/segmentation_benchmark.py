r"""The segmentation-emergence benchmark: a classifier (or an autoencoder) on `crate_scenes/64`,
then how well its attention and features segment the objects it never saw masks of.

    python -m crate_jax.main --config=configs/segmentation_benchmark.py:model=crate,seed=0 \
        --workdir=/tmp/seg/crate_s0

`model`: `crate` or `vit` (classification, matched: width 128, 4 layers of 4 heads, 8 x 8
patches on 64 x 64 images, the same data, optimizer, schedule and budget) or `crate_mae`
(masked autoencoding of the same images, the same encoder size, a 4-layer decoder).
At the end, the `segmentation` evaluator scores the last layer against the dataset's
foreground, instance and part masks (crate_jax/evaluators/segmentation.py).
`benchmarks/segmentation_emergence.py` trains and scores every model and seed and writes
the table with the no-model baselines; the measured table is in docs/interpretability.md.
"""

from configs import common
from crate_jax import config_utils
from crate_jax.data import crate_scenes

CLASSIFIERS = ("crate", "vit")


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, model="crate", seed=0, steps=2000, width=128, depth=4, heads=4)
  sizes = dict(width=arg.width, depth=arg.depth, heads=arg.heads, patch_size=(8, 8))
  if arg.model in CLASSIFIERS:
    config = common.base(arg.model, **sizes)
    config.label_smoothing = 0.1
    config.evals.eval.every_steps = 500
    if "rate_reduction" in config.evals:
      del config.evals["rate_reduction"]
  elif arg.model == "crate_mae":
    config = common.base("crate_mae", task="masked_autoencoding", decoder_depth=4, **sizes)
    config.evals.reconstruction.every_steps = 1000
    del config.evals["rate_reduction"]
    config.evals.linear_probe = dict(
      type="linear_probe", every_steps=0, train_split="train[:10000]"
    )
  else:
    raise config_utils.ConfigError(f"model={arg.model!r}: choose crate, vit or crate_mae.")
  config.seed = arg.seed
  config.input.dataset = "crate_scenes/64"
  config.input.image_size = 64
  config.input.num_classes = len(crate_scenes.CLASS_NAMES)
  config.input.global_batch_size = 128
  config.input.eval_batch_size = 400
  config.total_steps = arg.steps
  config.optimizer.name = "adamw"
  config.optimizer.lr = 2e-3
  config.optimizer.weight_decay = 0.05
  config.schedule.warmup_steps = 100
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.evals.segmentation = dict(
    type="segmentation", every_steps=0, num_part_types=len(crate_scenes.PART_NAMES)
  )
  return config
