"""CPU throughput of crate_jax's CRATE against the PyTorch reference, same model, same weights.

Measures, for each configuration, the forward pass (inference, logits only) and one
training step (softmax cross-entropy + AdamW update) in images/s and ms/step:

* crate_jax: `jax.jit` of `Model.apply`; a jitted train step (`jax.value_and_grad` +
  `optax.adamw`) with parameters and optimiser state donated.
* PyTorch: `CrateTorch` from the reference file (`--torch_ref`, loaded with importlib; the
  project never imports it), eager, `torch.optim.AdamW`, `torch.set_num_threads(cores)`;
  optionally also `torch.compile` (inductor, needs a C++ compiler) -- the faster torch
  variant is the one the ratio is taken against.

Both sides get crate_jax's initial weights (copied through the published state-dict
names) and the same fixed batch (random images and labels: this measures the model and
the optimiser, not an input pipeline). Before anything is timed the script checks that the
two sides compute the same thing -- forward logits, loss and every parameter gradient --
and refuses to time a mismatch (`--rtol`). After the warm-up steps the training losses of
the two sides are compared as well (same updates -> same loss trajectory).

Timing: compile / warm up, then `--repeats` rounds of `--steps` calls per side, the sides
interleaved round by round (alternating which goes first) so that a change of machine load
hits both; each round gives one ms/step. Reported: median, min and max over rounds, and
the load average before and after. Speedup = torch ms / crate_jax ms (> 1: crate_jax is
faster).

    python benchmarks/crate_vs_torch.py                       # both presets below
    python benchmarks/crate_vs_torch.py --configs=small --repeats=7 --json=/tmp/r.json
    python benchmarks/crate_vs_torch.py --configs=t16 --batch=16 --torch_compile=off
    python benchmarks/crate_vs_torch.py --configs=small --width=256 --depth=4 --heads=4

Environment of the runs so far (AMD EPYC (Zen 3, KVM), 2 cores / 2 threads, 23 GiB, Python 3.11,
jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8, torch 2.13.0+cpu (MKL 2024.2, oneDNN 3.12),
float32, default XLA flags, nothing else running):

    Results: benchmarks/README.md (crate_jax 1.53-1.67x faster per train step on the small
    preset, 1.37x on t16; 1.6-1.9x forward).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import copy
import importlib.util
import json
import os
from pathlib import Path
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TORCH_REF = "../shared/reference/torch_crate.py"  # relative to the repo root

# Presets. t16: CRATE-T/16 at 224 px (197 tokens, 1000 classes); small: a CIFAR-sized CRATE.
CONFIGS: dict[str, dict[str, int]] = {
  "t16": dict(
    width=384, depth=12, heads=6, image_size=224, patch=16, batch=32, num_classes=1000, steps=1
  ),
  "small": dict(
    width=192, depth=6, heads=3, image_size=32, patch=4, batch=128, num_classes=10, steps=5
  ),
}
OVERRIDABLE = ("width", "depth", "heads", "image_size", "patch", "batch", "num_classes", "steps")


# ----------------------------------------------------------------------------------------
# Arguments and environment.
# ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--configs",
    default="small,t16",
    help=f"comma-separated presets from {sorted(CONFIGS)}; the size flags below "
    "override every selected preset",
  )
  for name in OVERRIDABLE:
    p.add_argument(
      f"--{name}",
      type=int,
      default=None,
      help="steps = timed calls per round" if name == "steps" else None,
    )
  p.add_argument("--repeats", type=int, default=5, help="timed rounds per side and mode")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
  p.add_argument("--modes", default="forward,train", help="forward and/or train")
  p.add_argument("--frameworks", default="jax,torch", help="jax and/or torch")
  p.add_argument(
    "--cpu_devices",
    type=int,
    default=0,
    help="crate_jax on N single-threaded XLA:CPU devices, data parallel "
    "(crate_jax.xla_cpu.use_cpu_devices; as crate_jax.main --cpu_devices=N); "
    "0: XLA's default, one multi-threaded device",
  )
  p.add_argument(
    "--threads",
    type=int,
    default=os.cpu_count(),
    help="torch intra-op threads (XLA uses all cores by default)",
  )
  p.add_argument(
    "--torch_ref",
    default=DEFAULT_TORCH_REF,
    help="path of torch_crate.py, absolute or relative to the repo root",
  )
  p.add_argument(
    "--torch_compile",
    choices=("auto", "on", "off"),
    default="auto",
    help="also time torch.compile; auto: try it and skip it if it fails",
  )
  p.add_argument(
    "--cpu_kernels",
    type=lambda v: v.lower() in ("1", "true", "yes"),
    default=True,
    help="compile crate_jax inside crate_jax.xla_cpu.kernels(), as the trainer does; "
    "false: the plain math of crate_jax.ops",
  )
  p.add_argument(
    "--reuse_host_memory",
    type=lambda v: v.lower() in ("1", "true", "yes"),
    default=True,
    help="crate_jax.xla_cpu.reuse_freed_memory() first, as crate_jax.main does "
    "(both sides run in this process, so both get it). false: glibc defaults.",
  )
  p.add_argument(
    "--omp_wait_policy",
    choices=("PASSIVE", "ACTIVE", "unset"),
    default="PASSIVE",
    help="OMP_WAIT_POLICY for torch's OpenMP threads, set before torch is imported "
    "unless already in the environment. PASSIVE (default): on a shared, "
    "oversubscribed machine spinning OpenMP threads make eager torch 10-20x "
    "slower; see benchmarks/README.md",
  )
  p.add_argument(
    "--torch_adamw",
    choices=("default", "foreach", "fused"),
    default="default",
    help="torch.optim.AdamW implementation",
  )
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--weight_decay", type=float, default=0.05)
  p.add_argument(
    "--rtol",
    type=float,
    default=1e-4,
    help="max relative difference (max|a-b| / max|b|) allowed for logits and loss; "
    "gradients: see check_equivalence",
  )
  p.add_argument(
    "--allow_mismatch",
    action="store_true",
    help="time even if the numerical check fails (the ratio is then meaningless)",
  )
  p.add_argument(
    "--jax_variant",
    action="append",
    default=[],
    metavar="NAME=JSON",
    help="also time crate_jax compiled with these XLA compiler options, e.g. "
    '\'onednn={"xla_cpu_use_onednn": true, '
    '"xla_cpu_experimental_ynn_fusion_type": ""}\' (repeatable)',
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the results to this path")
  args = p.parse_args(argv)
  args.configs = [c for c in args.configs.split(",") if c]
  variants = []
  for v in args.jax_variant:
    name, _, opts = v.partition("=")
    try:
      variants.append((name, json.loads(opts)))
    except json.JSONDecodeError as e:
      p.error(f"--jax_variant {v!r}: expected NAME=JSON ({e})")
  args.jax_variant = variants
  args.modes = [m for m in args.modes.split(",") if m]
  args.frameworks = [f for f in args.frameworks.split(",") if f]
  for c in args.configs:
    if c not in CONFIGS:
      p.error(f"unknown config {c!r}; choose from {sorted(CONFIGS)}")
  if set(args.modes) - {"forward", "train"} or set(args.frameworks) - {"jax", "torch"}:
    p.error("--modes takes forward,train and --frameworks takes jax,torch")
  return args


def cpu_name() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def loadavg() -> tuple[float, float, float] | None:
  try:
    return os.getloadavg()
  except OSError:
    return None


def load_torch_reference(path_arg: str):
  """(torch, torch_crate module) or (None, reason)."""
  path = Path(path_arg)
  if not path.is_absolute():
    path = (REPO_ROOT / path).resolve()
  try:
    import torch  # noqa: F401
  except ImportError as e:
    return None, f"torch is not installed ({e}); `pip install -e .[torch]` to compare"
  if not path.is_file():
    return None, f"reference model {path} not found (set --torch_ref)"
  spec = importlib.util.spec_from_file_location("torch_crate_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "CrateTorch"):
    return None, f"{path} defines no CrateTorch"
  return module, None


# ----------------------------------------------------------------------------------------
# crate_jax side.
# ----------------------------------------------------------------------------------------


class JaxSide:
  """Jitted forward and donated train step of crate_jax's CRATE.

  Both are compiled ahead of time for the batch (`set_batch`), optionally with XLA
  compiler options (the per-computation form of XLA_FLAGS), so that several crate_jax
  variants can be timed side by side in one process.
  """

  def __init__(
    self,
    cfg: dict[str, int],
    args: argparse.Namespace,
    compiler_options: dict[str, Any] | None = None,
    init_params=None,
  ):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    import optax

    from crate_jax import xla_cpu
    from crate_jax.models import crate

    self.jax = jax
    self.kernels = lambda: xla_cpu.kernels(args.cpu_kernels)
    self.compiler_options = dict(compiler_options or {})
    # Parameters replicated, the batch split over the devices (one device: a no-op).
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(mesh, P())
    self.batch_sharded = NamedSharding(mesh, P("data"))
    if cfg["batch"] % jax.device_count():
      raise SystemExit(f"batch {cfg['batch']} does not split over {jax.device_count()} devices.")
    s = cfg["image_size"]
    self.model = crate.Model(
      num_classes=cfg["num_classes"],
      width=cfg["width"],
      depth=cfg["depth"],
      heads=cfg["heads"],
      patch_size=cfg["patch"],
      image_size=(s, s),
    )
    if init_params is None:
      variables = self.model.init(
        jax.random.PRNGKey(args.seed), jnp.zeros((1, s, s, 3), jnp.float32)
      )
      init_params = nn.unbox(variables["params"])
    self.init_params = init_params
    # torch.optim.AdamW's defaults, weight decay on every parameter (as torch does).
    self.tx = optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.weight_decay)
    model, tx = self.model, self.tx

    def loss_fn(params, images, labels):
      logits, _ = model.apply({"params": params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(params, opt_state, images, labels):
      loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))

    def traced_with_kernels(*args):  # The switch is read when the function is traced.
      with self.kernels():
        return loss_and_grad(*args)

    self.loss_and_grad = traced_with_kernels
    self.forward_jit = jax.jit(lambda params, images: model.apply({"params": params}, images)[0])
    self.train_jit = jax.jit(train_step, donate_argnums=(0, 1))
    self.compile_s: dict[str, float] = {}
    self.reset()

  def reset(self):
    # Fresh copies: the train step donates (invalidates) its inputs.
    put = lambda tree: self.jax.device_put(
      self.jax.tree.map(lambda x: x.copy(), tree), self.replicated
    )
    self.params = put(self.init_params)
    self.opt_state = self.tx.init(self.params)
    self.fwd_params = put(self.init_params)

  def set_batch(self, images_nhwc: np.ndarray, labels: np.ndarray, modes=("forward", "train")):
    self.images = self.jax.device_put(images_nhwc, self.batch_sharded)
    self.labels = self.jax.device_put(labels, self.batch_sharded)
    opts = self.compiler_options
    t0 = time.perf_counter()
    with self.kernels():
      lowered = self.forward_jit.lower(self.fwd_params, self.images)
    self.forward_fn = lowered.compile(compiler_options=opts)
    self.compile_s["forward"] = time.perf_counter() - t0
    if "train" in modes:
      t0 = time.perf_counter()
      with self.kernels():
        lowered = self.train_jit.lower(self.params, self.opt_state, self.images, self.labels)
      self.train_fn = lowered.compile(compiler_options=opts)
      self.compile_s["train"] = time.perf_counter() - t0

  def forward(self) -> Any:
    return self.forward_fn(self.fwd_params, self.images).block_until_ready()

  def train(self) -> float:
    self.params, self.opt_state, loss = self.train_fn(
      self.params, self.opt_state, self.images, self.labels
    )
    self.jax.block_until_ready((self.params, self.opt_state))
    return float(loss)


def torch_state_dict_from_jax(params: dict, depth: int) -> dict[str, np.ndarray]:
  """crate_jax parameters -> the published PyTorch names (those of `convert/crate.py`)."""
  a = lambda x: np.asarray(x, np.float32)
  pe = params["patch_embed"]
  sd = {
    "to_patch_embedding.1.weight": a(pe["norm_in"]["scale"]),
    "to_patch_embedding.1.bias": a(pe["norm_in"]["bias"]),
    "to_patch_embedding.2.weight": a(pe["dense"]["kernel"]).T,
    "to_patch_embedding.2.bias": a(pe["dense"]["bias"]),
    "to_patch_embedding.3.weight": a(pe["norm_out"]["scale"]),
    "to_patch_embedding.3.bias": a(pe["norm_out"]["bias"]),
    "cls_token": a(params["cls"]),
    "pos_embedding": a(params["pos_embedding"]),
    "mlp_head.0.weight": a(params["head_norm"]["scale"]),
    "mlp_head.0.bias": a(params["head_norm"]["bias"]),
    "mlp_head.1.weight": a(params["head"]["kernel"]).T,
    "mlp_head.1.bias": a(params["head"]["bias"]),
  }
  for i in range(depth):
    lp, t = params["encoder"][f"layer_{i}"], f"transformer.layers.{i}"
    d, k, p = lp["mssa"]["proj"].shape
    sd[f"{t}.0.norm.weight"] = a(lp["norm1"]["scale"])
    sd[f"{t}.0.norm.bias"] = a(lp["norm1"]["bias"])
    sd[f"{t}.0.fn.qkv.weight"] = a(lp["mssa"]["proj"]).reshape(d, k * p).T
    sd[f"{t}.0.fn.to_out.0.weight"] = a(lp["mssa"]["out"]).reshape(k * p, d).T
    sd[f"{t}.0.fn.to_out.0.bias"] = a(lp["mssa"]["out_bias"])
    sd[f"{t}.1.norm.weight"] = a(lp["norm2"]["scale"])
    sd[f"{t}.1.norm.bias"] = a(lp["norm2"]["bias"])
    sd[f"{t}.1.fn.weight"] = a(lp["ista"]["D"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------
# PyTorch side.
# ----------------------------------------------------------------------------------------


class TorchSide:
  """The reference model, eager or `torch.compile`d, with torch.optim.AdamW."""

  def __init__(
    self,
    ref,
    cfg: dict[str, int],
    state_dict: dict[str, np.ndarray],
    args: argparse.Namespace,
    compiled: bool = False,
  ):
    import torch
    import torch.nn.functional as F

    self.torch, self.F = torch, F
    self.compiled = compiled
    s = cfg["image_size"]
    self.model = ref.CrateTorch(
      image_size=s,
      patch_size=cfg["patch"],
      num_classes=cfg["num_classes"],
      dim=cfg["width"],
      depth=cfg["depth"],
      heads=cfg["heads"],
    )
    self.state = {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}
    self.model.load_state_dict(self.state, strict=True)
    kw = {}
    if args.torch_adamw == "foreach":
      kw["foreach"] = True
    elif args.torch_adamw == "fused":
      kw["fused"] = True
    self.opt_kwargs = dict(
      lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay, **kw
    )
    self.reset()
    self.fwd_module = self.model
    self.train_module = self.model
    if compiled:
      self.fwd_module = torch.compile(self.model)
      self.train_module = torch.compile(self.model)

  def reset(self):
    self.model.load_state_dict(self.state, strict=True)
    self.opt = self.torch.optim.AdamW(self.model.parameters(), **self.opt_kwargs)

  def set_batch(self, images_nchw: np.ndarray, labels: np.ndarray):
    self.images = self.torch.from_numpy(images_nchw.copy())
    self.labels = self.torch.from_numpy(labels.astype(np.int64))

  def forward(self):
    with self.torch.inference_mode():
      return self.fwd_module(self.images)

  def train(self) -> float:
    self.opt.zero_grad(set_to_none=True)
    loss = self.F.cross_entropy(self.train_module(self.images), self.labels)
    loss.backward()
    self.opt.step()
    return float(loss.detach())

  def loss_and_grad(self) -> tuple[float, dict[str, np.ndarray]]:
    self.model.zero_grad(set_to_none=True)
    loss = self.F.cross_entropy(self.model(self.images), self.labels)
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in self.model.named_parameters()}
    self.model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


# ----------------------------------------------------------------------------------------
# Checks and timing.
# ----------------------------------------------------------------------------------------


def rel_diff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_equivalence(js: JaxSide, ts: TorchSide, depth: int, rtol: float) -> dict[str, Any]:
  """Forward logits, loss and all parameter gradients of the two sides.

  Differences are max|a - b| / max|b| per tensor. Logits and loss must agree within
  `rtol`. Gradients are judged against a float64 run of the torch reference: some are
  ill-conditioned in float32 (the stem's, LayerNorm -> Linear -> LayerNorm, whose gradient
  is a small difference of large terms: torch's own float32 error reaches 2e-3..8e-3 there),
  so each crate_jax gradient must be within max(10 rtol, 2x torch's own float32 error) of
  the float64 one -- i.e. no less accurate than the reference itself.
  """
  logits_j = np.asarray(js.forward())
  logits_t = ts.forward().numpy()
  loss_j, grads_j = js.loss_and_grad(js.fwd_params, js.images, js.labels)
  loss_t, grads_t = ts.loss_and_grad()
  grads_j = torch_state_dict_from_jax(js.jax.device_get(grads_j), depth)
  if set(grads_j) != set(grads_t):
    raise RuntimeError(f"parameter names differ: {sorted(set(grads_j) ^ set(grads_t))}")
  # float64 reference: a double copy of the torch model on the same weights and batch.
  m64 = copy.deepcopy(ts.model).double()
  out64 = m64(ts.images.double())
  loss64 = ts.F.cross_entropy(out64, ts.labels)
  loss64.backward()
  grads64 = {k: p.grad.numpy() for k, p in m64.named_parameters()}
  logits64 = out64.detach().numpy()
  del m64, out64, loss64

  def rel(a, b):
    return {k: rel_diff(a[k], b[k]) for k in b}

  def worst(diffs):
    k = max(diffs, key=diffs.get)
    return diffs[k], k

  jt, j64, t64 = rel(grads_j, grads_t), rel(grads_j, grads64), rel(grads_t, grads64)
  bad = sorted(k for k in j64 if j64[k] > max(10 * rtol, 2 * t64[k]))
  res = dict(
    logits_max_rel_diff=rel_diff(logits_j, logits_t),
    logits_jax_vs_f64=rel_diff(logits_j, logits64),
    logits_torch_vs_f64=rel_diff(logits_t, logits64),
    loss_rel_diff=abs(float(loss_j) - loss_t) / abs(loss_t),
    grads_less_accurate_than_torch=bad,
  )
  res["grad_max_rel_diff"], res["grad_worst_param"] = worst(jt)
  res["grad_jax_vs_f64"], res["grad_jax_vs_f64_param"] = worst(j64)
  res["grad_torch_vs_f64"], res["grad_torch_vs_f64_param"] = worst(t64)
  res["ok"] = bool(res["logits_max_rel_diff"] <= rtol and res["loss_rel_diff"] <= rtol and not bad)
  return res


def time_rounds(
  sides: dict[str, Callable[[], Any]], steps: int, repeats: int, label: str = ""
) -> dict[str, dict[str, list[float]]]:
  """Wall and process-CPU ms/step per round for each side.

  The sides are interleaved, their order alternating per round, so that a change of
  machine load falls on all of them. CPU time is the whole process's (all threads): it is
  the work a step costs, much less sensitive to other processes than wall time.
  """
  names = list(sides)
  out = {n: {"wall": [], "cpu": []} for n in names}
  for r in range(repeats):
    for n in names if r % 2 == 0 else names[::-1]:
      fn = sides[n]
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(steps):
        fn()
      out[n]["wall"].append((time.perf_counter() - t0) * 1e3 / steps)
      out[n]["cpu"].append((time.process_time() - c0) * 1e3 / steps)
    print(
      f"  {label} round {r + 1}/{repeats}: "
      + ", ".join(f"{n} {v['wall'][-1]:.0f}" for n, v in out.items())
      + " ms/step, load "
      + fmt_load(loadavg()),
      flush=True,
    )
  return out


def summarize(rounds: dict[str, list[float]], batch: int) -> dict[str, Any]:
  ms = rounds["wall"]
  med = statistics.median(ms)
  return dict(
    ms_median=med,
    ms_min=min(ms),
    ms_max=max(ms),
    ms_rounds=ms,
    spread_pct=100.0 * (max(ms) - min(ms)) / med,
    img_s=batch * 1e3 / med,
    img_s_best=batch * 1e3 / min(ms),
    cpu_ms_median=statistics.median(rounds["cpu"]),
    cpu_ms_rounds=rounds["cpu"],
  )


def run_config(name: str, cfg: dict[str, int], args: argparse.Namespace, ref) -> dict[str, Any]:
  print(
    f"\n=== {name}: width {cfg['width']} depth {cfg['depth']} heads {cfg['heads']} "
    f"image {cfg['image_size']} patch {cfg['patch']} batch {cfg['batch']} "
    f"classes {cfg['num_classes']} ({(cfg['image_size'] // cfg['patch']) ** 2 + 1} tokens)",
    flush=True,
  )
  result: dict[str, Any] = dict(config=cfg, load_before=loadavg())
  rng = np.random.default_rng(args.seed)
  s, b = cfg["image_size"], cfg["batch"]
  images_nhwc = rng.standard_normal((b, s, s, 3), dtype=np.float32)
  labels = rng.integers(0, cfg["num_classes"], size=(b,)).astype(np.int32)
  images_nchw = np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))

  sides: dict[str, Any] = {}
  js = JaxSide(cfg, args)
  js.set_batch(images_nhwc, labels, args.modes)
  result["num_params"] = int(sum(x.size for x in js.jax.tree.leaves(js.init_params)))
  print(
    f"parameters: {result['num_params']:,}; crate_jax compile "
    + ", ".join(f"{m} {t:.1f}s" for m, t in js.compile_s.items()),
    flush=True,
  )
  if "jax" in args.frameworks:
    sides["crate_jax"] = js
    for vname, opts in args.jax_variant:
      v = JaxSide(cfg, args, compiler_options=opts, init_params=js.init_params)
      v.set_batch(images_nhwc, labels, args.modes)
      d = rel_diff(np.asarray(v.forward()), np.asarray(js.forward()))
      print(f"crate_jax[{vname}] {opts}: logits max rel diff vs default {d:.1e}")
      result.setdefault("jax_variants", {})[vname] = dict(options=opts, logits_rel_diff=d)
      sides[f"crate_jax[{vname}]"] = v
  state_dict = torch_state_dict_from_jax(js.init_params, cfg["depth"])

  if ref is not None and "torch" in args.frameworks:
    ts = TorchSide(ref, cfg, state_dict, args)
    ts.set_batch(images_nchw, labels)
    check = check_equivalence(js, ts, cfg["depth"], args.rtol)
    result["check"] = check
    print(
      f"check crate_jax vs torch (max|a-b|/max|b|): logits {check['logits_max_rel_diff']:.1e}, "
      f"loss {check['loss_rel_diff']:.1e}, gradients {check['grad_max_rel_diff']:.1e} "
      f"({check['grad_worst_param']})\n"
      f"  vs a float64 torch run: logits jax {check['logits_jax_vs_f64']:.1e} / torch "
      f"{check['logits_torch_vs_f64']:.1e}; gradients jax {check['grad_jax_vs_f64']:.1e} "
      f"({check['grad_jax_vs_f64_param']}) / torch {check['grad_torch_vs_f64']:.1e} "
      f"({check['grad_torch_vs_f64_param']}); gradients less accurate than torch's: "
      f"{check['grads_less_accurate_than_torch'] or 'none'}",
      flush=True,
    )
    if not check["ok"]:
      msg = f"crate_jax and the torch reference disagree beyond rtol={args.rtol}"
      if not args.allow_mismatch:
        raise SystemExit(f"ERROR: {msg}; not timing different computations.")
      print(f"WARNING: {msg}; timing anyway (--allow_mismatch).")
    sides["torch"] = ts
    if args.torch_compile != "off":
      try:
        t0 = time.perf_counter()
        tc = TorchSide(ref, cfg, state_dict, args, compiled=True)
        tc.set_batch(images_nchw, labels)
        out = tc.forward().numpy()
        d = rel_diff(out, ts.forward().numpy())
        print(
          f"torch.compile forward compiled in {time.perf_counter() - t0:.1f}s, "
          f"logits max rel diff vs eager {d:.1e}",
          flush=True,
        )
        result["torch_compile_logits_rel_diff"] = d
        sides["torch_compile"] = tc
      except Exception as e:  # noqa: BLE001 -- any inductor failure just skips this side.
        if args.torch_compile == "on":
          raise
        print(f"torch.compile unavailable, skipped: {type(e).__name__}: {str(e)[:300]}")
        result["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  elif "torch" in args.frameworks:
    result["torch_skipped"] = True

  for mode in args.modes:
    fns = {n: (side.forward if mode == "forward" else side.train) for n, side in sides.items()}
    # First call (torch.compile compiles here) + warm-up; for training, the loss
    # trajectories of the warm-up steps are compared (same updates -> same losses).
    losses: dict[str, list[float]] = {}
    for n, side in sides.items():
      if mode == "train":
        side.reset()
      t0 = time.perf_counter()
      first = fns[n]()
      result.setdefault("first_call_s", {})[f"{n}/{mode}"] = time.perf_counter() - t0
      losses[n] = [first] if mode == "train" else []
      for _ in range(args.warmup):
        v = fns[n]()
        if mode == "train":
          losses[n].append(v)
    if mode == "train" and "torch" in losses:
      for n, ls in losses.items():
        if n != "torch":
          dev = max(abs(x - y) / abs(y) for x, y in zip(ls, losses["torch"]))
          result.setdefault("train_loss_trajectory_rel_diff", {})[n] = dev
          print(
            f"train losses of the first {len(ls)} steps, {n}: {[round(x, 5) for x in ls]}, "
            f"torch: {[round(x, 5) for x in losses['torch']]} (max rel diff {dev:.1e})"
          )
    rounds = time_rounds(fns, cfg["steps"], args.repeats, label=f"{name} {mode}")
    result[mode] = {n: summarize(r, b) for n, r in rounds.items()}
    print(f"{mode} timed, load {fmt_load(loadavg())}", flush=True)
  result["load_after"] = loadavg()
  result["speedup"] = speedups(result, args.modes)
  print_table(name, result, args.modes)
  return result


def speedups(result: dict[str, Any], modes: list[str]) -> dict[str, Any]:
  """torch ms / crate_jax ms (medians), against eager torch and against the best torch side."""
  out: dict[str, Any] = {}
  for mode in modes:
    r = result.get(mode, {})
    torch_sides = {n: v["ms_median"] for n, v in r.items() if n.startswith("torch")}
    if not torch_sides:
      continue
    best = min(torch_sides, key=torch_sides.get)
    for n, v in r.items():
      if n.startswith("crate_jax"):
        jms = v["ms_median"]
        out.setdefault(mode, {})[n] = dict(
          vs_torch_eager=torch_sides.get("torch", float("nan")) / jms,
          vs_best_torch=torch_sides[best] / jms,
          best_torch=best,
          cpu_time_ratio_vs_torch_eager=(
            r["torch"]["cpu_ms_median"] / v["cpu_ms_median"] if "torch" in r else float("nan")
          ),
        )
  return out


def print_table(name: str, result: dict[str, Any], modes: list[str]):
  b = result["config"]["batch"]
  print(
    f"\n{name} (batch {b}), load average {fmt_load(result['load_before'])} -> "
    f"{fmt_load(result['load_after'])}"
  )
  print(
    f"{'mode':8s} {'side':22s} {'img/s':>8s} {'ms/step':>9s} {'min':>9s} {'max':>9s} "
    f"{'spread':>7s} {'cpu ms':>9s}"
  )
  for mode in modes:
    for n, v in result.get(mode, {}).items():
      print(
        f"{mode:8s} {n:22s} {v['img_s']:8.1f} {v['ms_median']:9.1f} {v['ms_min']:9.1f} "
        f"{v['ms_max']:9.1f} {v['spread_pct']:6.1f}% {v['cpu_ms_median']:9.1f}"
      )
  for mode, per_side in result.get("speedup", {}).items():
    for n, sp in per_side.items():
      print(
        f"speedup {mode:7s} {n}: {sp['vs_torch_eager']:.2f}x vs torch eager, "
        f"{sp['vs_best_torch']:.2f}x vs best torch ({sp['best_torch']}); "
        f"CPU-time ratio vs eager {sp['cpu_time_ratio_vs_torch_eager']:.2f}x"
      )


def fmt_load(load) -> str:
  return "n/a" if load is None else "/".join(f"{x:.2f}" for x in load)


def environment(args: argparse.Namespace) -> dict[str, Any]:
  import flax
  import jax
  import optax

  env = dict(
    cpu=cpu_name(),
    cores=os.cpu_count(),
    python=platform.python_version(),
    jax=jax.__version__,
    flax=flax.__version__,
    optax=optax.__version__,
    numpy=np.__version__,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    jax_backend=jax.default_backend(),
    jax_devices=jax.device_count(),
    torch_threads=args.threads,
  )
  try:
    import torch

    env["torch"] = torch.__version__
  except ImportError:
    env["torch"] = None
  return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  sys.path.insert(0, str(REPO_ROOT))
  host_memory_reused = False
  if args.reuse_host_memory:  # Before JAX or torch start threads.
    from crate_jax import xla_cpu

    host_memory_reused = xla_cpu.reuse_freed_memory()
  if args.cpu_devices:  # Before JAX initialises its backends.
    from crate_jax import xla_cpu

    xla_cpu.use_cpu_devices(args.cpu_devices)
  ref = None
  if "torch" in args.frameworks:
    if args.omp_wait_policy != "unset":
      os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    ref, why = load_torch_reference(args.torch_ref)
    if ref is None:
      print(f"Skipping the PyTorch side: {why}.")
    else:
      import torch

      torch.set_num_threads(args.threads)
  env = environment(args)
  env["host_memory_reused"] = host_memory_reused
  print("environment:", json.dumps(env))
  results: dict[str, Any] = dict(environment=env, configs={})
  for name in args.configs:
    cfg = dict(CONFIGS[name])
    cfg.update({k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k) is not None})
    results["configs"][name] = run_config(name, cfg, args, ref)
    if args.json:  # after every preset, so that a long run leaves its finished part
      Path(args.json).write_text(json.dumps(results, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.json}")
  return results


if __name__ == "__main__":
  main()
