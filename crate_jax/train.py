"""`train_and_evaluate(config, workdir)`: the training loop, the same for every task.

`crate_jax.main` only parses flags and calls it; it can be called from a notebook as well.
The task (`config.task`, see `crate_jax.tasks`) brings the loss, the batch and its metrics;
the evaluators come from `config.evals` (see `crate_jax.evaluators`); the state and the
train step from `crate_jax.train_state`. This module sets them up and runs the loop:
steps, health checks, logging (progress, throughput and MFU), evaluations, checkpoints
and preemption.

The workdir receives checkpoints (`checkpoints/`), TensorBoard event files, `config.json`
and what the evaluators draw (e.g. `rate_reduction.png`). Rerunning the same command
resumes from the latest checkpoint; with `--config.total_steps=0` it only evaluates the
latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from crate_jax import checkpointing
from crate_jax import config_utils
from crate_jax import evaluators
from crate_jax import optim
from crate_jax import periodic
from crate_jax import preemption
from crate_jax import pretrained
from crate_jax import sharding
from crate_jax import tasks
from crate_jax import train_state
from crate_jax import writers
from crate_jax import xla_cpu
from crate_jax.data import pipeline
from crate_jax.models import get_model
from crate_jax.train_state import TrainState


class TrainingDivergedError(FloatingPointError):
  """The loss, the gradients or the updated state stopped being finite (or exploded)."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the config determines before anything is computed or written."""

  task: tasks.base.Task
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  rules: sharding.LogicalRules
  total_steps: int
  warmup_steps: int
  steps_per_epoch: float


def set_up(config: ml_collections.ConfigDict) -> Setup:
  """Builds what the config describes; every problem is a ConfigError (nothing written)."""
  config_utils.validate(config)
  task = tasks.get_task(config)
  if config.init.checkpoint and not epath.Path(config.init.checkpoint).exists():
    raise config_utils.ConfigError(
      f"config.init: init.checkpoint={config.init.checkpoint!r} does not exist."
    )
  pipeline.prepare_dataset(config.input)
  with config_utils.config_errors("mesh"):
    mesh = sharding.create_mesh(config)
  with config_utils.config_errors("sharding"):
    rules = sharding.logical_rules(config)
  config_utils.validate_batch(config, sharding.batch_divisor(mesh, rules))
  batch_size = config.input.global_batch_size
  _check_dataset(config.input)
  steps_per_epoch = pipeline.num_examples(config.input, config.input.train_split) / batch_size
  total_steps = config_utils.steps(config, "total", steps_per_epoch)
  # Only evaluating a checkpoint (total_steps=0): the schedule is never stepped.
  warmup_steps = (
    config_utils.steps(config.schedule, "warmup", steps_per_epoch, default=0) if total_steps else 0
  )
  with config_utils.config_errors("schedule"):
    schedule = optim.create_schedule(
      config.schedule.name,
      base_lr=config.optimizer.lr,
      total_steps=total_steps,
      warmup_steps=warmup_steps,
      end_lr=config.schedule.end_lr,
    )
  with config_utils.config_errors("model"):
    model = get_model(config.model_name, **config_utils.model_kwargs(config))
    params = train_state.abstract_params(model, config.input.image_size)
  with config_utils.config_errors("optimizer"):
    tx = optim.create_optimizer(config.optimizer, schedule, params)
  return Setup(task, model, tx, schedule, mesh, rules, total_steps, warmup_steps, steps_per_epoch)


def _check_dataset(input_config: ml_collections.ConfigDict) -> None:
  """The parts of `config.input` that must agree with the dataset itself."""
  features = pipeline.dataset_features(input_config)
  classes = getattr(features["label"], "num_classes", None) if "label" in features else None
  if classes is not None and classes != input_config.num_classes:
    raise config_utils.ConfigError(
      f"input.num_classes={input_config.num_classes}, but {input_config.dataset} has {classes} "
      f"classes: set --config.input.num_classes={classes}."
    )
  examples = pipeline.num_examples(input_config, input_config.train_split)
  if input_config.global_batch_size > examples:
    raise config_utils.ConfigError(
      f"input.global_batch_size={input_config.global_batch_size} exceeds the {examples} "
      f"examples of the training split {input_config.train_split!r}."
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains and evaluates `config` in `workdir`, resuming from its latest checkpoint.

  Returns:
    The final train state.

  Raises:
    config_utils.ConfigError: an invalid config.
    pipeline.DatasetNotPreparedError: the dataset is missing (with how to prepare it).
    checkpointing.CheckpointError: checkpoints exist, none readable.
    TrainingDivergedError: the loss, gradients or updated state became non-finite.
  """
  with preemption.Watcher() as watcher:  # From the start: a SIGTERM at any moment is clean.
    if epath.Path(workdir).is_file():  # Checked first: set_up may take long (datasets).
      raise config_utils.ConfigError(f"workdir {workdir!r} is a file, not a directory.")
    setup = set_up(config)
    workdir = _prepare_workdir(workdir)
    logging.info(
      "%d devices, mesh %s; %d steps of %d images (%.2f epochs), %d warmup steps.",
      jax.device_count(),
      dict(setup.mesh.shape),
      setup.total_steps,
      config.input.global_batch_size,
      setup.total_steps / setup.steps_per_epoch,
      setup.warmup_steps,
    )
    with sharding.use_mesh(setup.mesh, setup.rules):
      return _run(config, setup, workdir, watcher)


def _prepare_workdir(workdir: str) -> epath.Path:
  """The workdir, created if needed; a ConfigError if it cannot hold a run."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise config_utils.ConfigError(f"workdir {str(path)!r} cannot be created: {e}") from e
  if not os.access(path, os.W_OK):
    raise config_utils.ConfigError(f"workdir {str(path)!r} is not writable.")
  return path


def _run(
  config: ml_collections.ConfigDict, setup: Setup, workdir: epath.Path, watcher: preemption.Watcher
) -> TrainState:
  image_size = config.input.image_size
  abstract, specs = train_state.abstract_train_state(setup.model, setup.tx, image_size)
  shardings = sharding.state_shardings(specs, abstract, setup.mesh, setup.rules)
  batch_sharding = sharding.batch_sharding(setup.mesh, setup.rules)
  train_iter = pipeline.make_train_iterator(config.input, seed=config.seed)
  checkpointer = checkpointing.Checkpointer(
    workdir / "checkpoints",
    max_to_keep=config.checkpoint.max_to_keep,
    keep_period=config.checkpoint.keep_period,
    async_save=config.checkpoint.async_save,
  )
  watcher.attach(checkpointer.manager)
  try:
    try:
      state = checkpointer.restore_latest(
        train_state.with_shardings(abstract, shardings), train_iter
      )
    except checkpointing.CheckpointError as e:
      raise checkpointing.CheckpointError(f"{e}{_config_changes(workdir, config)}") from e
    if state is None:
      state = _initial_state(config, setup, abstract, shardings)
    # Written only now: the workdir is known to hold (or start) this config's run.
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    try:
      loop = _Loop(config, setup, writer, checkpointer, watcher, workdir)
      return loop.run(state, train_iter, abstract, shardings, batch_sharding)
    finally:
      writer.close()
  finally:
    checkpointer.wait()  # A save in flight (of a good state) completes, also on errors.
    checkpointer.close()


def _config_changes(workdir: epath.Path, config: ml_collections.ConfigDict) -> str:
  """What differs from the config the workdir's checkpoints were written with, if known."""
  previous = workdir / "config.json"
  if not previous.exists():
    return ""
  current = json.loads(config.to_json_best_effort())
  changes = config_utils.differences(json.loads(previous.read_text()), current)
  if not changes:
    return ""
  return f" The workdir's config.json differs from this config in: {'; '.join(changes[:12])}."


def _initial_state(
  config: ml_collections.ConfigDict, setup: Setup, abstract: TrainState, shardings: TrainState
) -> TrainState:
  init = None
  if config.init.checkpoint:
    with config_utils.config_errors("init"):
      init = pretrained.adapt(pretrained.load(config), abstract.params)
  return train_state.create_train_state(
    setup.model, setup.tx, config.input.image_size, config.seed, shardings, init
  )


class _Loop:
  """The steps of one run, with what happens around them."""

  def __init__(self, config, setup, writer, checkpointer, watcher, workdir):
    self.config = config
    self.setup = setup
    self.writer = writer
    self.checkpointer = checkpointer
    self.watcher = watcher
    self.workdir = workdir
    self.last_checkpoint = checkpointer.latest_step()
    self.report = periodic.ReportProgress(
      num_train_steps=setup.total_steps, writer=writer, every_steps=config.log_every_steps
    )

  def run(self, state, train_iter, abstract, shardings, batch_sharding) -> TrainState:
    config, setup = self.config, self.setup
    step = int(jax.device_get(state.step))
    num_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    logging.info(
      "%s at step %d; %s parameters.", "Resuming" if step else "Starting", step, f"{num_params:,}"
    )
    context = evaluators.Context(
      setup.model,
      config.input,
      batch_sharding=batch_sharding,
      param_shardings=shardings.params,
      workdir=self.workdir if jax.process_index() == 0 else None,
      writer=self.writer,
    )
    with xla_cpu.kernels():
      evals = evaluators.build(config.evals, context)
    if step < setup.total_steps and not self.watcher.reached(step):
      state = self._train(state, step, train_iter, abstract, shardings, batch_sharding, evals)
      step = int(jax.device_get(state.step))
    if self.watcher.reached(step):
      logging.warning("Preempted: stopping at step %d (saved, or nothing new to save).", step)
      return state
    self._evaluate(evals, state, step, final=True)
    return state

  def _train(self, state, step, train_iter, abstract, shardings, batch_sharding, evals):
    config, setup = self.config, self.setup
    batch_size = config.input.global_batch_size
    train_step = train_state.compile_train_step(
      setup.task,
      setup.model,
      setup.tx,
      setup.schedule,
      abstract,
      shardings,
      batch_sharding,
      batch_size=batch_size,
      grad_accum_steps=config.grad_accum_steps,
    )
    keys = setup.task.batch_spec(batch_size)
    hooks = [self.report]
    if jax.process_index() == 0 and config.profile.num_steps:
      hooks.append(
        periodic.Profile(
          logdir=self.workdir,
          num_steps=config.profile.num_steps,
          first_step=config.profile.first_step,
          every_secs=config.profile.every_secs,
        )
      )
    # Model FLOPs (3 x the forward matmuls) per device and step, for MFU.
    flops = 3 * setup.model.forward_flops(batch_size) / jax.device_count()
    throughput = periodic.Throughput(
      batch_size=batch_size,
      flops_per_step=flops,
      peak_tflops=config.peak_tflops_per_device,
      step=step,
    )
    due = lambda every: bool(every) and step % every == 0
    train_metrics = previous = None
    while step < setup.total_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(train_iter)
        batch = sharding.put_batch({k: batch[k] for k in keys}, batch_sharding)
        state, step_metrics, health = train_step(state, batch)
      step += 1
      # The previous step has (nearly) finished: checking it does not stall the device.
      if previous is not None:
        self._check_health(*previous)
      previous = (step, health)
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      for hook in hooks:
        hook(step)

      if due(config.log_every_steps) or step == setup.total_steps:
        self._check_health(step, health)
        computed = jax.device_get(train_metrics.compute())
        self.writer.write_scalars(
          step, {**{f"train/{k}": v for k, v in computed.items()}, **throughput(step)}
        )
        train_metrics = None

      preempted = self.watcher.reached(step)
      if preempted or step == setup.total_steps or due(config.checkpoint_every_steps):
        self._check_health(step, health)  # Never save a diverged state.
        with self.report.timed("checkpoint"):
          self.checkpointer.save(step, state, train_iter)
        self.last_checkpoint = step
      if preempted:
        logging.warning("Preempted: saved the checkpoint of step %d and stopping.", step)
        return state
      if step < setup.total_steps and any(e.due(step) for e in evals):
        self._evaluate(evals, state, step, final=False)
        throughput.restart(step)  # Keeps evaluation out of the throughput.
    return state

  def _evaluate(self, evals, state, step: int, *, final: bool) -> None:
    for scheduled in evals:
      if not (final or scheduled.due(step)):
        continue
      with self.report.timed(scheduled.name), xla_cpu.kernels():
        results = scheduled.evaluator.run(state.params, step)
      named = {f"{scheduled.name}/{k}": v for k, v in results.items()}
      self.writer.write_scalars(step, {k: v for k, v in named.items() if np.ndim(v) == 0})
      images = {k: v for k, v in named.items() if np.ndim(v) >= 3}
      if images:
        self.writer.write_images(step, images)

  def _check_health(self, step: int, health: dict[str, Any]) -> None:
    health = jax.device_get(health)
    loss, grad_norm = float(health["loss"]), float(health["grad_norm"])
    if (
      np.isfinite(loss)
      and np.isfinite(grad_norm)
      and health["state_finite"]
      and not health["exploded"]
    ):
      return
    if not health["batch_finite"]:
      cause = "the input batch holds NaN or infinite values"
      advice = "Check the dataset and config.input (mean, std)."
    elif not (np.isfinite(loss) and np.isfinite(grad_norm)):
      cause = f"loss = {loss}, global gradient norm = {grad_norm}"
      advice = "Lower optimizer.lr, lengthen the warmup or set optimizer.grad_clip_norm."
    else:
      what = "non-finite" if not health["state_finite"] else "exploded"
      cause = (
        f"its update left {what} parameters or optimizer state (loss = {loss}, global "
        f"gradient norm = {grad_norm})"
      )
      advice = "Lower optimizer.lr, lengthen the warmup or set optimizer.grad_clip_norm."
    saved = (
      f"the latest checkpoint (step {self.last_checkpoint}) is untouched"
      if self.last_checkpoint is not None
      else "no checkpoint was written"
    )
    raise TrainingDivergedError(
      f"Training diverged at step {step}: {cause}. Stopped without saving; {saved}. {advice}"
    )
