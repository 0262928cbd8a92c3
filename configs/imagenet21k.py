r"""CRATE-alpha pre-training on ImageNet-21K: the CRATE-alpha recipe (Yang et al., 2024).

Adam (b1 0.9, b2 0.95) with decoupled weight decay 0.1 (i.e. AdamW), peak lr 8e-4, global
batch 4096, 91 epochs: 10 warmup epochs then cosine to 1e-6; gradients clipped to global
norm 1.0; inception crop (min area 8%) + horizontal flip. Weight decay reaches the
dictionaries D and D1 (the published code's `.*/kernel$` mask skipped them).

    python -m crate_jax.main --config=configs/imagenet21k.py:variant=B/16 --workdir=$WORKDIR

`variant`: Ti, S, B, L or H with a patch size, e.g. B/32 (the ablations), B/16, L/14.
Needs `imagenet21k` prepared as tfds array_record files (see docs/data.md).

Expected: the pre-trained model is then fine-tuned on ImageNet-1K, where CRATE-alpha reaches
top-1 81.2 (B/16), 83.2 (B/8), 83.9 (L/14), 85.1 (L/8). 91 epochs of ImageNet-21K (13-14 M
images) at batch 4096 are about 300k steps (not run here).
`num_classes` defaults to big_vision's `imagenet21k` (21843); set it to your preparation's.
"""

from configs import common
from crate_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, variant="B/16", batch_size=4096, epochs=91.0, num_classes=21843)
  config = common.base("crate_alpha", variant=arg.variant)
  common.imagenet_style_input(
    config, dataset="imagenet21k", num_classes=arg.num_classes, batch_size=arg.batch_size
  )
  config.input.crop = "inception"
  config.input.crop_min_area = 0.08
  config.input.flip = True

  config.total_epochs = arg.epochs
  config.optimizer.name = "adamw"
  config.optimizer.lr = 8e-4
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.schedule.name = "cosine"
  config.schedule.warmup_epochs = 10.0
  config.schedule.end_lr = 1e-6
  common.pod_cadence(config)
  return config
