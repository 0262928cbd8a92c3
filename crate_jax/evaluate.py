r"""Runs a config's evaluators on any checkpoint: `python -m crate_jax.evaluate`.

    python -m crate_jax.evaluate --config=configs/segmentation_benchmark.py \
        --checkpoint=/tmp/runs/crate_seed0 [--evals=segmentation,linear_probe] [--output=r.json]

`--evals` names entries of `config.evals` or evaluator types (run with their defaults).
`--evals` names entries of `config.evals` or evaluator types (run with their defaults).
`--checkpoint` is one of our workdirs (its latest checkpoint), a checkpoint step directory,
or a published checkpoint file (`.pth`, `.safetensors`, `.npz`, read by
`crate_jax.convert`; the model then comes from the file, with `--heads` where its shapes
cannot tell). The config gives the data (`config.input`) and the evaluators
(`config.evals`, all or those named by `--evals`); for our checkpoints also the model. The
metrics are printed as JSON, one object per evaluator, and written to `--output`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from crate_jax import config_utils
from crate_jax import convert
from crate_jax import evaluators
from crate_jax import pretrained
from crate_jax import xla_cpu
from crate_jax.data import pipeline
from crate_jax.models import get_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (data and evaluators).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, step directory or published file.")
_EVALS = flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all).")
_HEADS = flags.DEFINE_integer(
  "heads", None, "Heads of a published model, where shapes cannot tell."
)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the metrics as JSON here.")
flags.mark_flags_as_required(["config", "checkpoint"])


def load(config: ml_collections.ConfigDict, checkpoint: str, heads: int | None = None) -> tuple:
  """`(model, params)` of `checkpoint`: ours (model from `config`) or a published file."""
  if os.path.isfile(checkpoint):
    overrides = {"heads": heads} if heads else {}
    model, variables = convert.load_published(checkpoint, **overrides)
    return model, variables["params"]  # Other input sizes resample its position embedding.
  with config.unlocked():
    config.init.checkpoint, config.init.format = checkpoint, "workdir"
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  return model, pretrained.load(config)


def evaluate(
  config: ml_collections.ConfigDict, checkpoint: str, names: list[str] | None = None, **kwargs
) -> dict[str, dict[str, Any]]:
  """`{entry name: metrics}` of `config.evals` (or `names` of them) on `checkpoint`."""
  config_utils.validate(config)
  entries = {}
  for name in names or config.evals:
    if name in config.evals:
      entries[name] = config.evals[name].to_dict()
    elif name in evaluators.EVALUATORS:  # A type not in the config: its defaults.
      entries[name] = {"type": name}
    else:
      raise config_utils.ConfigError(
        f"--evals {name!r} is neither in config.evals {list(config.evals)} nor an evaluator "
        f"type {evaluators.EVALUATORS}."
      )
  pipeline.prepare_dataset(config.input)
  model, params = load(config, checkpoint, **kwargs)
  with xla_cpu.kernels():
    built = evaluators.build(entries, evaluators.Context(model, config.input))
    results = {e.name: e.evaluator.run(params, 0) for e in built}
  # Scalars only: images (e.g. reconstruction grids) are for the training workdir's logs.
  return {
    name: {k: float(v) for k, v in r.items() if np.ndim(v) == 0} for name, r in results.items()
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  try:
    results = evaluate(_CONFIG.value, _CHECKPOINT.value, _EVALS.value, heads=_HEADS.value)
  except (config_utils.ConfigError, convert.ConversionError, ValueError) as e:
    sys.exit(f"FATAL {type(e).__name__}: {e}")
  text = json.dumps(results, indent=2, sort_keys=True)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  xla_cpu.reuse_freed_memory()
  app.run(main)
