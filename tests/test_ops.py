"""Mathematical properties of the pure functions in crate_jax.ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import ops
from crate_jax import xla_cpu


def _random_orthogonal(key, n):
  q, r = jnp.linalg.qr(jax.random.normal(key, (n, n)))
  return q * jnp.sign(jnp.diagonal(r))


def _naive_coding_rate(z, eps):
  n, d = z.shape
  return 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps**2) * z.T @ z)[1]


@pytest.mark.parametrize("n,d", [(17, 8), (5, 12)])  # both Gram sizes.
def test_coding_rate_matches_definition(n, d):
  z = np.random.default_rng(0).normal(size=(n, d))
  np.testing.assert_allclose(
    ops.coding_rate(jnp.asarray(z), 0.5), _naive_coding_rate(z, 0.5), rtol=1e-5
  )


def test_compression_rate_matches_definition():
  rng = np.random.default_rng(1)
  z, u = rng.normal(size=(2, 11, 12)), rng.normal(size=(12, 3, 4))
  expected = [
    sum(
      0.5 * np.linalg.slogdet(np.eye(4) + 4 / (11 * 0.25) * (zb @ u[:, k]).T @ (zb @ u[:, k]))[1]
      for k in range(3)
    )
    for zb in z
  ]
  np.testing.assert_allclose(
    ops.compression_rate(jnp.asarray(z), jnp.asarray(u), 0.5), expected, rtol=1e-5
  )


def test_coding_rate_invariant_to_rotations():
  """R depends on Z only through Z^T Z, so rotating features (Z Q) or permuting/rotating the
  token axis (Q' Z) leaves it unchanged; R^c is invariant when U rotates with Z."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  z = jax.random.normal(k1, (16, 8))
  u = jax.random.normal(k2, (8, 2, 4))
  q_feat, q_tok = _random_orthogonal(k3, 8), _random_orthogonal(k4, 16)
  r = ops.coding_rate(z)
  np.testing.assert_allclose(ops.coding_rate(z @ q_feat), r, rtol=1e-5)
  np.testing.assert_allclose(ops.coding_rate(q_tok @ z), r, rtol=1e-5)
  rc = ops.compression_rate(z, u)
  np.testing.assert_allclose(
    ops.compression_rate(z @ q_feat, jnp.einsum("dkp,de->ekp", u, q_feat)), rc, rtol=1e-5
  )
  np.testing.assert_allclose(ops.compression_rate(q_tok @ z, u), rc, rtol=1e-5)
  # ... but not, in general, when only Z rotates: R^c measures alignment with the subspaces.
  assert abs(float(ops.compression_rate(z @ q_feat, u) - rc)) > 1e-3


def test_compression_with_one_full_subspace_equals_coding_rate():
  """K = 1, U = I_d (p = d): R^c(Z | U) = R(Z), since the factors p/(N eps^2) and d/(N eps^2) agree."""
  z = jax.random.normal(jax.random.PRNGKey(3), (3, 10, 6))
  u = jnp.eye(6)[:, None, :]
  np.testing.assert_allclose(ops.compression_rate(z, u, 0.7), ops.coding_rate(z, 0.7), rtol=1e-6)


def test_published_measure_normalises_tokens_and_uses_eps_sq():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(2, 9, 3, 4))
  x = w / np.linalg.norm(w, axis=-1, keepdims=True)
  expected = [
    sum(
      0.5 * np.linalg.slogdet(np.eye(9) + 4 / (9 * 0.01) * x[b, :, k] @ x[b, :, k].T)[1]
      for k in range(3)
    )
    for b in range(2)
  ]
  np.testing.assert_allclose(ops.published_compression_measure(jnp.asarray(w)), expected, rtol=1e-5)
  # Scale-free per token.
  np.testing.assert_allclose(
    ops.published_compression_measure(jnp.asarray(w * 7.0)), expected, rtol=1e-5
  )


def test_logdet_in_float32_for_bfloat16_inputs():
  z = jax.random.normal(jax.random.PRNGKey(4), (32, 16))
  r16 = ops.coding_rate(z.astype(jnp.bfloat16))
  assert r16.dtype == jnp.float32
  np.testing.assert_allclose(r16, ops.coding_rate(z), rtol=2e-2)


def _published_ista(x, d, eta=0.1, lam=0.1):
  """The published code's literal three-matmul form."""
  return jax.nn.relu(x + eta * (x @ d - x @ d.T @ d) - eta * lam)


@pytest.mark.parametrize("tokens", [5, 40])  # Fewer and more tokens than d = 12.
def test_crate_ista_values_and_gradients_equal_published_form(tokens):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(6), 3)
  x, d = jax.random.normal(k1, (tokens, 12)), jax.random.normal(k2, (12, 12)) * 0.3
  probe = jax.random.normal(k3, (tokens, 12))
  np.testing.assert_allclose(ops.crate_ista(x, d), _published_ista(x, d), atol=1e-5)
  grads = [
    jax.grad(lambda x, d, f=f: jnp.sum(f(x, d) * probe), argnums=(0, 1))(x, d)
    for f in (ops.crate_ista, _published_ista)
  ]
  for ours, published in zip(*grads):
    np.testing.assert_allclose(ours, published, rtol=1e-5, atol=1e-5)


def test_crate_ista_of_a_row_does_not_depend_on_the_batch_in_bfloat16():
  """One formula for every batch size: a token's output is the same alone or in a batch."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  x = jax.random.normal(k1, (64, 16)).astype(jnp.bfloat16)
  d = jax.random.normal(k2, (16, 16)) * 0.3
  batched = ops.crate_ista(x, d)
  alone = jnp.concatenate([ops.crate_ista(x[i : i + 1], d) for i in range(4)])
  np.testing.assert_array_equal(np.asarray(alone, np.float32), np.asarray(batched[:4], np.float32))


@pytest.mark.parametrize("m", [12, 48])
def test_ista_step_does_not_increase_nonnegative_lasso(m):
  """Proximal-gradient descent lemma: with eta <= 1/||D||^2 every step lowers (or keeps)
  lam ||a||_1 + 1/2 ||x - D a||^2 over a >= 0."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(6), 3)
  d = jax.random.normal(k1, (12, m))
  x = jax.random.normal(k2, (64, 12))
  a = jax.nn.relu(jax.random.normal(k3, (64, m)))
  eta = 1.0 / float(jnp.linalg.norm(d, 2)) ** 2
  objective = lambda a: ops.lasso_objective(x, a, d, lam=0.1)
  for _ in range(20):
    a_next = ops.ista_step(x, a, d, eta, 0.1)
    assert bool(jnp.all(a_next >= 0))
    assert bool(jnp.all(objective(a_next) <= objective(a) + 1e-5))
    a = a_next
  # A step far too large does increase it: the bound is not vacuous.
  big = ops.ista_step(x, a, d, 50 * eta, 0.1)
  assert bool(jnp.any(objective(big) > objective(a)))


def test_overcomplete_ista_matches_published_block():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
  x = jax.random.normal(k1, (3, 5, 8))
  d, d1 = jax.random.normal(k2, (8, 32)), jax.random.normal(k3, (8, 32))
  eta, lam = 0.1, 0.1
  z1 = jax.nn.relu(eta * x @ d - eta * lam)
  z2 = jax.nn.relu(z1 - eta * (z1 @ d.T - x) @ d - eta * lam)
  np.testing.assert_allclose(
    ops.overcomplete_ista(x, d, d1, eta, lam), z2 @ d1.T, rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="num_steps"):
    ops.overcomplete_ista(x, d, d1, num_steps=0)


def test_mssa_paper_equals_column_form_definition():
  """MSSA(Z) = sum_k U_k (U_k^T Z) softmax((U_k^T Z)^T (U_k^T Z)), columns as tokens."""
  rng = np.random.default_rng(8)
  z, u = rng.normal(size=(10, 6)) * 0.5, rng.normal(size=(6, 2, 3)) * 0.5
  zc = z.T  # d x N
  expected = np.zeros_like(zc)
  for k in range(2):
    w = u[:, k].T @ zc  # p x N
    g = w.T @ w
    s = np.exp(g - g.max(axis=0, keepdims=True))
    s /= s.sum(axis=0, keepdims=True)  # softmax over each column
    expected += u[:, k] @ (w @ s)
  got, _, _ = ops.mssa_paper(jnp.asarray(z), jnp.asarray(u))
  np.testing.assert_allclose(got, expected.T, rtol=1e-5, atol=1e-5)
  step, _, _ = ops.mssa_paper_step(jnp.asarray(z), jnp.asarray(u), kappa=0.5, eps=2.0)
  c = 0.5 * 3 / (10 * 4.0)
  np.testing.assert_allclose(step, (1 - c) * z + c * expected.T, rtol=1e-5, atol=1e-5)


def test_mssa_published_matches_explicit_heads():
  rng = np.random.default_rng(9)
  x, u = rng.normal(size=(2, 5, 8)), rng.normal(size=(8, 2, 3))
  o, bias = rng.normal(size=(2, 3, 7)), rng.normal(size=(7,))
  y, w, attn = ops.mssa_published(jnp.asarray(x), jnp.asarray(u), jnp.asarray(o), jnp.asarray(bias))
  expected = np.zeros((2, 5, 7))
  for k in range(2):
    wk = x @ u[:, k]
    logits = wk @ np.swapaxes(wk, -1, -2) / np.sqrt(3)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    np.testing.assert_allclose(attn[:, k], a, rtol=1e-5, atol=1e-6)
    expected += (a @ wk) @ o[k]
  np.testing.assert_allclose(y, expected + bias, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(w, np.einsum("bnd,dkp->bnkp", x, u), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", [(), (7,), (2, 5), (2, 3, 4)])
def test_token_matmul_equals_batched_matmul(lead):
  x = jax.random.normal(jax.random.PRNGKey(13), lead + (6,))
  w = jax.random.normal(jax.random.PRNGKey(14), (6, 5))
  np.testing.assert_allclose(ops.token_matmul(x, w), x @ w, rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(ops.token_matmul(x, w))), argnums=(0, 1))(x, w)
  expected = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1))(x, w)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  with pytest.raises(AssertionError):
    ops.token_matmul(x, w.T)


def test_mssa_published_gradients_equal_autodiff_of_einsum_form():
  """The 2D-token formulation against autodiff of the plain batched einsums."""
  ks = jax.random.split(jax.random.PRNGKey(15), 5)
  x, u = jax.random.normal(ks[0], (2, 7, 8)), jax.random.normal(ks[1], (8, 2, 3))
  o, bias = jax.random.normal(ks[2], (2, 3, 5)), jax.random.normal(ks[3], (5,))
  probe = jax.random.normal(ks[4], (2, 7, 5))

  def einsum_form(x, u, o, bias):
    w = jnp.einsum("bnd,dkp->bknp", x, u)
    attn = jax.nn.softmax(jnp.einsum("bkqp,bksp->bkqs", w, w) / np.sqrt(3), axis=-1)
    return jnp.einsum("bkqs,bksp,kpe->bqe", attn, w, o) + bias

  ours = jax.grad(lambda *a: jnp.sum(ops.mssa_published(*a)[0] * probe), argnums=(0, 1, 2, 3))
  expected = jax.grad(lambda *a: jnp.sum(einsum_form(*a) * probe), argnums=(0, 1, 2, 3))
  for g, e in zip(ours(x, u, o, bias), expected(x, u, o, bias)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def _attention_definition(w, scale):
  attn = jax.nn.softmax(jnp.einsum("...kqp,...ksp->...kqs", w, w) * scale, axis=-1)
  return jnp.einsum("...kqs,...ksp->...kqp", attn, w), attn


def _attention_loss(attention, w, probe_out, probe_attn):
  out, attn = attention(w)  # Both outputs used: both cotangents are exercised.
  return jnp.sum(out * probe_out) + jnp.sum(attn * probe_attn)


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_subspace_attention_derivatives_equal_autodiff_of_definition(cpu_kernels):
  """The symmetric JVP rule (and the CPU kernel's VJP) against autodiff of the formula."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(12), 3)
  w = jax.random.normal(k1, (2, 3, 9, 4))
  probes = jax.random.normal(k2, w.shape), jax.random.normal(k3, (2, 3, 9, 9))
  with xla_cpu.kernels(cpu_kernels):
    ours = jax.grad(lambda w: _attention_loss(lambda w: ops.subspace_attention(w, 0.5), w, *probes))
    grad = jax.jit(ours)(w)
    out = jax.jit(ops.subspace_attention, static_argnums=1)(w, 0.5)
  definition = lambda w: _attention_definition(w, 0.5)
  expected = jax.grad(lambda w: _attention_loss(definition, w, *probes))(w)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  for ours_out, expected_out in zip(out, definition(w)):
    np.testing.assert_allclose(ours_out, expected_out, rtol=1e-5, atol=1e-6)


def test_forward_mode_of_attention_equals_the_definition():
  k1, k2 = jax.random.split(jax.random.PRNGKey(13))
  w, tangent = jax.random.normal(k1, (3, 6, 4)), jax.random.normal(k2, (3, 6, 4))
  attention = lambda w: ops.subspace_attention(w, 0.5)
  definition = lambda w: _attention_definition(w, 0.5)
  _, ours = jax.jvp(attention, (w,), (tangent,))
  _, expected = jax.jvp(definition, (w,), (tangent,))
  for a, b in zip(ours, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    jax.jacfwd(lambda w: attention(w)[0])(w),
    jax.jacrev(lambda w: definition(w)[0])(w),
    rtol=1e-5,
    atol=1e-6,
  )


def test_cpu_kernel_propagates_inf_and_nan_like_the_plain_path():
  """Rows with inf or NaN give the same values (and infs, NaNs) as the plain products."""
  w = jax.random.normal(jax.random.PRNGKey(14), (2, 5, 3))
  w = w.at[0, 1, 2].set(jnp.inf).at[1, 3, 0].set(jnp.nan).at[1, 0, 1].set(-jnp.inf)
  probe = jax.random.normal(jax.random.PRNGKey(15), w.shape)
  results = []
  for cpu_kernels in (False, True):
    with xla_cpu.kernels(cpu_kernels):
      f = jax.jit(lambda w: ops.subspace_attention(w, 0.5))
      g = jax.jit(jax.grad(lambda w: jnp.sum(ops.subspace_attention(w, 0.5)[0] * probe)))
      results.append((*f(w), g(w)))
  for plain, kernel in zip(*results):
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(plain))


def test_cpu_kernel_epilogues_are_cpu_only():
  """Inside `xla_cpu.kernels()`, attention's per-head matmuls carry a zero-valued row
  reduction and the backward writes A^T out on CPU; other backends get the plain products."""

  def count(platform, op, tokens=9):
    w = probe = jnp.ones((2, 3, tokens, 4))
    with xla_cpu.kernels():
      grad = jax.grad(lambda w: jnp.sum(ops.subspace_attention(w, 0.5)[0] * probe))
      return jax.export.export(jax.jit(grad), platforms=[platform])(w).mlir_module().count(op)

  # Softmax (max, sum) and its backward (one sum): 3 reductions; on CPU each backward
  # matmul adds one (the forward product is not needed for the gradient).
  assert count("cuda", "stablehlo.reduce") == count("tpu", "stablehlo.reduce") == 3
  assert count("cpu", "stablehlo.reduce") == 5
  assert count("cuda", "optimization_barrier") == 0 < count("cpu", "optimization_barrier")
  # A^T is written out for short sequences only (measured: faster at 65 tokens, slower at 197).
  long = xla_cpu._WRITE_OUT_ATTN_T_MAX_TOKENS + 1
  assert count("cpu", "optimization_barrier", tokens=long) == 0
  assert count("cpu", "stablehlo.reduce", tokens=long) == 5


def test_functions_work_under_jit_vmap_grad():
  z = jax.random.normal(jax.random.PRNGKey(10), (4, 9, 6))
  u = jax.random.normal(jax.random.PRNGKey(11), (6, 2, 3))
  batched = jax.jit(ops.sparse_rate_reduction)(z, u)
  per_example = jax.vmap(lambda zi: ops.sparse_rate_reduction(zi, u))(z)
  np.testing.assert_allclose(batched, per_example, rtol=1e-5)
  grad = jax.grad(lambda z: ops.sparse_rate_reduction(z, u).sum())(z)
  assert grad.shape == z.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_sparsity_measures():
  z = jnp.array([[[0.0, 1.0], [-2.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])
  np.testing.assert_allclose(ops.nonzero_fraction(z), [0.5, 0.25])
  np.testing.assert_allclose(ops.l1_norm(z), [3.0, 3.0])
