"""The train state and the train step, created and compiled in their shardings; task-agnostic.

    mesh, rules = sharding.create_mesh(config), sharding.logical_rules(config)
    with sharding.use_mesh(mesh, rules):  # Active while tracing: the models' constraints.
      abstract, specs = abstract_train_state(model, tx, image_size)
      shardings = sharding.state_shardings(specs, abstract, mesh, rules)
      state = create_train_state(model, tx, image_size, seed, shardings)
      train_step = make_train_step(task, model, tx, schedule, shardings, batch_sharding)
      state, metrics, health = train_step(state, sharding.put_batch(batch, batch_sharding))

What is task-specific (the loss, the batch, extra metrics) comes from a `crate_jax.tasks`
task; everything here works for any of them.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

from clu import metrics
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from crate_jax import xla_cpu
from crate_jax.tasks import base as tasks_base

# A step whose update is this many times larger than the parameters it updates has
# exploded, however finite its numbers (e.g. a learning rate of 1e30).
EXPLODED_UPDATE_RATIO = 10.0


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Optimizer updates done.
  params: Any
  opt_state: optax.OptState
  rng: jax.Array  # Base key; step `s` uses `fold_in(rng, s)`.


def _init_params(model: nn.Module, rng: jax.Array, image_size: int) -> Any:
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  rngs = {"params": rng, **{stream: rng for stream in model.RNG_STREAMS}}
  return model.init(rngs, images, train=False)["params"]


def _unbox_shapes(boxed: Any) -> Any:
  """Removes the logical-axis boxes of shapes (`nn.unbox` would add sharding constraints)."""
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) else x,
    boxed,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def _abstract_key() -> jax.ShapeDtypeStruct:
  return jax.eval_shape(jax.random.PRNGKey, 0)


def abstract_params(model: nn.Module, image_size: int) -> Any:
  """The model's parameters as `ShapeDtypeStruct`s, without computing them.

  Nothing is placed on a device, not even the key: the AOT check may run where the default
  backend is a compile-only TPU topology.
  """
  init = functools.partial(_init_params, model, image_size=image_size)
  return _unbox_shapes(jax.eval_shape(init, _abstract_key()))


def abstract_train_state(
  model: nn.Module, tx: optax.GradientTransformation, image_size: int
) -> tuple[TrainState, TrainState]:
  """Shapes of the train state and the logical PartitionSpec of every leaf.

  Parameters carry their logical axis names from the model; the optimizer's
  parameter-shaped leaves (moments) take those of their parameter, the rest (counts,
  step, rng) are replicated.
  """
  init = functools.partial(_init_params, model, image_size=image_size)
  boxed = jax.eval_shape(init, _abstract_key())
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


# --------------------------------------------------------------------------------------
# The train step.
# --------------------------------------------------------------------------------------


def metrics_collection(task: tasks_base.Task) -> type[metrics.Collection]:
  """The per-step metrics: the core's (loss, learning rate, norms) and the task's."""
  return metrics.Collection.create(
    loss=metrics.Average.from_output("loss"),
    learning_rate=metrics.LastValue.from_output("learning_rate"),
    grad_norm=metrics.Average.from_output("grad_norm"),
    param_norm=metrics.LastValue.from_output("param_norm"),
    update_norm=metrics.Average.from_output("update_norm"),
    **{name: metrics.Average.from_output(name) for name in task.METRICS},
  )


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _microbatches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
  """`[B, ...] -> [num, B / num, ...]`, microbatch `i` holding rows `i, i + num, ...`.

  Strided rather than contiguous: each device's shard of the batch holds rows of every
  microbatch, so splitting needs no communication.
  """
  return jax.tree.map(
    lambda x: jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1), batch
  )


def make_train_step(
  task: tasks_base.Task,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  state_shardings: TrainState,
  batch_sharding: NamedSharding,
  *,
  grad_accum_steps: int = 1,
) -> Callable:
  """`train_step(state, batch) -> (state, metrics, health)`, jitted and donating the state.

  `metrics` is a `metrics_collection(task)` of this step. `health` holds what the loop
  checks before it trusts (and saves) the new state: the loss and gradient norm, whether
  the batch and the updated parameters and optimizer state are finite, and whether the
  update exploded (see `EXPLODED_UPDATE_RATIO`).

  With `grad_accum_steps > 1` the batch is split into that many microbatches whose
  gradients are averaged inside the step (`lax.scan`): one update equal to a step on the
  whole batch, with the activation memory of one microbatch.
  """
  collection = metrics_collection(task)

  def loss_fn(params, batch, rng):
    rngs = {stream: jax.random.fold_in(rng, i) for i, stream in enumerate(model.RNG_STREAMS)}
    return task.loss(model, params, batch, rngs)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (loss, task_metrics), grads = grad_fn(state.params, batch, rng)
    else:

      def accumulate(carry, xs):
        index, microbatch = xs
        (loss, task_metrics), grads = grad_fn(
          state.params, microbatch, jax.random.fold_in(rng, index)
        )
        return jax.tree.map(jnp.add, carry, (grads, loss, task_metrics)), None

      microbatches = _microbatches(batch, grad_accum_steps)
      first = jax.tree.map(lambda x: x[0], microbatches)
      (loss_shape, metrics_shape), grads_shape = jax.eval_shape(grad_fn, state.params, first, rng)
      zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, loss_shape, metrics_shape)
      )
      (grads, loss, task_metrics), _ = jax.lax.scan(
        accumulate,
        zeros,
        (jnp.arange(grad_accum_steps), microbatches),
      )
      grads, loss, task_metrics = jax.tree.map(
        lambda x: x / grad_accum_steps, (grads, loss, task_metrics)
      )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    old_norm, update_norm = optax.tree.norm(state.params), optax.tree.norm(updates)
    step_metrics = collection.single_from_model_output(
      loss=loss,
      learning_rate=schedule(state.step),
      grad_norm=optax.tree.norm(grads),
      param_norm=optax.tree.norm(params),
      update_norm=update_norm,
      **task_metrics,
    )
    health = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "batch_finite": _all_finite(batch),
      "state_finite": _all_finite((params, opt_state)),
      "exploded": update_norm > EXPLODED_UPDATE_RATIO * old_norm,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, step_metrics, health

  replicated = NamedSharding(batch_sharding.mesh, P())
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated, replicated),
    donate_argnums=0,
  )


def compile_train_step(
  task: tasks_base.Task,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  abstract: TrainState,
  shardings: TrainState,
  batch_sharding: NamedSharding,
  *,
  batch_size: int,
  grad_accum_steps: int = 1,
) -> Any:
  """`make_train_step`, compiled ahead of time for the abstract state and the task's batch.

  Traced inside `xla_cpu.kernels()`: a train step needs reverse-mode autodiff only.
  """
  step = make_train_step(
    task, model, tx, schedule, shardings, batch_sharding, grad_accum_steps=grad_accum_steps
  )
  batch = with_shardings(
    task.batch_spec(batch_size), {k: batch_sharding for k in task.batch_spec(batch_size)}
  )
  with xla_cpu.kernels():
    return step.lower(with_shardings(abstract, shardings), batch).compile()


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled (per-device) program, where the backend reports them."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Unimplemented on some backends.
    return None
  if isinstance(cost, list | tuple):  # Older jax: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None
