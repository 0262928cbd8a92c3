"""The CRATE math as pure functions: coding rates, sparse coding and subspace attention.

Everything here is a plain function of arrays, importable in a notebook without building a
model, and works under `jit`, `vmap` and `grad`. Conventions:

* Tokens are rows. A sequence is `Z` of shape `(N, d)`; every function accepts any number
  of leading batch dimensions, written `...`.
* `U` is the subspace projection of shape `(d, K, p)`: `K` heads (subspaces) of width `p`.
  `K * p` need not equal `d`. The published code stores it as a `(K*p, d)` Linear weight
  (head-major); `U = W.T.reshape(d, K, p)`.
* A dictionary `D` has shape `(d, m)` and acts on row codes `a` (shape `(..., m)`) as
  `a @ D.T`, i.e. `D a` in column notation. CRATE uses `m = d`, CRATE-alpha `m = 4 d`.
* Log-determinants are always taken in float32 or higher (Cholesky of an SPD matrix),
  whatever the input dtype, so bf16 activations measure safely.
* Products of tokens with a weight matrix go through `token_matmul`, on the 2D
  `(tokens, d)` view of the activations (see there why).
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


def token_matmul(x: Array, w: Array) -> Array:
  """`x @ w` for tokens `x` of shape `(..., d)` and a matrix `w` of shape `(d, e)`.

  Computed as one 2D matmul of the `(tokens, d)` view, which gives the same values as the
  batched form and matters for speed: the weight gradient of a batched `(B, N, d)` product
  contracts two axes (batch and tokens), and XLA:CPU then writes a transposed copy of the
  activations for it (also the transposes into and out of the heads-first attention
  layout). On the 2D view every matmul, forward and backward, runs on row-major operands.
  Measured on the benchmark's small CRATE (2 cores): train step 862 -> 657 ms.
  """
  chex.assert_rank(w, 2)
  chex.assert_equal(x.shape[-1], w.shape[0])
  y = x.reshape(-1, x.shape[-1]) @ w
  return y.reshape(x.shape[:-1] + w.shape[-1:])


# --------------------------------------------------------------------------------------
# Coding rates.
# --------------------------------------------------------------------------------------


def _measure_dtype(x: Array) -> jnp.dtype:
  """float32 or float64: never measure a log-determinant in low precision."""
  return jnp.promote_types(x.dtype, jnp.float32)


def logdet_identity_plus_gram(x: Array, alpha: Array | float) -> Array:
  """`logdet(I + alpha * X^T X)` for `x` of shape `(..., N, q)`, via the smaller Gram.

  By Sylvester's identity `det(I_q + a X^T X) = det(I_N + a X X^T)`, so the `min(N, q)`
  sized Gram is used. The matrix is symmetric positive definite; its Cholesky factor `L`
  gives `logdet = 2 * sum(log(diag(L)))`. Computed in float32 (or float64).
  """
  x = x.astype(_measure_dtype(x))
  n, q = x.shape[-2:]
  gram = (jnp.swapaxes(x, -1, -2) @ x) if q <= n else (x @ jnp.swapaxes(x, -1, -2))
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  chol = jnp.linalg.cholesky(eye + alpha * gram)
  return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def coding_rate(z: Array, eps: float = 0.5) -> Array:
  """Coding rate `R_eps(Z) = 1/2 logdet(I_d + d / (N eps^2) Z^T Z)`.

  Args:
    z: tokens, shape `(..., N, d)`.
    eps: quantisation precision.

  Returns:
    `R` per sequence, shape `(...)`, float32 or higher.
  """
  chex.assert_rank(z, {2, 3, 4, 5})
  n, d = z.shape[-2:]
  return 0.5 * logdet_identity_plus_gram(z, d / (n * eps**2))


def head_projections(z: Array, u: Array) -> Array:
  """Projections onto the K subspaces, `W_k = Z U_k`: `(..., N, d) x (d, K, p) -> (..., N, K, p)`."""
  chex.assert_rank(u, 3)
  chex.assert_equal(z.shape[-1], u.shape[0])
  d, k, p = u.shape
  return token_matmul(z, u.reshape(d, k * p)).reshape(z.shape[:-1] + (k, p))


def _tokens_major(w: Array) -> Array:
  """`(..., K, N, p) -> (..., N, K * p)`: heads side by side in each token's row."""
  *lead, k, n, p = w.shape
  return jnp.moveaxis(w, -3, -2).reshape(*lead, n, k * p)


def _heads_first(w: Array) -> Array:
  """`(..., N, K, p) -> (..., K, N, p)`."""
  return jnp.moveaxis(w, -2, -3)


def compression_rate(z: Array, u: Array, eps: float = 0.5) -> Array:
  """Compression term `R^c_eps(Z | U) = sum_k 1/2 logdet(I + p / (N eps^2) (Z U_k)^T (Z U_k))`.

  The factor is `p` (the subspace dimension), not `d`.

  Args:
    z: tokens, shape `(..., N, d)`.
    u: subspace bases, shape `(d, K, p)`.
    eps: quantisation precision.

  Returns:
    `R^c` per sequence, shape `(...)`.
  """
  n = z.shape[-2]
  p = u.shape[-1]
  w = _heads_first(head_projections(z, u))  # (..., K, N, p)
  return 0.5 * jnp.sum(logdet_identity_plus_gram(w, p / (n * eps**2)), axis=-1)


def sparse_rate_reduction(z: Array, u: Array, lam: float = 0.1, eps: float = 0.5) -> Array:
  """Sparse rate reduction `R(Z) - R^c(Z | U) - lam ||Z||_1` (l0 relaxed to l1), per sequence."""
  return coding_rate(z, eps) - compression_rate(z, u, eps) - lam * l1_norm(z)


def published_compression_measure(head_proj: Array, eps_sq: float = 0.01) -> Array:
  """The per-layer compression measurement plotted in the CRATE papers.

  Each token's head projection `x_{k,n}` (a p-vector) is normalised to unit l2 norm, then
  per image `0.5 * sum_k logdet(I_N + p / (N eps^2) X_k X_k^T)` with `eps^2 = 0.01`.

  Args:
    head_proj: `LN1(Z) @ U` split into heads, shape `(..., N, K, p)` (CLS token included).
    eps_sq: `eps^2`.

  Returns:
    The measurement per image, shape `(...)`.
  """
  chex.assert_rank(head_proj, {3, 4, 5})
  n, _, p = head_proj.shape[-3:]
  x = head_proj.astype(_measure_dtype(head_proj))
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return 0.5 * jnp.sum(logdet_identity_plus_gram(_heads_first(x), p / (n * eps_sq)), axis=-1)


# --------------------------------------------------------------------------------------
# Sparsity and sparse coding.
# --------------------------------------------------------------------------------------


def _reduce_all_but_leading(x: Array, batch_dims: int) -> tuple[int, ...]:
  return tuple(range(batch_dims, x.ndim))


def nonzero_fraction(z: Array, batch_dims: int = 1) -> Array:
  """Fraction of non-zero entries of `z` per example (the first `batch_dims` axes kept)."""
  return jnp.mean((z != 0).astype(jnp.float32), axis=_reduce_all_but_leading(z, batch_dims))


def l1_norm(z: Array, batch_dims: int | None = None) -> Array:
  """`||Z||_1 = sum |z_ij|` per sequence; by default sums the last two axes `(N, d)`."""
  axes = (-2, -1) if batch_dims is None else _reduce_all_but_leading(z, batch_dims)
  return jnp.sum(jnp.abs(z.astype(_measure_dtype(z))), axis=axes)


def lasso_objective(x: Array, a: Array, dictionary: Array, lam: float) -> Array:
  """LASSO objective `lam ||a||_1 + 1/2 ||x - D a||_2^2`, summed over the last axis.

  Args:
    x: signals, `(..., d)`.
    a: codes, `(..., m)`.
    dictionary: `D`, `(d, m)`.
    lam: sparsity weight.

  Returns:
    The objective per row, shape `(...)`. For the non-negative LASSO, the constraint
    `a >= 0` is the caller's to check (ISTA iterates below always satisfy it).
  """
  chex.assert_equal(a.shape[-1], dictionary.shape[-1])
  residual = x - token_matmul(a, dictionary.T)
  return lam * jnp.sum(jnp.abs(a), axis=-1) + 0.5 * jnp.sum(residual**2, axis=-1)


def ista_step(x: Array, a: Array, dictionary: Array, eta: float, lam: float) -> Array:
  """One non-negative ISTA (proximal gradient) step on the LASSO objective.

  `a+ = ReLU(a - eta * D^T (D a - x) - eta * lam)`, written for row codes as
  `ReLU(a - eta * (a @ D^T - x) @ D - eta * lam)`: two matmuls. For `eta <= 1/||D||_2^2`
  the non-negative LASSO objective does not increase.

  Args:
    x: signals, `(..., d)`.
    a: current codes, `(..., m)`.
    dictionary: `D`, `(d, m)`.
    eta: step size.
    lam: sparsity weight.
  """
  chex.assert_equal(x.shape[-1], dictionary.shape[0])
  chex.assert_equal(a.shape[-1], dictionary.shape[1])
  residual = token_matmul(a, dictionary.T) - x
  return jax.nn.relu(a - eta * token_matmul(residual, dictionary) - eta * lam)


def crate_ista(x: Array, dictionary: Array, eta: float = 0.1, lam: float = 0.1) -> Array:
  """CRATE's sparse-coding layer: one ISTA step started at `a = x` (square `D`).

  `Z+ = ReLU(x + eta * (x - x @ D^T) @ D - eta * lam)`, which equals the published
  three-matmul form `ReLU(x + eta * (x @ D - x @ D^T @ D) - eta * lam)`, where `D` is the
  published `fn.weight`. There is no residual connection around this step.

  When there are more tokens than the width `d` (training batches), the two token matmuls
  are folded into one, `x @ (D - D^T D)`: the `d x d` product costs less than a pass over
  the tokens, and the backward pass then needs two token matmuls instead of four.
  """
  d = x.shape[-1]
  chex.assert_shape(dictionary, (d, d))
  if math.prod(x.shape[:-1]) <= d:
    return ista_step(x, x, dictionary, eta, lam)
  folded = dictionary - dictionary.T @ dictionary
  return jax.nn.relu(x + eta * token_matmul(x, folded) - eta * lam)


def crate_ista_three_matmul(
  x: Array, dictionary: Array, eta: float = 0.1, lam: float = 0.1
) -> Array:
  """The published code's literal form of `crate_ista` (three matmuls; reference only)."""
  return jax.nn.relu(x + eta * (x @ dictionary - x @ dictionary.T @ dictionary) - eta * lam)


def overcomplete_ista(
  x: Array,
  dictionary: Array,
  decoder: Array,
  eta: float = 0.1,
  lam: float = 0.1,
  num_steps: int = 2,
) -> Array:
  """CRATE-alpha's overcomplete dictionary learning (ODL) block.

  Sparse codes from `a_0 = 0` with `num_steps` ISTA steps on the overcomplete `D`
  (`(d, m)`, `m > d`), then decoded by the decoupled dictionary `D1`:
  `a_1 = ReLU(eta * x @ D - eta * lam)`, `a_{t+1} = ReLU(a_t - eta (a_t @ D^T - x) @ D - eta lam)`,
  output `a_T @ D1^T`. The published block uses `num_steps = 2`.

  Args:
    x: `(..., d)`.
    dictionary: `D`, `(d, m)`.
    decoder: `D1`, `(d, m)`.
  """
  chex.assert_equal_shape([dictionary, decoder])
  if num_steps < 1:
    raise ValueError(f"overcomplete_ista needs num_steps >= 1, got {num_steps}.")
  a = jnp.zeros(x.shape[:-1] + dictionary.shape[1:], x.dtype)
  for _ in range(num_steps):
    a = ista_step(x, a, dictionary, eta, lam)
  return token_matmul(a, decoder.T)


# --------------------------------------------------------------------------------------
# Multi-head subspace self-attention (MSSA).
# --------------------------------------------------------------------------------------


def _on_cpu(fn, x: Array, default=lambda x: x) -> Array:
  """`fn(x)` when lowering for CPU, `default(x)` for other backends (same value)."""
  return jax.lax.platform_dependent(x, cpu=fn, default=default)


def _batched_matmul(subscripts: str, a: Array, b: Array) -> Array:
  """`jnp.einsum(subscripts, a, b)` for the per-head matmuls of attention.

  On CPU the product is returned fused with a zero-valued row reduction,
  `y + 0 * max(y, axis=-1)`: the same values (a row with an infinite entry becomes NaN). XLA:CPU
  (YNNPACK fusions, jax 0.10) runs a batched matmul followed by a reduction of its rows
  over the batch on all threads with a faster kernel, and a bare batched matmul on one
  thread: for the benchmark's 65-token heads, `attn @ W` takes 4.4 ms instead of 7.5 ms
  on 2 cores (5.6 instead of 7.5 on one). Other backends get the plain product.
  """
  y = jnp.einsum(subscripts, a, b)
  return _on_cpu(lambda y: y + 0 * jnp.max(y, axis=-1, keepdims=True), y)


_WRITE_OUT_ATTN_T_MAX_TOKENS = 128  # See _attention_bwd.


def _attention_forward(w: Array, scale: float) -> tuple[Array, Array]:
  logits = jnp.einsum("...qp,...sp->...qs", w, w) * scale
  attn = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  attn = attn.astype(w.dtype)
  return _batched_matmul("...qs,...sp->...qp", attn, w), attn


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def subspace_attention_heads_first(w: Array, scale: float) -> tuple[Array, Array]:
  """Per-head self-attention with query = key = value = `w`, heads-first layout.

  `A_k = softmax(scale * W_k W_k^T)` over keys, output `A_k W_k`.

  The gradient is written by hand to use the symmetry of `W_k W_k^T`: with `L` the logits,
  `dW = A^T G + scale (dL + dL^T) W`, three matmuls where autodiff of the generic query /
  key / value form takes four. Differentiable in reverse mode (`grad`, `vjp`), not forward.

  Args:
    w: head projections, `(..., K, N, p)`.
    scale: logit scale (`1/sqrt(p)` in the published code, 1 in the paper).

  Returns:
    `(out, attn)`: `out` of shape `(..., K, N, p)` and `attn` of shape `(..., K, N, N)`
    (rows are queries).
  """
  return _attention_forward(w, scale)


def _attention_fwd(w, scale):
  out, attn = _attention_forward(w, scale)
  return (out, attn), (w, attn)


def _attention_bwd(scale, residuals, cotangents):
  w, attn = residuals
  g_out, g_attn = cotangents
  g_attn = jnp.einsum("...qp,...sp->...qs", g_out, w) + g_attn
  # Softmax backward in float32 (as the forward), then back to the activation dtype.
  a = attn.astype(jnp.promote_types(attn.dtype, jnp.float32))
  g_attn = g_attn.astype(a.dtype)
  g_logits = (a * (g_attn - jnp.sum(g_attn * a, axis=-1, keepdims=True))).astype(w.dtype)
  swap = lambda a: jnp.swapaxes(a, -1, -2)
  attn_t = swap(attn)  # XLA folds this transpose into the product below...
  if attn.shape[-1] <= _WRITE_OUT_ATTN_T_MAX_TOKENS:
    # ...but on CPU A^T is better written out: XLA:CPU's YNNPACK fusions take no transposed
    # operand, and A^T G otherwise runs as a stand-alone dot (65 tokens: 11.3 vs 8.2 ms,
    # train step 7-8% faster; 197 tokens: the extra copy made the step 8% slower).
    attn_t = _on_cpu(lambda a: jax.lax.optimization_barrier(swap(a)), attn, default=swap)
  g_w = _batched_matmul("...sq,...qp->...sp", attn_t, g_out)
  g_w += scale * _batched_matmul("...qs,...sp->...qp", g_logits + swap(g_logits), w)
  return (g_w,)


subspace_attention_heads_first.defvjp(_attention_fwd, _attention_bwd)


def subspace_self_attention(w: Array, scale: float) -> tuple[Array, Array]:
  """`subspace_attention_heads_first` for head projections in token-major layout.

  Args:
    w: head projections, `(..., N, K, p)` (as `head_projections` returns them).
    scale: logit scale.

  Returns:
    `(out (..., N, K, p), attn (..., K, N, N))`.
  """
  out, attn = subspace_attention_heads_first(jnp.swapaxes(w, -2, -3), scale)
  return jnp.swapaxes(out, -2, -3), attn


def mssa_published(
  x: Array, u: Array, out_kernel: Array, out_bias: Array | None
) -> tuple[Array, Array, Array]:
  """MSSA as the published code computes it (untied, scaled, biased output).

  `W = x U`, `A_k = softmax(W_k W_k^T / sqrt(p))`, output `(concat_k A_k W_k) O + o`.

  Args:
    x: normalised tokens `LN1(Z)`, `(..., N, d)`.
    u: `(d, K, p)`.
    out_kernel: `O`, `(K, p, d_out)`.
    out_bias: `o`, `(d_out,)` or None.

  Returns:
    `(output (..., N, d_out), head projections (..., N, K, p), attention (..., K, N, N))`.
    The head projections are an intermediate of the computation: returning them is free.
  """
  chex.assert_equal(u.shape[1:], out_kernel.shape[:2])
  k, p, d_out = out_kernel.shape
  w = head_projections(x, u)
  heads, attn = subspace_attention_heads_first(_heads_first(w), p**-0.5)
  y = token_matmul(_tokens_major(heads), out_kernel.reshape(k * p, d_out))
  if out_bias is not None:
    y = y + out_bias
  return y, w, attn


def mssa_paper(z: Array, u: Array) -> tuple[Array, Array, Array]:
  """Paper-form `MSSA(Z) = [U_1..U_K] [SSA_1; ..; SSA_K]`, `SSA_k = (U_k^T Z) softmax((U_k^T Z)^T (U_k^T Z))`.

  Output tied to `U`, no logit scale. In row form: `sum_k softmax(W_k W_k^T) W_k U_k^T`.

  Returns:
    `(MSSA(Z) (..., N, d), head projections, attention)`.
  """
  d, k, p = u.shape
  w = head_projections(z, u)
  heads, attn = subspace_attention_heads_first(_heads_first(w), 1.0)
  return token_matmul(_tokens_major(heads), u.reshape(d, k * p).T), w, attn


def mssa_paper_step(z: Array, u: Array, kappa: float, eps: float) -> tuple[Array, Array, Array]:
  """The paper's compression step `(1 - c) Z + c MSSA(Z)` with `c = kappa p / (N eps^2)`.

  Returns:
    `(Z^{l+1/2}, head projections, attention)`.
  """
  n, p = z.shape[-2], u.shape[-1]
  c = kappa * p / (n * eps**2)
  mssa, w, attn = mssa_paper(z, u)
  return (1.0 - c) * z + c * mssa, w, attn
