"""The config schema and its helpers: `get_config` arguments, model fields, validation.

Every config starts from `base_config()`, which is locked: assigning a field it does not
define (a typo in a config file) fails where it happens, and so does an unknown
`--config.field` on the command line. `validate` re-checks a finished config against the
schema, for configs assembled in a notebook, and checks the values that only make sense
together.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Iterator
import contextlib
import dataclasses
import difflib
import importlib.util
import re
import typing
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from crate_jax import evaluators
from crate_jax import models
from crate_jax import optim
from crate_jax import tasks
from crate_jax.data import pipeline
from crate_jax.data import preprocess

# Fields of a model that the trainer sets from `config.input`.
INPUT_DERIVED_MODEL_FIELDS = ("num_classes", "image_size")


# Mesh axes: data parallelism, parameter sharding (FSDP/ZeRO-3) and tensor parallelism.
MESH_AXES = (("data", -1), ("fsdp", 1), ("tensor", 1))
# Logical axis -> mesh axes, in priority order: an array dimension takes the first rule
# whose mesh axes its other dimensions do not already use. So activations
# (batch, tokens, embed) shard the batch over data x fsdp and keep `embed` whole, while
# parameters shard `embed` over fsdp.
SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("dict", "tensor"),
  ("classes", "tensor"),
  ("head_dim", None),
  ("tokens", None),
  ("patch", None),
  ("layers", None),
)


class ConfigError(ValueError):
  """A config field is unknown, ill-typed or inconsistent; the message names the field."""


@contextlib.contextmanager
def config_errors(section: str) -> Iterator[None]:
  """Reports a ValueError raised while building from `config.<section>` as a ConfigError."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f"config.{section}: {e}") from e


def base_config() -> ml_collections.ConfigDict:
  """All fields a config may set, with defaults; locked. Units: steps unless said."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Parameters, data order and augmentation.
  c.task = "classification"  # crate_jax.tasks: what is trained (loss, batch, metrics).
  c.model_name = "crate"  # crate | crate_alpha | vit
  c.model = ml_collections.ConfigDict()  # model_config(model_name, ...): its fields.
  c.input = pipeline.default_input_config()

  # Duration: `*_steps` wins over `*_epochs` (so `--config.total_steps=N` overrides).
  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)

  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adamw",  # lion | adamw | adam
      lr=1e-3,  # Peak learning rate.
      b1=0.9,
      b2=0.999,
      eps=1e-8,  # eps: Adam only.
      weight_decay=0.0,  # Decoupled, multiplied by the learning rate.
      decay_regex=optim.DEFAULT_DECAY_REGEX,  # Parameters (paths) that decay.
      grad_clip_norm=0.0,  # Clip the global gradient norm; 0: off.
    )
  )
  c.schedule = ml_collections.ConfigDict(
    dict(
      name="cosine",  # cosine | linear | constant (after the linear warmup)
      warmup_steps=config_dict.placeholder(int),
      warmup_epochs=config_dict.placeholder(float),  # Neither set: no warmup.
      end_lr=0.0,
    )
  )
  c.label_smoothing = 0.0
  c.grad_accum_steps = 1  # Microbatches per update (global batch / this each).

  c.log_every_steps = 50
  # Evaluators by name: {name: dict(type=..., every_steps=..., **kwargs)}; see
  # crate_jax.evaluators. configs/common.base() starts from the task's defaults.
  c.evals = ml_collections.ConfigDict()
  c.checkpoint_every_steps = 1000  # 0: only at the end (and on preemption).
  c.checkpoint = ml_collections.ConfigDict(
    dict(
      max_to_keep=3,  # The latest checkpoints kept...
      keep_period=0,  # ...and every step that is a multiple of this (0: none).
      async_save=True,
    )
  )
  # Fine-tuning: start from a checkpoint instead of a random init (see finetune.py).
  c.init = ml_collections.ConfigDict(
    dict(
      checkpoint="",  # A workdir, a step directory, or a published file.
      format="workdir",  # workdir (ours, orbax) | published (crate_jax.convert).
    )
  )

  c.mesh = ml_collections.ConfigDict(dict(axes=MESH_AXES, dcn_data=1))
  c.sharding = ml_collections.ConfigDict(dict(rules=SHARDING_RULES))
  c.peak_tflops_per_device = 0.0  # For MFU, e.g. 989 for H100 bf16; 0: no MFU.
  c.profile = ml_collections.ConfigDict(
    dict(
      num_steps=0,  # Steps per profile (TensorBoard trace in workdir); 0: off.
      first_step=10,
      every_secs=3600.0,
    )
  )
  c.lock()
  c.evals.unlock()  # Entries are free-form; `validate` checks them against their evaluator.
  return c


# Fields that moved, for the error when an old config or command line sets them.
MOVED_FIELDS = {
  "eval_every_steps": "evals.eval.every_steps",
  "rate_reduction_every_steps": "evals.rate_reduction.every_steps",
  "rate_reduction_num_images": "evals.rate_reduction.num_images (or remove the entry)",
}


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `get_config`'s argument 'key=value,key=value' over typed defaults.

  `parse_arg("variant=S/16,epochs=10", variant="B/16", epochs=150)` gives
  `{variant: 'S/16', epochs: 10}`; values take the type of their default and unknown
  keys are errors (big_vision's convention).
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ConfigError(f"Config argument {item!r} is not key=value (in {arg!r}).")
    if key not in defaults:
      raise ConfigError(f"Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}.")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"Config argument {key}={value!r} must be true or false.")
      parsed[key] = value.lower() in ("true", "1")
    else:
      try:
        parsed[key] = kind(value)
      except ValueError as e:
        raise ConfigError(f"Config argument {key}={value!r} is not a {kind.__name__}.") from e
  return parsed


def _model_class(name: str) -> type:
  try:
    return models.model_class(name)
  except ValueError as e:
    raise ConfigError(f"model_name: {e}") from None


def _task(config: ml_collections.ConfigDict) -> tasks.base.Task:
  try:
    return tasks.get_task(config)
  except ValueError as e:
    raise ConfigError(f"task: {e}") from None


def _placeholder_type(annotation: Any, where: str) -> type:
  """The type a command-line value of an optional field parses to: `int | None` -> int.

  `Optional[X]` and `X | None` alike; sequences (`Sequence[int] | None`) parse to tuples.
  """
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if len(args) != 1:
    raise NotImplementedError(f"No config type for {where}: {annotation} (not `X | None`).")
  kind = typing.get_origin(args[0]) or args[0]
  if isinstance(kind, type) and issubclass(kind, collections.abc.Sequence) and kind is not str:
    return tuple
  return kind


def model_config(name: str, **fields: Any) -> ml_collections.ConfigDict:
  """A locked ConfigDict with every field of model `name`, defaults overridden by `fields`.

  Listing all fields (typed, also the unset optional ones) lets the command line
  override any of them (`--config.model.dim_head=32`) and rejects misspelt ones.
  `num_classes` and `image_size` come from `config.input`; `dtype` is a string.
  """
  config = ml_collections.ConfigDict()
  cls = _model_class(name)
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if field.name in ("parent", "name") + INPUT_DERIVED_MODEL_FIELDS:
      continue
    if field.name == "dtype":
      value = "float32"
    elif field.default is None:
      value = config_dict.placeholder(_placeholder_type(hints[field.name], f"{name}.{field.name}"))
    else:
      value = field.default
    config[field.name] = value
  for key, value in fields.items():
    if key not in config:
      raise ConfigError(f"Model {name!r} has no field {key!r}; fields: {sorted(config)}.")
    config[key] = value
  config.lock()
  return config


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of `crate_jax.models.get_model(config.model_name, ...)`.

  `config.model`, plus the fields the task derives from `config.input` (`image_size`,
  and `num_classes` for classifiers).
  """
  kwargs = config.model.to_dict()
  kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  kwargs.update(_task(config).model_fields(_model_class(config.model_name)))
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def steps(
  config: ml_collections.ConfigDict, prefix: str, steps_per_epoch: float, default: int | None = None
) -> int:
  """`{prefix}_steps` if set, else `{prefix}_epochs` converted with the dataset size."""
  step_count, epochs = config.get(f"{prefix}_steps"), config.get(f"{prefix}_epochs")
  if step_count is not None:
    return int(step_count)
  if epochs is not None:
    return int(round(epochs * steps_per_epoch))
  if default is None:
    raise ConfigError(f"Set {prefix}_steps or {prefix}_epochs.")
  return default


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value:
      keys |= _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(f"{prefix}{key}")
  return keys


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first problem: unknown fields or inconsistent values."""
  model_cls = _model_class(config.model_name)
  known = _flat_keys(base_config()) | {f"model.{k}" for k in model_config(config.model_name)}
  unknown = sorted(k for k in _flat_keys(config) - known if not k.startswith("evals."))
  if unknown:
    moved = [f"{k} is now {MOVED_FIELDS[k]}" for k in unknown if k in MOVED_FIELDS]
    raise ConfigError(
      f"Unknown config field(s) {unknown}: not in config_utils.base_config() "
      f"or the fields of model {config.model_name!r}"
      + (f" ({'; '.join(moved)})." if moved else ".")
    )
  try:
    _task(config).check_model(model_cls)
    evaluators.check(config.evals, model_cls)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ConfigError(
      f"Unknown optimizer.name {config.optimizer.name!r}; choose one of {optim.OPTIMIZERS}."
    )
  if config.schedule.name not in optim.SCHEDULES:
    raise ConfigError(
      f"Unknown schedule.name {config.schedule.name!r}; choose one of {optim.SCHEDULES}."
    )
  if not config.optimizer.lr >= 0:
    raise ConfigError(
      f"optimizer.lr must be >= 0, got {config.optimizer.lr} (a negative rate ascends the loss)."
    )
  try:
    re.compile(config.optimizer.decay_regex)
  except re.error as e:
    raise ConfigError(f"optimizer.decay_regex {config.optimizer.decay_regex!r}: {e}") from e
  for name in ("grad_accum_steps", "log_every_steps"):
    if config[name] < 1:
      raise ConfigError(f"{name} must be >= 1, got {config[name]}.")
  for name in ("input.global_batch_size", "input.eval_batch_size", "input.image_size"):
    section, field = name.split(".")
    if config[section][field] < 1:
      raise ConfigError(f"{name} must be >= 1, got {config[section][field]}.")
  if config.input.crop not in preprocess.CROPS:
    raise ConfigError(f"input.crop must be one of {preprocess.CROPS}, got {config.input.crop!r}.")
  if any(not s > 0 for s in config.input.std):
    raise ConfigError(f"input.std must be positive, got {tuple(config.input.std)}.")
  if config.checkpoint_every_steps < 0:
    raise ConfigError(
      f"checkpoint_every_steps must be >= 0 (0: only at the end), got "
      f"{config.checkpoint_every_steps}."
    )
  if config.checkpoint.max_to_keep < 1:
    raise ConfigError(f"checkpoint.max_to_keep must be >= 1, got {config.checkpoint.max_to_keep}.")
  if config.init.checkpoint and config.init.format not in ("workdir", "published"):
    raise ConfigError(f"init.format must be 'workdir' or 'published', got {config.init.format!r}.")
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ConfigError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}.")
  try:
    jnp.dtype(config.model.dtype)
  except TypeError as e:
    raise ConfigError(f"model.dtype {config.model.dtype!r}: {e}") from e


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """`"field: old -> new"` for every leaf of two nested (JSON-like) configs that differs."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [
      change
      for key in sorted(set(old) | set(new), key=str)
      for change in differences(old.get(key), new.get(key), f"{prefix}{key}.")
    ]
  return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of a `--config` value, `path/to/config.py[:argument]`, as `get_config` gives it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_crate_jax_config", path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"Cannot load the config file {path!r}.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_overrides(argv: list[str]) -> list[str]:
  """One message per `--config.<path>=...` in `argv` that names no field of its config.

  The config is the one `--config=` names in `argv`. Field names are compared, never the
  text of a parser's error; the message suggests the closest known field.
  """
  spec = next((a.partition("=")[2] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return []
  config = load_config_file(spec)
  problems = []
  for arg in argv:
    name = arg.partition("=")[0]
    if not name.startswith("--config."):
      continue
    node, path = config, name[len("--config.") :].split(".")
    for depth, field in enumerate(path):
      if isinstance(node, ml_collections.ConfigDict) and field in node:
        node = node[field]
        continue
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(field, known, n=1)
      where = ".".join(path[:depth]) or "the config"
      moved = MOVED_FIELDS.get(".".join(path))
      hint = f" It is now {moved}." if moved else f' Did you mean "{close[0]}"?' if close else ""
      problems.append(f"unknown config field {field!r} in {arg} (not a field of {where}).{hint}")
      break
  return problems


def validate_batch(config: ml_collections.ConfigDict, batch_shards: int) -> None:
  """The global batch must split into microbatches, and those over the batch shards."""
  batch, accum = config.input.global_batch_size, config.grad_accum_steps
  if batch % accum:
    raise ConfigError(
      f"input.global_batch_size={batch} is not divisible by grad_accum_steps={accum}."
    )
  if (batch // accum) % batch_shards:
    raise ConfigError(
      f"The microbatch (input.global_batch_size / grad_accum_steps = {batch // accum}) is not "
      f"divisible by the {batch_shards} shards of the batch axis ({jax.device_count()} "
      f"devices, mesh and sharding rules of the config)."
    )
  if config.input.eval_batch_size % batch_shards:
    raise ConfigError(
      f"input.eval_batch_size={config.input.eval_batch_size} is not divisible by "
      f"the {batch_shards} shards of the batch axis."
    )
