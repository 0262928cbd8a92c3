r"""CRATE on the embedded `crate_shapes/32` dataset, sized for a laptop CPU (2 cores).

    python -m crate_jax.main --config=configs/demo.py --workdir=/tmp/crate_demo
    python -m crate_jax.main --config=configs/demo.py:model=vit --workdir=/tmp/vit_demo

`model=vit` (or `crate_alpha`) trains a matched baseline: the same width, depth, heads,
patch, data, optimizer and schedule. `init=<workdir or file>` starts from pretrained
parameters, e.g. fine-tuning the encoder of configs/mae_demo.py:

    python -m crate_jax.main --config=configs/demo.py:model=crate_mae_classifier,patch=4,init=/tmp/mae_demo \
        --workdir=/tmp/mae_finetune

Builds the dataset on first use (20,000 training and 2,000 test images; under a minute),
then trains a small CRATE (width 128, 4 layers of 4 heads, 8 x 8 patches: 17 tokens) for
1,200 steps of 128 images with AdamW and a cosine schedule. Logs progress every 50 steps,
the test accuracy every 200 and the layer-wise rate reduction every 400; leaves
checkpoints, TensorBoard logs (`tensorboard --logdir=/tmp/crate_demo`) and the layer-wise
rate-reduction plot `rate_reduction.png` in the workdir.

Expected: CRATE above 90% test top-1 at the end, in minutes on 2 CPU cores; the measured
runs are in docs/training.md.
"""

import os

from configs import common
from crate_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(
    arg, model="crate", steps=1200, width=128, depth=4, heads=4, patch=8, init=""
  )
  config = common.base(
    arg.model, width=arg.width, depth=arg.depth, heads=arg.heads, patch_size=(arg.patch, arg.patch)
  )
  config.input.global_batch_size = 128
  config.input.eval_batch_size = 400
  config.total_steps = arg.steps
  config.optimizer.name = "adamw"
  config.optimizer.lr = 2e-3
  config.optimizer.weight_decay = 0.05
  config.schedule.warmup_steps = 100
  config.label_smoothing = 0.1
  config.log_every_steps = 50
  config.evals.eval.every_steps = 200
  if "rate_reduction" in config.evals:  # Models with MSSA layers.
    config.evals.rate_reduction.every_steps = 400
  config.checkpoint_every_steps = 400
  if arg.init:
    config.init.checkpoint = arg.init
    config.init.format = "workdir" if os.path.isdir(arg.init) else "published"
  return config
