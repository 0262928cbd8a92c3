r"""CRATE-MAE pretraining on the embedded `crate_shapes/32` dataset, sized for 2 CPU cores.

    python -m crate_jax.main --config=configs/mae_demo.py --workdir=/tmp/mae_demo

A small CRATE-MAE (width 128, 4 encoder and 2 decoder layers of 4 heads, 4 x 4 patches: an
8 x 8 grid, 48 of 64 patches masked) learns to reconstruct masked patches with AdamW and a
cosine schedule. Evaluations write the masked reconstruction loss over the test split and
`reconstruction_<step>.png` in the workdir (original | masked | reconstruction, 8 test
images; also in TensorBoard), the layer-wise rate reduction through encoder and decoder
(`rate_reduction.png`), and at the end a linear probe of the frozen encoder (CLS and
mean-pooled features, `linear_probe/*`).

Arguments: `encoder_tokens=visible` encodes only the visible patches (the original MAE
design; the published CRATE-MAE encodes all tokens, mask tokens included); `steps`,
`width`, `depth`, `decoder_depth`, `heads`, `patch`, `mask_ratio`. Measured runs:
benchmarks/README.md. A random-initialisation reference for the probe:
`--config.total_steps=0` in an empty workdir evaluates the fresh encoder.
"""

from configs import common
from crate_jax import config_utils


def get_config(arg=None):
  arg = config_utils.parse_arg(
    arg,
    steps=1000,
    width=128,
    depth=4,
    decoder_depth=2,
    heads=4,
    patch=4,
    mask_ratio=0.75,
    encoder_tokens="all",
  )
  config = common.base(
    "crate_mae",
    task="masked_autoencoding",
    width=arg.width,
    depth=arg.depth,
    decoder_depth=arg.decoder_depth,
    heads=arg.heads,
    patch_size=(arg.patch, arg.patch),
    mask_ratio=arg.mask_ratio,
    encoder_tokens=arg.encoder_tokens,
  )
  config.input.global_batch_size = 128
  config.input.eval_batch_size = 400
  config.total_steps = arg.steps
  config.optimizer.name = "adamw"
  config.optimizer.lr = 2e-3
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.05
  config.schedule.warmup_steps = 100
  config.log_every_steps = 50
  config.evals.reconstruction.every_steps = 500
  config.evals.rate_reduction.every_steps = 500
  config.evals.linear_probe = dict(type="linear_probe", every_steps=0)
  config.checkpoint_every_steps = 500
  return config
