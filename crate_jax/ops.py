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
* Every function is differentiable in reverse and forward mode (`grad`, `jvp`, `jacfwd`).
  Backend-specific speed code lives in `crate_jax.xla_cpu`, never here; the one place
  that defers to it is `subspace_attention`, inside `xla_cpu.kernels()` only.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import xla_cpu

Array = jax.Array


def _assert_min_rank(x: Array, rank: int, what: str) -> None:
  if x.ndim < rank:
    raise ValueError(f"{what} needs at least {rank} axes, got shape {x.shape}.")


def token_matmul(x: Array, w: Array) -> Array:
  """`x @ w` for tokens `x` of shape `(..., d)` and a matrix `w` of shape `(d, e)`.

  One 2D matmul of the `(tokens, d)` view: the same values as the batched product, and
  every matmul of its backward pass contracts a single axis of row-major operands (no
  transposed copies of the activations for the weight gradient).
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
  _assert_min_rank(z, 2, "z (..., N, d)")
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
  _assert_min_rank(head_proj, 3, "head_proj (..., N, K, p)")
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
  """CRATE's sparse-coding layer: one non-negative ISTA step started at `a = x` (square `D`).

  `Z+ = ReLU(x + eta (x @ D - x @ D^T @ D) - eta lam)`, the published code's form (`D` is
  its `fn.weight`; in column notation `ReLU(x + eta D^T (x - D x) - eta lam)`). There is no
  residual connection around this step. Computed as `ReLU(x + eta x (D - D^T D) - eta lam)`:
  one token matmul instead of three (the `d x d` product `D^T D` is computed once), always,
  whatever the batch, with `D - D^T D` formed in float32 before the cast to `x.dtype`.
  """
  d = x.shape[-1]
  chex.assert_shape(dictionary, (d, d))
  dictionary = dictionary.astype(jnp.promote_types(dictionary.dtype, jnp.float32))
  folded = (dictionary - dictionary.T @ dictionary).astype(x.dtype)
  return jax.nn.relu(x + eta * token_matmul(x, folded) - eta * lam)


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


def subspace_attention(w: Array, scale: float) -> tuple[Array, Array]:
  """Per-head self-attention with query = key = value = `w`, heads-first layout.

  `A_k = softmax(scale W_k W_k^T)` over keys (rows are queries), output `A_k W_k`. The
  softmax is taken in float32 (or higher) whatever the dtype of `w`.

  Args:
    w: head projections, `(..., K, N, p)`.
    scale: logit scale (`1/sqrt(p)` in the published code, 1 in the paper).

  Returns:
    `(out (..., K, N, p), attn (..., K, N, N))`.
  """
  if xla_cpu.kernels_enabled():  # Same values; see crate_jax.xla_cpu.
    return xla_cpu.subspace_attention(w, scale)
  return _subspace_attention(w, scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _subspace_attention(w: Array, scale: float) -> tuple[Array, Array]:
  logits = jnp.einsum("...qp,...sp->...qs", w, w) * scale
  attn = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  attn = attn.astype(w.dtype)
  return jnp.einsum("...qs,...sp->...qp", attn, w), attn


@_subspace_attention.defjvp
def _subspace_attention_jvp(scale, primals, tangents):
  """Tangents written with the symmetry of the logits `L = scale W W^T`.

  `dL = scale (X + X^T)` with `X = dW W^T`. Transposed for reverse mode, this gives
  `dW = A^T G + scale (G_L + G_L^T) W`: three matmuls, where autodiff of the generic
  query/key/value form takes four.
  """
  (w,), (dw,) = primals, tangents
  out, attn = _subspace_attention(w, scale)
  x = jnp.einsum("...qp,...sp->...qs", dw, w)
  d_logits = scale * (x + jnp.swapaxes(x, -1, -2))
  a = attn.astype(jnp.promote_types(attn.dtype, jnp.float32))
  d_logits = d_logits.astype(a.dtype)
  d_attn = (a * (d_logits - jnp.sum(a * d_logits, axis=-1, keepdims=True))).astype(w.dtype)
  d_out = jnp.einsum("...qs,...sp->...qp", d_attn, w) + jnp.einsum("...qs,...sp->...qp", attn, dw)
  return (out, attn), (d_out, d_attn)


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
  heads, attn = subspace_attention(_heads_first(w), p**-0.5)
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
  heads, attn = subspace_attention(_heads_first(w), 1.0)
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


# --------------------------------------------------------------------------------------
# CRATE-MAE: the decoder's structured diffusion, masking, the fixed positions, the loss.
# --------------------------------------------------------------------------------------
#
# A CRATE-MAE decoder layer mirrors an encoder layer (structured diffusion undoes the
# compression step, the linear dictionary step undoes the sparse coding), exactly as the
# published code computes it (rows are tokens, `E` the stored `(d, d)` weight):
#
#   Y   = LN_a(X) E^T                (`dictionary_synthesis`: no bias, no ReLU, no residual)
#   X+  = Y - MSSA(LN_b(Y))          (`structured_diffusion_step`: the published MSSA with
#                                     its output bias, `mssa_published`, is subtracted)
#
# The LayerNorms are the model's; these functions take the normalised inputs.


def dictionary_synthesis(x: Array, dictionary: Array) -> Array:
  """The CRATE-MAE decoder's linear dictionary step `Y = X E^T` (`E x` in column notation).

  Args:
    x: normalised tokens `LN_a(X)`, `(..., d_in)`.
    dictionary: `E`, the stored `(d_out, d_in)` weight (`fn.weight` of the published decoder
      block's first sub-block).

  Returns:
    `Y`, `(..., d_out)`.
  """
  chex.assert_rank(dictionary, 2)
  return token_matmul(x, dictionary.T)


def structured_diffusion_step(y: Array, attention: Array) -> Array:
  """The CRATE-MAE decoder's structured diffusion `X+ = Y - MSSA(LN_b(Y))`.

  The mirror of the encoder's compression step `Z + MSSA(LN1(Z))`: the attention output is
  subtracted, not added.

  Args:
    y: the dictionary step's output `Y`, `(..., N, d)`.
    attention: `MSSA(LN_b(Y))` with its output bias (`mssa_published(LN_b(Y), ...)[0]`),
      `(..., N, d)`.

  Returns:
    `X+`, `(..., N, d)`.
  """
  chex.assert_equal_shape([y, attention])
  return y - attention


def sincos_position_table(width: int, grid: tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """MAE's fixed 2-D sin-cos position table (`get_2d_sincos_pos_embed`), float32.

  For the patch at row `i`, column `j` of a `gh x gw` grid (row-major token order) and
  `q = width / 4` frequencies `w_f = 10000^(-f / q)`, `f = 0..q-1`:

    row = [sin(j w), cos(j w), sin(i w), cos(i w)]

  The first half encodes the column `j` (the published code's `meshgrid(grid_w, grid_h)`
  puts `w` first), the second half the row `i`. With `cls_token` a zero row is prepended.
  A constant of static sizes: computed with NumPy in float32 by the published code's
  operations, so it equals the published tables bit for bit (a constant under `jit`).

  Args:
    width: `d`, a multiple of 4.
    grid: `(gh, gw)`.
    cls_token: prepend the CLS token's zero row.

  Returns:
    `((cls_token + gh * gw), width)`.
  """
  if width % 4:
    raise ValueError(f"The 2-D sin-cos position table needs a width divisible by 4, got {width}.")
  gh, gw = grid
  quarter = width // 4
  omega = np.arange(quarter, dtype=np.float32) / np.float32(quarter)
  omega = np.float32(1.0) / np.float32(10000.0) ** omega
  rows, cols = np.meshgrid(
    np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32), indexing="ij"
  )

  def one_axis(pos: np.ndarray) -> np.ndarray:
    angles = np.einsum("m,f->mf", pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

  table = np.concatenate([one_axis(cols), one_axis(rows)], axis=-1)
  if cls_token:
    table = np.concatenate([np.zeros((1, width), np.float32), table], axis=0)
  return table.astype(np.float32)


def random_masking(noise: Array, mask_ratio: float) -> tuple[Array, Array, Array]:
  """MAE's per-image random masking from uniform noise (the published `random_masking`).

  `ids_shuffle = argsort(noise)` (ascending: small noise is kept); the first
  `len_keep = int(L * (1 - mask_ratio))` are kept. `ids_restore = argsort(ids_shuffle)`
  undoes the shuffle: patch `l` is kept iff `ids_restore[l] < len_keep`.

  Args:
    noise: `(..., L)`.
    mask_ratio: the fraction masked, in [0, 1] (a Python float: `len_keep` is static).

  Returns:
    `(ids_keep (..., len_keep) int32, mask (..., L) float32 with 1 = masked,
    ids_restore (..., L) int32)`.
  """
  if not 0.0 <= mask_ratio <= 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}.")
  length = noise.shape[-1]
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(noise, axis=-1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1).astype(jnp.int32)
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return ids_shuffle[..., :len_keep], mask, ids_restore


def masked_patch_loss(
  pred: Array, target: Array, mask: Array, norm_pix_loss: bool = False, eps: float = 1e-6
) -> Array:
  """MAE's reconstruction loss: per-patch mean squared error, averaged over masked patches.

  `loss = sum_{b,l} mask_bl mean_c (pred_blc - t_blc)^2 / sum_{b,l} mask_bl`. With
  `norm_pix_loss` every target patch is normalised, `t = (t - mean) / sqrt(var + eps)` with
  the unbiased (`n - 1`) variance over its pixels, as the published code (`torch.var`) does.
  Computed in float32 or higher. Without masked patches the loss is 0 (the published code
  divides by zero).

  Args:
    pred: `(..., L, P)`.
    target: the patches, `(..., L, P)` in the same within-patch order.
    mask: `(..., L)`, 1 = masked.
    norm_pix_loss: normalise the targets per patch.
    eps: added to the variance.

  Returns:
    A scalar.
  """
  chex.assert_equal_shape([pred, target])
  dtype = jnp.promote_types(pred.dtype, jnp.float32)
  pred, target, mask = pred.astype(dtype), target.astype(dtype), mask.astype(dtype)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + eps)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)
