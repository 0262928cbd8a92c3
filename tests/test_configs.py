"""The configs load and validate; misspelt, ill-typed or inconsistent fields fail at start."""

import pathlib
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from configs import common
from configs import finetune
from crate_jax import config_utils

REPO = pathlib.Path(__file__).resolve().parents[1]


def load(spec: str, *overrides: str):
  """Loads a config as `crate_jax.main` does: a file (`:arg`) and `--config.*` overrides."""
  argv = ["main", f"--config={REPO / 'configs' / spec}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize(
  "spec",
  [
    "demo.py",
    "imagenet.py",
    "imagenet.py:variant=S/16",
    "imagenet21k.py:variant=B/32",
    "finetune.py:dataset=cifar100,init=/tmp",
    "finetune.py:dataset=oxford_iiit_pet,init=a.pth",
    "finetune.py:dataset=oxford_flowers102,init=a.npz,model=crate_alpha,variant=L/14",
  ],
)
def test_every_config_loads_and_validates(spec):
  config = load(spec)
  config_utils.validate(config)
  config_utils.validate_batch(config, batch_shards=8)


def test_recipes_match_the_papers():
  imagenet = load("imagenet.py")
  assert (imagenet.optimizer.name, imagenet.optimizer.lr, imagenet.optimizer.weight_decay) == (
    "lion",
    2.4e-4,
    0.5,
  )
  assert (
    imagenet.input.global_batch_size,
    imagenet.total_epochs,
    imagenet.schedule.warmup_epochs,
    imagenet.label_smoothing,
  ) == (2048, 150, 5, 0.1)
  assert imagenet.input.eval_resize_ratio == 256 / 224 and imagenet.input.image_size == 224
  alpha = load("imagenet21k.py")
  assert (
    alpha.optimizer.name,
    alpha.optimizer.b2,
    alpha.optimizer.lr,
    alpha.schedule.end_lr,
    alpha.optimizer.grad_clip_norm,
    alpha.input.crop,
    alpha.input.crop_min_area,
  ) == ("adamw", 0.95, 8e-4, 1e-6, 1.0, "inception", 0.08)
  flowers = load("finetune.py:dataset=oxford_flowers102,init=x.pth")
  assert (flowers.optimizer.lr, flowers.total_epochs, flowers.init.format) == (
    1e-4,
    400,
    "published",
  )
  cifar = load("finetune.py:init=/tmp")
  assert (cifar.optimizer.lr, cifar.total_epochs, cifar.init.format) == (5e-5, 200, "workdir")


def test_command_line_overrides_are_typed_and_reach_model_fields():
  config = load(
    "demo.py",
    "--config.model.dim_head=8",
    "--config.total_steps=7",
    "--config.mesh.axes=(('data', -1), ('fsdp', 2))",
  )
  assert config.model.dim_head == 8 and config.total_steps == 7
  assert config_utils.model_kwargs(config)["dim_head"] == 8
  with pytest.raises(flags.IllegalFlagValueError, match="total_steps"):
    load("demo.py", "--config.total_steps=ten")


def test_unknown_command_line_field_is_a_one_line_error(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "crate_jax.main",
      "--config=configs/demo.py",
      f"--workdir={tmp_path}",
      "--config.optimizer.nmae=lion",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "unknown config field 'nmae' in --config.optimizer.nmae=lion" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_moved_field_says_where_it_went(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "crate_jax.main",
      "--config=configs/demo.py",
      f"--workdir={tmp_path}",
      "--config.eval_every_steps=100",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "unknown config field 'eval_every_steps'" in result.stderr
  assert "It is now evals.eval.every_steps." in result.stderr


def test_misspelt_field_in_a_config_file_fails_where_it_is_set(tmp_path):
  (tmp_path / "typo.py").write_text(
    "from configs import common\n"
    "def get_config():\n"
    "  config = common.base('crate', variant='T/16')\n"
    "  config.optimizer.weight_decy = 0.1\n"
    "  return config\n"
  )
  with pytest.raises(AttributeError, match='Did you mean "weight_decay"'):
    load(str(tmp_path / "typo.py"))
  with pytest.raises(ValueError, match="has no field 'widht'"):
    common.base("crate", widht=96)


def test_validate_names_the_problem():
  config = load("demo.py")
  with config.unlocked():  # As a notebook might build it.
    config.optimizer.momentum = 0.9
  with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['optimizer.momentum'\]"):
    config_utils.validate(config)
  for field, value, message in [
    ("optimizer.name", "sgdd", "Unknown optimizer.name 'sgdd'"),
    ("schedule.name", "step", "Unknown schedule.name 'step'"),
    ("model_name", "resnet", "model_name: Unknown model 'resnet'"),
    ("task", "segmentation", "task: Unknown task 'segmentation'"),
    ("grad_accum_steps", 0, "grad_accum_steps must be >= 1"),
    ("model.dtype", "float17", "float17"),
    ("optimizer.lr", -1.0, r"optimizer.lr must be >= 0, got -1.0 \(a negative rate ascends"),
    ("input.global_batch_size", 0, "input.global_batch_size must be >= 1, got 0"),
    ("input.crop", "bogus", r"input.crop must be one of \('random_resized', 'inception', 'none'\)"),
    ("input.std", (0.2, 0.0, 0.2), "input.std must be positive"),
    ("evals.eval.type", "clasification", "config.evals.eval: unknown type 'clasification'"),
  ]:
    config = load("demo.py")
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    with config.unlocked():
      node[name] = value
    with pytest.raises((ValueError, TypeError), match=message):
      config_utils.validate(config)


def test_batch_must_split_over_microbatches_and_devices():
  config = load("demo.py", "--config.input.global_batch_size=96", "--config.grad_accum_steps=5")
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps=5"):
    config_utils.validate_batch(config, batch_shards=1)
  config = load("demo.py", "--config.input.global_batch_size=96", "--config.grad_accum_steps=4")
  config_utils.validate_batch(config, batch_shards=8)  # Microbatches of 24 over 8 shards.
  with pytest.raises(ValueError, match="microbatch .* 24.* not divisible by the 16 shards"):
    config_utils.validate_batch(config, batch_shards=16)


def test_config_arguments_are_typed_and_checked():
  parsed = config_utils.parse_arg(
    "variant=S/16,epochs=10,bf16=true", variant="B/16", epochs=150.0, bf16=False
  )
  assert (parsed.variant, parsed.epochs, parsed.bf16) == ("S/16", 10.0, True)
  with pytest.raises(ValueError, match="Unknown config argument 'varient'"):
    config_utils.parse_arg("varient=S/16", variant="B/16")
  with pytest.raises(ValueError, match="is not a int"):
    config_utils.parse_arg("steps=many", steps=10)
  with pytest.raises(ValueError, match="needs init=PATH"):
    finetune.get_config("dataset=cifar10")
  with pytest.raises(ValueError, match="Unknown dataset 'mnist'"):
    finetune.get_config("dataset=mnist,init=/tmp")
