"""Training and evaluation loop for CRATE, CRATE-alpha and ViT classifiers.

`train_and_evaluate(config, workdir)` runs a whole experiment and can be called from a
notebook; `crate_jax.main` only parses flags and calls it. The pieces are public for
tests, benchmarks and ahead-of-time compilation:

    mesh, rules = sharding.create_mesh(config), sharding.logical_rules(config)
    with sharding.use_mesh(mesh, rules):  # Active while tracing: the models' constraints.
      abstract, specs = abstract_train_state(model, tx, image_size)
      shardings = sharding.state_shardings(specs, abstract, mesh, rules)
      state = create_train_state(model, tx, image_size, seed, shardings)
      train_step = make_train_step(model, tx, schedule, shardings, batch_sharding)
      state, step_metrics = train_step(state, sharding.put_batch(batch, batch_sharding))

The workdir receives checkpoints (`checkpoints/`), TensorBoard event files, `config.json`
and the layer-wise rate-reduction plot (`rate_reduction.png`). Rerunning the same command
resumes from the latest checkpoint; with `--config.total_steps=0` it only evaluates the
latest checkpoint and redraws the plot.
"""

from collections.abc import Callable
import functools
import time
from typing import Any

from absl import logging
from clu import metrics
from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from crate_jax import checkpointing
from crate_jax import config_utils
from crate_jax import convert
from crate_jax import optim
from crate_jax import periodic
from crate_jax import sharding
from crate_jax import writers
from crate_jax.data import pipeline
from crate_jax.evaluators import classification
from crate_jax.evaluators import rate_reduction
from crate_jax.models import common
from crate_jax.models import get_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Optimizer updates done.
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # Base key; step `s` uses `fold_in(rng, s)`.


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output("loss")
  accuracy: metrics.Average.from_output("accuracy")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  grad_norm: metrics.Average.from_output("grad_norm")
  param_norm: metrics.LastValue.from_output("param_norm")
  update_norm: metrics.Average.from_output("update_norm")


class TrainingDivergedError(FloatingPointError):
  """The loss or the gradients stopped being finite."""


# --------------------------------------------------------------------------------------
# State and steps.
# --------------------------------------------------------------------------------------


def _init_params(model: nn.Module, rng: jax.Array, image_size: int) -> Any:
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init(rng, images, train=False)["params"]


def _unbox_shapes(boxed: Any) -> Any:
  """Removes the logical-axis boxes of shapes (`nn.unbox` would add sharding constraints)."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    boxed,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def abstract_params(model: nn.Module, image_size: int) -> Any:
  """The model's parameters as `ShapeDtypeStruct`s, without computing them.

  Nothing is placed on a device, not even the key: the AOT check may run where the default
  backend is a compile-only TPU topology.
  """
  return _unbox_shapes(
    jax.eval_shape(functools.partial(_init_params, model, image_size=image_size), _abstract_key())
  )


def _abstract_key() -> jax.ShapeDtypeStruct:
  return jax.eval_shape(jax.random.PRNGKey, 0)


def abstract_train_state(
  model: nn.Module, tx: optax.GradientTransformation, image_size: int
) -> tuple[TrainState, TrainState]:
  """Shapes of the train state and the logical PartitionSpec of every leaf.

  Parameters carry their logical axis names from the model; the optimizer's
  parameter-shaped leaves (moments) take those of their parameter, the rest (counts,
  step, rng) are replicated.
  """
  boxed = jax.eval_shape(
    functools.partial(_init_params, model, image_size=image_size), _abstract_key()
  )
  param_specs = nn.get_partition_spec(boxed)
  params = _unbox_shapes(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  opt_specs = optax.tree_map_params(
    tx,
    lambda _, spec: spec,
    opt_state,
    param_specs,
    transform_non_params=lambda _: P(),
    is_leaf=lambda x: isinstance(x, P),
  )
  abstract = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params,
    opt_state=opt_state,
    rng=_abstract_key(),
  )
  specs = TrainState(step=P(), params=param_specs, opt_state=opt_specs, rng=P())
  return abstract, specs


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s carrying shardings: what orbax restores into and AOT compiles for."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )


def create_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_size: int,
  seed: int,
  shardings: TrainState,
  pretrained: dict[tuple[str, ...], np.ndarray] | None = None,
) -> TrainState:
  """A freshly initialised state, created directly in its shardings (never whole on one device).

  Args:
    model: the model.
    tx: the optimizer.
    image_size: input side the position embedding is learned at.
    seed: seeds the parameters and the state's rng.
    shardings: of the state (`sharding.state_shardings`).
    pretrained: flat `{path: array}` replacing initialised parameters (fine-tuning).
  """

  def init(rng, pretrained):
    params_rng, rng = jax.random.split(rng)
    params = nn.unbox(_init_params(model, params_rng, image_size))
    if pretrained:
      flat = flax.traverse_util.flatten_dict(params)
      flat.update({k: v.astype(flat[k].dtype) for k, v in pretrained.items()})
      params = flax.traverse_util.unflatten_dict(flat)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
    )

  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed), pretrained or {})


def _microbatches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
  """`[B, ...] -> [num, B / num, ...]`, microbatch `i` holding rows `i, i + num, ...`.

  Strided rather than contiguous: each device's shard of the batch holds rows of every
  microbatch, so splitting needs no communication.
  """
  return jax.tree.map(
    lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch
  )


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  state_shardings: TrainState,
  batch_sharding: NamedSharding,
  *,
  label_smoothing: float = 0.0,
  grad_accum_steps: int = 1,
) -> Callable:
  """`train_step(state, batch) -> (state, TrainMetrics)`, jitted and donating the state.

  With `grad_accum_steps > 1` the batch is split into that many microbatches whose
  gradients are averaged inside the step (`lax.scan`): one update equal to a step on the
  whole batch, with the activation memory of one microbatch.
  """

  def loss_fn(params, batch, rng):
    logits, _ = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
    loss = jnp.mean(optim.cross_entropy(logits, batch["labels"], label_smoothing))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["labels"], -1))
    return loss, accuracy

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (loss, accuracy), grads = grad_fn(state.params, batch, rng)
    else:

      def accumulate(carry, xs):
        index, microbatch = xs
        (loss, accuracy), grads = grad_fn(state.params, microbatch, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (grads, loss, accuracy)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
      (grads, loss, accuracy), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum_steps), _microbatches(batch, grad_accum_steps))
      )
      grads, loss, accuracy = jax.tree.map(lambda x: x / grad_accum_steps, (grads, loss, accuracy))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics = TrainMetrics.single_from_model_output(
      loss=loss,
      accuracy=accuracy,
      learning_rate=schedule(state.step),
      grad_norm=optax.tree.norm(grads),
      param_norm=optax.tree.norm(params),
      update_norm=optax.tree.norm(updates),
    )
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), step_metrics

  replicated = NamedSharding(batch_sharding.mesh, P())
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def make_evaluator(
  model: nn.Module, param_shardings: Any, batch_sharding: NamedSharding
) -> classification.ClassificationEvaluator:
  """Top-1, top-5 and loss of sharded parameters on global batches (see `evaluate`)."""
  return classification.ClassificationEvaluator(
    model,
    jit=functools.partial(
      jax.jit,
      in_shardings=(param_shardings, batch_sharding),
      out_shardings=NamedSharding(batch_sharding.mesh, P()),
    ),
  )


def evaluate(
  evaluator: classification.ClassificationEvaluator,
  params: Any,
  input_config: ml_collections.ConfigDict,
  batch_sharding: NamedSharding,
) -> dict[str, float]:
  """One pass over the evaluation split; padding (`mask` 0) is excluded: exact coverage."""
  batches = pipeline.make_eval_iterator(input_config)
  return evaluator.run(params, (sharding.put_batch(b, batch_sharding) for b in batches))


def _fixed_images(input_config: ml_collections.ConfigDict, num: int) -> np.ndarray:
  """The first `num` evaluation images (fewer if the split is smaller), on every process."""
  images = []
  for batch in pipeline.make_eval_iterator(input_config, process_index=0, process_count=1):
    images.append(batch["image"][batch["mask"] > 0])
    if sum(len(x) for x in images) >= num:
      break
  return np.concatenate(images)[:num]


# --------------------------------------------------------------------------------------
# Fine-tuning initialisation.
# --------------------------------------------------------------------------------------


def load_pretrained(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Parameters (host arrays, our naming) of `config.init.checkpoint`."""
  path = epath.Path(config.init.checkpoint)
  if config.init.format == "published":
    overrides = {"heads": config.model.heads} if config.model.heads else {}
    return convert.load_published(str(path), **overrides)[1]["params"]
  if (path / "checkpoints").exists():  # A workdir: its latest checkpoint.
    manager = ocp.CheckpointManager(
      path / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)
    )
    if manager.latest_step() is None:
      raise FileNotFoundError(f"No checkpoint in {path / 'checkpoints'}.")
    path = path / "checkpoints" / str(manager.latest_step())
  if not (path / "state").exists():
    raise FileNotFoundError(
      f"init.checkpoint={str(path)!r} is neither a workdir nor a "
      "checkpoint step directory (with a `state` item)."
    )
  logging.info("Loading parameters from %s.", path)
  return jax.device_get(ocp.StandardCheckpointer().restore(path / "state")["params"])


def adapt_pretrained(pretrained: dict[str, Any], target_shapes: Any) -> dict[tuple[str, ...], Any]:
  """Fits pretrained parameters to the model being trained; returns `{path: array}`.

  Converts between scanned and unrolled layer stacks, resamples the position embedding
  to the new patch grid, and leaves out the `head` when its shape changed (new classes):
  it keeps its fresh initialisation. Any other mismatch is an error.
  """
  target = flax.traverse_util.flatten_dict(target_shapes)
  encoder = pretrained.get("encoder", {})
  if any(k[:2] == ("encoder", "layers") for k in target) and "layer_0" in encoder:
    pretrained = common.stack_layer_params(pretrained, len(encoder))
  elif any(k[:2] == ("encoder", "layer_0") for k in target) and "layers" in encoder:
    pretrained = common.unstack_layer_params(pretrained)
  source = flax.traverse_util.flatten_dict(pretrained)
  missing = sorted("/".join(k) for k in target if k not in source)
  if missing:
    raise ValueError(f"The pretrained checkpoint lacks {missing[:10]}: another model family?")
  adapted, problems = {}, []
  for key, shape in target.items():
    value = np.asarray(source[key])
    if value.shape == shape.shape:
      adapted[key] = value
    elif key[-1] == "pos_embedding":
      old, new = (_square_grid(s[1] - 1) for s in (value.shape, shape.shape))
      logging.info("Resampling pos_embedding from a %s to a %s grid.", old, new)
      adapted[key] = np.asarray(common.resample_posemb(value, old, new))
    elif key[0] == "head":
      logging.info("Re-initialising %s: %s -> %s.", "/".join(key), value.shape, shape.shape)
    else:
      problems.append(f"{'/'.join(key)}: {value.shape} vs {shape.shape}")
  if problems:
    raise ValueError(f"Pretrained shapes do not fit config.model: {problems[:10]}.")
  return adapted


def _square_grid(num_tokens: int) -> tuple[int, int]:
  side = int(round(num_tokens**0.5))
  if side * side != num_tokens:
    raise ValueError(f"Cannot resample a position embedding of {num_tokens} tokens: not square.")
  return side, side


# --------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------


def _rate_reduction_jit() -> Callable[[Callable], Callable]:
  """How to compile the rate-reduction measurement; op by op on CPU.

  On the CPU backend (jaxlib 0.10), XLA runs independent LAPACK Cholesky calls of one
  program concurrently, and each waits for batch work queued on the same intra-op thread
  pool: with as few pool threads as concurrent calls (2 cores), the program deadlocks.
  Dispatched op by op, one Cholesky runs at a time; it costs little on a small model.
  """
  return (lambda f: f) if jax.default_backend() == "cpu" else jax.jit


def _check_finite(step: int, step_metrics: TrainMetrics, last_checkpoint: int | None) -> None:
  loss, grad_norm = jax.device_get((step_metrics.loss.compute(), step_metrics.grad_norm.compute()))
  if not (np.isfinite(loss) and np.isfinite(grad_norm)):
    raise TrainingDivergedError(
      f"Training diverged at step {step}: loss = {loss}, global gradient norm = {grad_norm}. "
      f"Stopped without saving; the latest checkpoint (step {last_checkpoint}) is untouched. "
      "Lower optimizer.lr, lengthen the warmup or set optimizer.grad_clip_norm."
    )


def compile_train_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  abstract: TrainState,
  shardings: TrainState,
  batch_sharding: NamedSharding,
) -> Any:
  """`make_train_step` for the config, compiled ahead of time for abstract state and batch."""
  batch_size, image_size = config.input.global_batch_size, config.input.image_size
  abstract_batch = {
    "image": jax.ShapeDtypeStruct(
      (batch_size, image_size, image_size, 3), jnp.float32, sharding=batch_sharding
    ),
    "labels": jax.ShapeDtypeStruct(
      (batch_size, config.input.num_classes), jnp.float32, sharding=batch_sharding
    ),
  }
  step = make_train_step(
    model,
    tx,
    schedule,
    shardings,
    batch_sharding,
    label_smoothing=config.label_smoothing,
    grad_accum_steps=config.grad_accum_steps,
  )
  return step.lower(with_shardings(abstract, shardings), abstract_batch).compile()


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled (per-device) program, where the backend reports them."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Unimplemented on some backends.
    return None
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _throughput(
  steps_per_sec: float, batch_size: int, flops_per_step: float | None, peak_tflops: float
) -> dict[str, float]:
  """Images/s, model TFLOP/s and MFU, per device."""
  scalars = {"perf/images_per_sec_per_device": steps_per_sec * batch_size / jax.device_count()}
  if flops_per_step:
    tflops = steps_per_sec * flops_per_step / 1e12
    scalars["perf/model_tflops_per_sec_per_device"] = tflops
    if peak_tflops:
      scalars["perf/mfu"] = tflops / peak_tflops
  return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains and evaluates `config` in `workdir`, resuming from its latest checkpoint.

  Returns:
    The final train state.

  Raises:
    config_utils.ConfigError: an invalid config.
    pipeline.DatasetNotPreparedError: the dataset is missing (with how to prepare it).
    checkpointing.CheckpointError: checkpoints exist, none readable.
    TrainingDivergedError: the loss or gradients became NaN or infinite.
  """
  config_utils.validate(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0

  pipeline.prepare_dataset(config.input)
  with config_utils.config_errors("mesh"):
    mesh = sharding.create_mesh(config)
  with config_utils.config_errors("sharding"):
    rules = sharding.logical_rules(config)
  config_utils.validate_batch(config, sharding.batch_divisor(mesh, rules))
  batch_size, image_size = config.input.global_batch_size, config.input.image_size
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
  model = get_model(config.model_name, **config_utils.model_kwargs(config))
  with config_utils.config_errors("optimizer"):
    tx = optim.create_optimizer(config.optimizer, schedule, abstract_params(model, image_size))
  # The config is known to be consistent only now: an invalid one leaves the workdir as it was.
  if is_main:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  writer = writers.create_default_writer(workdir, just_logging=not is_main)
  logging.info(
    "%d devices, mesh %s; %d steps of %d images (%.2f epochs), %d warmup steps.",
    jax.device_count(),
    dict(mesh.shape),
    total_steps,
    batch_size,
    total_steps / steps_per_epoch,
    warmup_steps,
  )

  with sharding.use_mesh(mesh, rules):
    abstract, specs = abstract_train_state(model, tx, image_size)
    shardings = sharding.state_shardings(specs, abstract, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    train_iter = pipeline.make_train_iterator(config.input, seed=config.seed)
    checkpointer = checkpointing.Checkpointer(
      workdir / "checkpoints",
      max_to_keep=config.checkpoint.max_to_keep,
      keep_period=config.checkpoint.keep_period,
      async_save=config.checkpoint.async_save,
    )
    state = checkpointer.restore_latest(with_shardings(abstract, shardings), train_iter)
    if state is None:
      pretrained = None
      if config.init.checkpoint:
        pretrained = adapt_pretrained(load_pretrained(config), abstract.params)
      state = create_train_state(model, tx, image_size, config.seed, shardings, pretrained)
    step = int(jax.device_get(state.step))
    logging.info(
      "%s at step %d; %s parameters.",
      "Resuming" if step else "Starting",
      step,
      f"{sum(x.size for x in jax.tree.leaves(abstract.params)):,}",
    )

    if step < total_steps:  # Compiled ahead of time, for its FLOP count.
      train_step = compile_train_step(
        config, model, tx, schedule, abstract, shardings, batch_sharding
      )
      flops_per_step = compiled_flops(train_step)
    evaluator = make_evaluator(model, shardings.params, batch_sharding)
    rr_evaluator = None
    # It measures the MSSA subspaces: CRATE and CRATE-alpha only.
    if config.model_name in ("crate", "crate_alpha") and config.rate_reduction_num_images:
      rr_evaluator = rate_reduction.RateReductionEvaluator(
        model,
        _fixed_images(config.input, config.rate_reduction_num_images),
        jit=_rate_reduction_jit(),
      )
      if is_main:
        rate_reduction.write_tensorboard_layout(writer)

    report_progress = periodic.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    hooks = [report_progress]
    if is_main and config.profile.num_steps:
      hooks.append(
        periodic.Profile(
          logdir=workdir,
          num_steps=config.profile.num_steps,
          first_step=config.profile.first_step,
          every_secs=config.profile.every_secs,
        )
      )

    def due(every: int) -> bool:
      return bool(every) and step % every == 0

    def run_evaluations(final: bool) -> None:
      if final or due(config.eval_every_steps):
        with report_progress.timed("eval"):
          results = evaluate(evaluator, state.params, config.input, batch_sharding)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
      if rr_evaluator and (final or due(config.rate_reduction_every_steps)):
        with report_progress.timed("rate_reduction"):
          writer.write_scalars(step, rr_evaluator.run(state.params, step=step))

    last_checkpoint = checkpointer.latest_step()
    train_metrics = previous = None
    timer = (time.perf_counter(), step)  # Start of the throughput window.
    try:
      with checkpointing.PreemptionWatcher(checkpointer.manager) as preemption:
        while step < total_steps:
          with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = sharding.put_batch(next(train_iter), batch_sharding)
            state, step_metrics = train_step(state, batch)
          step += 1
          # The previous step has (nearly) finished: checking it does not stall the device.
          if previous is not None:
            _check_finite(*previous, last_checkpoint)
          previous = (step, step_metrics)
          train_metrics = (
            step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
          )
          for hook in hooks:
            hook(step)

          if due(config.log_every_steps) or step == total_steps:
            _check_finite(step, step_metrics, last_checkpoint)
            steps_per_sec = (step - timer[1]) / (time.perf_counter() - timer[0])
            writer.write_scalars(
              step,
              {
                **{f"train/{k}": v for k, v in jax.device_get(train_metrics.compute()).items()},
                **_throughput(
                  steps_per_sec, batch_size, flops_per_step, config.peak_tflops_per_device
                ),
              },
            )
            train_metrics, timer = None, (time.perf_counter(), step)

          preempted = preemption.reached(step)
          if preempted or step == total_steps or due(config.checkpoint_every_steps):
            _check_finite(step, step_metrics, last_checkpoint)  # Never save a diverged state.
            with report_progress.timed("checkpoint"):
              checkpointer.save(step, state, train_iter)
            last_checkpoint = step
          if preempted:
            logging.warning("Preempted: saved the checkpoint of step %d and stopping.", step)
            return state
          if step < total_steps and (
            due(config.eval_every_steps) or due(config.rate_reduction_every_steps)
          ):
            run_evaluations(final=False)
            timer = (time.perf_counter(), step)  # Keeps evaluation out of the throughput.

      run_evaluations(final=True)
      if rr_evaluator and is_main:
        path = workdir / "rate_reduction.png"
        rr_evaluator.plot(path, title=f"{config.model_name} on {config.input.dataset}")
        logging.info("Wrote the layer-wise rate-reduction plot %s.", path)
    finally:
      checkpointer.wait()  # A save in flight (of a good state) completes, also on errors.
      checkpointer.close()
      writer.close()
  return state
