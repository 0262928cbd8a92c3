r"""CRATE on the embedded `crate_shapes/32` dataset, sized for a laptop CPU (2 cores).

    python -m crate_jax.main --config=configs/demo.py --workdir=/tmp/crate_demo

Builds the dataset on first use (about 10 s), then trains a small CRATE (width 128, 4 layers
of 4 heads, patch 4: 64 tokens) with AdamW and a cosine schedule, logging progress every 50
steps and evaluating every 500. Leaves checkpoints, TensorBoard logs (`tensorboard
--logdir=/tmp/crate_demo`) and the layer-wise rate-reduction plot `rate_reduction.png` in
the workdir.

Expected: test top-1 >= 90% within 8 minutes on 2 CPU cores (measured: see docs/training.md).
"""
from configs import common
from crate_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, steps=1500, width=128, depth=4, heads=4, patch=4)
  config = common.base("crate", width=arg.width, depth=arg.depth, heads=arg.heads,
                       patch_size=(arg.patch, arg.patch))
  config.input.global_batch_size = 128
  config.input.eval_batch_size = 400
  config.total_steps = arg.steps
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.optimizer.weight_decay = 0.05
  config.schedule.warmup_steps = 100
  config.label_smoothing = 0.1
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.rate_reduction_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
