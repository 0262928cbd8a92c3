"""Everything crate_jax does only for XLA:CPU's sake, in one module.

The math (`crate_jax.ops`) is written once, as the papers state it; this module holds the
CPU-specific code around it, each piece with the reason it exists. Measurements behind
these choices are in `benchmarks/README.md`.

* `kernels()`: the one switch for traced code. Inside it, `ops.subspace_attention` lowers
  to `subspace_attention` below: the same values, with XLA:CPU-friendly matmul epilogues
  and a hand-written reverse-mode rule (no forward mode: `jax.jvp` needs the plain path,
  which is the default outside the switch). The trainer traces its train step and its
  evaluators inside it; on GPU and TPU the kernel lowers to the plain products.
* `reuse_freed_memory()`: glibc malloc settings so that XLA:CPU steps reuse their buffers.
* `use_cpu_devices(n)`: a CPU host as `n` single-threaded XLA devices (data parallel).
* `eager_on_cpu(jit)`: how to compile the log-determinant measurements on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import os

from absl import logging
import jax
import jax.numpy as jnp

Array = jax.Array

_KERNELS = contextvars.ContextVar("crate_jax_xla_cpu_kernels", default=False)


@contextlib.contextmanager
def kernels(enabled: bool = True) -> Iterator[None]:
  """While active, functions traced use the CPU-tuned attention kernel (reverse mode only).

  Read at trace time: wrap the tracing (`jax.jit(...).lower(...)`, or the first call of a
  jitted function), not later calls of an already compiled function.
  """
  token = _KERNELS.set(enabled)
  try:
    yield
  finally:
    _KERNELS.reset(token)


def kernels_enabled() -> bool:
  return _KERNELS.get()


# --------------------------------------------------------------------------------------
# Attention kernel.
# --------------------------------------------------------------------------------------


def _on_cpu(fn: Callable[[Array], Array], x: Array) -> Array:
  """`fn(x)` when lowering for CPU, `x` for other backends (`fn` must preserve values)."""
  return jax.lax.platform_dependent(x, cpu=fn, default=lambda x: x)


def _add_exact_zero_row_reduction(y: Array) -> Array:
  """`y` itself, with a reduction of its rows attached.

  XLA:CPU (YNNPACK fusions) runs a batched matmul followed by a reduction of its rows on
  all threads with a faster kernel, but a bare batched matmul on one thread. The added
  term is exactly +-0 for every row, also rows holding inf or NaN (where `0 * max` would
  be NaN), so values, infs and NaNs are those of the plain product.
  """
  m = jnp.max(y, axis=-1, keepdims=True)
  return y + jnp.where(jnp.isfinite(m), 0 * m, 0)


def _batched_matmul(subscripts: str, a: Array, b: Array) -> Array:
  return _on_cpu(_add_exact_zero_row_reduction, jnp.einsum(subscripts, a, b))


# Up to this many tokens the backward writes A^T out before `A^T G` (YNNPACK fusions take
# no transposed operand); for longer sequences the extra copy costs more than it saves.
_WRITE_OUT_ATTN_T_MAX_TOKENS = 128


def _softmax_attention(w: Array, scale: float) -> tuple[Array, Array]:
  logits = jnp.einsum("...qp,...sp->...qs", w, w) * scale
  attn = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  attn = attn.astype(w.dtype)
  return _batched_matmul("...qs,...sp->...qp", attn, w), attn


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def subspace_attention(w: Array, scale: float) -> tuple[Array, Array]:
  """`ops.subspace_attention` (same values) tuned for XLA:CPU; reverse-mode autodiff only.

  The backward pass uses the symmetry of the logits `L = scale W W^T`:
  `dW = A^T G + scale (dL + dL^T) W`, three matmuls.
  """
  return _softmax_attention(w, scale)


def _attention_fwd(w, scale):
  out, attn = _softmax_attention(w, scale)
  return (out, attn), (w, attn)


def _attention_bwd(scale, residuals, cotangents):
  w, attn = residuals
  g_out, g_attn = cotangents
  g_attn = jnp.einsum("...qp,...sp->...qs", g_out, w) + g_attn
  # Softmax backward in float32 (as the forward), then back to the activation dtype.
  a = attn.astype(jnp.promote_types(attn.dtype, jnp.float32))
  g_attn = g_attn.astype(a.dtype)
  g_logits = (a * (g_attn - jnp.sum(g_attn * a, axis=-1, keepdims=True))).astype(w.dtype)
  swap = lambda x: jnp.swapaxes(x, -1, -2)
  attn_t = swap(attn)  # XLA folds this transpose into the product below...
  if attn.shape[-1] <= _WRITE_OUT_ATTN_T_MAX_TOKENS:  # ...unless it is written out first.
    attn_t = jax.lax.platform_dependent(
      attn, cpu=lambda a: jax.lax.optimization_barrier(swap(a)), default=swap
    )
  g_w = _batched_matmul("...sq,...qp->...sp", attn_t, g_out)
  g_w += scale * _batched_matmul("...qs,...sp->...qp", g_logits + swap(g_logits), w)
  return (g_w,)


subspace_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------------------


def eager_on_cpu(jit: Callable[[Callable], Callable] = jax.jit) -> Callable[[Callable], Callable]:
  """`jit` on accelerators; op by op (no compilation of the whole function) on CPU.

  On XLA:CPU (jaxlib 0.10) independent LAPACK Cholesky calls of one program run
  concurrently, each waiting for work queued on the same intra-op thread pool: with as
  few pool threads as concurrent calls (2 cores) the program deadlocks. Dispatched op by
  op, one Cholesky runs at a time. For the log-determinant measurements.
  """
  return (lambda f: f) if jax.default_backend() == "cpu" else jit


# --------------------------------------------------------------------------------------
# Process settings: call before JAX starts its backends.
# --------------------------------------------------------------------------------------

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
  except (OSError, AttributeError):
    return None  # Not glibc (musl, macOS): other allocators, nothing to set.
  return libc


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory: one arena, no `mmap`, no trimming.

  XLA:CPU allocates one block per execution for a step's temporaries (mostly the
  activations kept for the backward pass). glibc serves a block that large with a fresh
  `mmap` and unmaps it when the step ends, so every step page-faults its whole working set
  again. With these settings the next step gets the same, already mapped, pages. The cost
  is that the process keeps its peak heap, which is what a training process wants. Call
  it before JAX starts its threads; it does nothing where the C library is not glibc.

  Returns:
    True if the settings were applied.
  """
  libc = _glibc()
  if libc is None:
    logging.info("Not glibc: leaving the host allocator as it is.")
    return False
  settings = {
    "M_ARENA_MAX": (_M_ARENA_MAX, 1),
    "M_MMAP_MAX": (_M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, _INT_MAX),
  }
  failed = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
  if failed:
    logging.warning("mallopt refused %s; step buffers may be page-faulted in every step.", failed)
    return False
  return True


_SINGLE_THREADED = "--xla_cpu_multi_thread_eigen=false"


def use_cpu_devices(count: int) -> None:
  """Makes XLA:CPU `count` devices that each run single-threaded (one per core, say).

  One multi-threaded device runs some ops (the batched matmuls of attention) on one
  thread and pays a split and a join for every multi-threaded op; `count` devices train
  data parallel instead, each computing the whole step on its share of the batch. Call it
  before JAX initialises its backends. Other platforms are unaffected.

  Raises:
    ValueError: `count < 1`.
    RuntimeError: JAX's backends are already initialised.
  """
  if count < 1:
    raise ValueError(f"cpu_devices must be >= 1, got {count}.")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:
    raise RuntimeError(
      f"Cannot make {count} CPU devices: JAX has already initialised its backends. Call "
      "crate_jax.xla_cpu.use_cpu_devices() before the first JAX computation."
    ) from e
  flags = os.environ.get("XLA_FLAGS", "")
  if _SINGLE_THREADED not in flags.split():
    os.environ["XLA_FLAGS"] = f"{flags} {_SINGLE_THREADED}".strip()
