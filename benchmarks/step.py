"""Train-step throughput of each recipe's jitted step, side by side with PyTorch MAE peers.

The JAX step is the trainer's own (`mae_jax.train.pretrain.make_train_step`: corruption, masking,
forward, backward, finite check and AdamW in one jit, state donated). Two peers, each with
`torch.optim.AdamW` (MAE's no-decay groups), at the same model size, batch, image size and
precision, fed the same uint8 images (normalised inside the timed step on every side):
* `torch-official` (the headline ratio): the model as facebookresearch/mae `models_mae.py` builds
  it, on timm's `Block` and `PatchEmbed` with fused scaled-dot-product attention
  (`benchmarks/official_mae_peer.py`; loads a mae-full export strictly and gives our loss);
* `torch-hf`: transformers' `ViTMAEForPreTraining` (qkv bias, LayerNorm eps 1e-6, SDPA attention).

Both sides run in one process and take turns (A B B A A B ...) so that load from other processes
hits both alike; the reported numbers are medians over the timed steps, and the ratio is
JAX images/s ÷ peer images/s. Defaults are issue 9's configuration: encoder ViT-S (384 × 12,
6 heads, patch 16), decoder 256 × 4 (8 heads), batch 32, 224 × 224 × 3, float32.

  python -m benchmarks.step                                  # MAE vs both peers, issue-9 config
  python -m benchmarks.step --recipes=mae,d2mae,usfm,simmim --notorch --corruption  # overhead
  python -m benchmarks.step --dtype=bfloat16 --batch=256 --variant=b --decoder=512x8x16  # on a GPU
  python -m benchmarks.step --profile=/tmp/prof              # + per-op tables of both sides

Threads: `--threads=N` (default: all cores this process may use, `nproc`) pins the process to N
cores before JAX and torch start, sets torch's intra-op threads to N, and lets XLA:CPU size its
intra-op pool from the same affinity mask, so both sides get the same N cores.

Pseudo-recipe `simmim`: USFM's model (all tokens, linear decoder, L1 + FFL) with no corruption and
no augmentation, to separate USFM's model cost from what its recipe adds (augmentation, masking).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
import types

from absl import flags

from mae_jax import tool_flags

CONFIG_FILES = {"mae": "mae", "deblur": "deblur_mae", "denoise": "denoise_mae",
                "d2mae": "d2mae", "usfm": "usfm", "simmim": "usfm"}
# The PyTorch peers. `torch-official` is built as facebookresearch/mae builds its model (timm
# `Block`/`PatchEmbed`, fused SDPA attention): the code a researcher would otherwise run, and the
# headline ratio. `torch-hf` is transformers' ViTMAEForPreTraining, the same numerics.
PEERS = {"official": "torch-official", "transformers": "torch-hf"}
HEADLINE = PEERS["official"]


def is_torch(name: str) -> bool:
  return name in PEERS.values()
# The plain step of each recipe's model: its overhead (corruption, extra tokens, loss) is measured
# against this. USFM's SimMIM model encodes all tokens (docs/methods.md#usfm), so MAE is not its plain step.
PLAIN = {"mae": "mae", "deblur": "mae", "denoise": "mae", "d2mae": "mae", "usfm": "simmim",
         "simmim": "simmim"}


def define_flags(fv: flags.FlagValues, peers: bool = True) -> None:
  """This tool's flags on `fv` (benchmarks.levers reuses them without the PyTorch ones)."""
  flags.DEFINE_list("recipes", ["mae"], "Comma list of mae,deblur,denoise,d2mae,usfm,simmim.", flag_values=fv)
  flags.DEFINE_string("variant", "s", "Encoder preset (mae_jax.models.vit.PRESETS); s = 384x12, 6 heads.",
                      flag_values=fv)
  flags.DEFINE_string("decoder", "256x4x8", "Decoder WIDTHxDEPTHxHEADS.", flag_values=fv)
  flags.DEFINE_integer("patch", 0, "Patch size (0: the preset's).", flag_values=fv)
  flags.DEFINE_integer("batch", 32, "Batch size.", flag_values=fv)
  flags.DEFINE_integer("image_size", 224, "Image side (px).", flag_values=fv)
  flags.DEFINE_integer("channels", 3, "Image channels.", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32); "
                    "torch uses autocast for bfloat16.", flag_values=fv)
  flags.DEFINE_string("config_args", "", "Extra config words, e.g. 'range=0.1:1.6:0.1'.", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "Timed steps per side.", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed steps per side after compilation.", flag_values=fv)
  flags.DEFINE_integer("threads", 0, "Cores for both sides (0: all usable, nproc).", flag_values=fv)
  if peers:
    flags.DEFINE_bool("torch", True, "Run the PyTorch peers (--notorch: JAX only).", flag_values=fv)
    flags.DEFINE_list("peers", ["official", "transformers"], "PyTorch peers: official (timm-built, as "
                      "facebookresearch/mae; the headline ratio) and transformers (ViTMAEForPreTraining).",
                      flag_values=fv)
    flags.DEFINE_enum("torch_adamw", "default", ["default", "foreach", "fused"], "torch AdamW implementation "
                      "(default: torch's choice, as the official MAE).", flag_values=fv)
  flags.DEFINE_bool("donate", True, "Donate the train state to the step, as the trainer does.", flag_values=fv)
  flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS before JAX starts.", flag_values=fv)
  flags.DEFINE_string("matmul_precision", "", "jax_default_matmul_precision (e.g. highest).", flag_values=fv)
  flags.DEFINE_bool("corruption", False, "Also time each recipe's corruption function alone (forward, "
                    "jitted).", flag_values=fv)
  flags.DEFINE_string("profile", "", "Directory for a jax.profiler trace and per-op tables.", flag_values=fv)
  flags.DEFINE_integer("profile_steps", 3, "Steps in the profile.", flag_values=fv)
  flags.DEFINE_string("json", "", "Write the results here.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of the images and the models.", flag_values=fv)


PROG = "python -m benchmarks.step"
FLAGS = flags.FlagValues()  # this tool's own (tool_flags): the benchmarks share flag names
define_flags(FLAGS)


def namespace(fv: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed flags as the attributes the sides read, checked; derived: peers, dec_width/depth/heads."""
  args = types.SimpleNamespace(**fv.flag_values_dict())
  args.recipes = [r for r in args.recipes if r]
  args.peers = [r for r in getattr(args, "peers", []) if r] if getattr(args, "torch", False) else []
  args.torch_adamw = getattr(args, "torch_adamw", "default")
  for r in args.peers:
    if r not in PEERS:
      raise SystemExit(f"--peers: unknown peer {r!r}; expected some of {sorted(PEERS)}")
  for r in args.recipes:
    if r not in CONFIG_FILES:
      raise SystemExit(f"--recipes: unknown recipe {r!r}; expected some of {sorted(CONFIG_FILES)}")
  try:
    args.dec_width, args.dec_depth, args.dec_heads = (int(v) for v in args.decoder.lower().split("x"))
  except ValueError:
    raise SystemExit(f"--decoder={args.decoder!r}: expected WIDTHxDEPTHxHEADS, e.g. 256x4x8") from None
  return args


def parse_args(argv: list[str]) -> types.SimpleNamespace:
  """The command line in-process (`argv` without the program name) as `namespace` gives it."""
  tool_flags.parse(FLAGS, argv, PROG)
  return namespace(FLAGS)


def setup_threads(n: int) -> int:
  """Pins this process to n of its usable cores (before JAX/torch create their pools)."""
  usable = sorted(os.sched_getaffinity(0))
  n = n or len(usable)
  if n > len(usable):
    raise SystemExit(f"--threads={n}: only {len(usable)} cores are usable")
  os.sched_setaffinity(0, usable[:n])
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, str(n))
  return n


# ------------------------------------------------------------------------------------------- config


def load_config(recipe: str, args):
  from mae_jax import config_files
  words = ",".join(filter(None, [args.variant, args.config_args if recipe != "simmim" else ""]))
  c = config_files.load(CONFIG_FILES[recipe], words)
  if recipe == "simmim":
    c.recipe = "mae"  # no corruption and no augmentation; the model path stays 'simmim'
    c.augment.enabled = False
  c.model.image_size = args.image_size
  c.model.in_chans = args.channels
  c.model.patch_size = args.patch
  c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = (
      args.dec_width, args.dec_depth, args.dec_heads)
  c.model.dtype = args.dtype
  c.train.batch_size = args.batch
  for key, value in getattr(args, "config_overrides", {}).items():  # benchmarks.levers
    node, *path = key.split(".")
    target = c[node]
    for k in path[:-1]:
      target = target[k]
    target[path[-1]] = value
  return c


# ---------------------------------------------------------------------------------------- memory


class RssPeak:
  """Peak resident set size while active, sampled every few ms (CPU peak memory of one side)."""

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak, self._stop = interval, 0, None

  @staticmethod
  def rss() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  def __enter__(self):
    self.base = self.peak = self.rss()
    self._stop = threading.Event()
    self._t = threading.Thread(target=self._run, daemon=True)
    self._t.start()
    return self

  def _run(self):
    while not self._stop.wait(self.interval):
      self.peak = max(self.peak, self.rss())

  def __exit__(self, *exc):
    self._stop.set()
    self._t.join()
    self.peak = max(self.peak, self.rss())

  @property
  def delta(self) -> int:
    return self.peak - self.base


# ------------------------------------------------------------------------------------------ sides


class JaxSide:
  """One recipe's jitted train step, compiled ahead of the timing."""

  def __init__(self, recipe: str, args, images_u8):
    import jax
    import jax.numpy as jnp
    from mae_jax import models
    from mae_jax.train import core, optim, pretrain

    self.name, self.batch = recipe, args.batch
    self.config = config = load_config(recipe, args)
    t = config.train
    model = models.build_pretrain_model(config.model, seed=args.seed)
    graphdef, params, rest = core.split_model(model)
    self.num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    schedule = optim.warmup_cosine(t.base_lr * args.batch / 256, 10, 1000, t.min_lr)
    tx = optim.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    step = pretrain.make_train_step(config, graphdef, tx, schedule, MEAN, STD)
    state = core.init_state(params, tx, args.seed)
    self.batch_dev = {"image": jax.device_put(jnp.asarray(images_u8))}
    self.rest = rest
    # The trainer donates the state (pretrain.train); --nodonate measures that lever.
    jitted = jax.jit(step, donate_argnums=(0,) if args.donate else ())
    t0 = time.perf_counter()
    options = getattr(args, "compiler_options", None)  # benchmarks.levers: XLA options, this step only
    self.compiled = jitted.lower(state, rest, self.batch_dev).compile(options or None)
    self.compile_s = time.perf_counter() - t0
    self.state = state
    self.memory = _memory_analysis(self.compiled)

  def step(self):
    import jax
    self.state, metrics = self.compiled(self.state, self.rest, self.batch_dev)
    jax.block_until_ready((self.state, metrics))
    return metrics

  def loss(self) -> float:
    return float(self.step()["loss"])


def _memory_analysis(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return {}
  if m is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


class TorchSide:
  """A PyTorch MAE + torch AdamW with MAE's no-decay groups: the official MAE's training step.
  `peer` picks the model: 'official' (benchmarks/official_mae_peer.py, timm blocks, as
  facebookresearch/mae) or 'transformers' (ViTMAEForPreTraining)."""

  def __init__(self, args, images_u8, config, peer: str = "official"):
    import torch

    self.name, self.batch = PEERS[peer], args.batch
    from mae_jax.models import vit
    width, depth, heads, patch = vit.PRESETS[args.variant]
    m = config.model
    torch.manual_seed(args.seed)
    self.device = torch.device("cuda" if torch.cuda.is_available() and _jax_platform() == "gpu" else "cpu")
    if peer == "official":
      from benchmarks.official_mae_peer import OfficialStyleMAE
      self.model = OfficialStyleMAE(
          img_size=args.image_size, patch_size=args.patch or patch, in_chans=args.channels,
          embed_dim=width, depth=depth, num_heads=heads, decoder_embed_dim=args.dec_width,
          decoder_depth=args.dec_depth, decoder_num_heads=args.dec_heads,
          norm_pix_loss=m.norm_pix_loss).to(self.device).train()
      self.attn_implementation = "timm " + ("fused sdpa" if self.model.blocks[0].attn.fused_attn else "eager")
      self._forward = lambda x: self.model(x, mask_ratio=m.mask_ratio)[0]
    else:
      from transformers import ViTMAEConfig, ViTMAEForPreTraining
      cfg = ViTMAEConfig(
          hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
          intermediate_size=4 * width, image_size=args.image_size, patch_size=args.patch or patch,
          num_channels=args.channels, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu",
          decoder_hidden_size=args.dec_width, decoder_num_hidden_layers=args.dec_depth,
          decoder_num_attention_heads=args.dec_heads, decoder_intermediate_size=4 * args.dec_width,
          mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, hidden_dropout_prob=0.0,
          attention_probs_dropout_prob=0.0)
      self.model = ViTMAEForPreTraining(cfg).to(self.device).train()
      self.attn_implementation = self.model.config._attn_implementation
      self._forward = lambda x: self.model(pixel_values=x).loss
    # Trainable parameters only: the official model keeps its fixed sin-cos tables as frozen
    # parameters, transformers as buffers.
    decay = [p for n, p in self.model.named_parameters() if p.ndim > 1 and p.requires_grad]
    no_decay = [p for n, p in self.model.named_parameters() if p.ndim <= 1 and p.requires_grad]
    kw = {"foreach": True} if args.torch_adamw == "foreach" else (
        {"fused": True} if args.torch_adamw == "fused" else {})
    t = config.train
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=t.base_lr * args.batch / 256, betas=(t.b1, t.b2), **kw)
    self.num_params = sum(p.numel() for p in decay + no_decay)
    # NHWC -> NCHW once, outside the timing: each framework gets its native layout.
    self.images = torch.from_numpy(images_u8.transpose(0, 3, 1, 2).copy()).to(self.device)
    self.autocast = args.dtype == "bfloat16"
    self.compile_s = 0.0
    self.memory = {}
    self._torch = torch

  def step(self):
    torch = self._torch
    x = (self.images.float() / 255.0 - MEAN) / STD
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      loss = self._forward(x)
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    if self.device.type == "cuda":
      torch.cuda.synchronize()
    return loss

  def loss(self) -> float:
    return float(self.step())


MEAN, STD = 0.5, 0.25  # any fixed dataset statistics: normalisation costs the same


def _jax_platform() -> str:
  import jax
  return jax.default_backend()


# ----------------------------------------------------------------------------------------- timing


def time_sides(sides, steps: int) -> dict[str, list[float]]:
  """Round-robin, one step per turn, the order reversed every round (A B B A A B ...)."""
  times = {s.name: [] for s in sides}
  cpu = {s.name: [] for s in sides}
  for r in range(steps):
    for s in (sides if r % 2 == 0 else sides[::-1]):
      c0, t0 = time.process_time(), time.perf_counter()
      s.step()
      times[s.name].append(time.perf_counter() - t0)
      cpu[s.name].append(time.process_time() - c0)
  return times, cpu


def warm_up(side, steps: int, on_gpu: bool) -> dict:
  """Untimed steps; measures the peak memory of the side while it runs."""
  mem = {}
  if on_gpu:
    import jax
    if is_torch(side.name):
      side._torch.cuda.reset_peak_memory_stats()
  with RssPeak() as rss:
    t0 = time.perf_counter()
    side.step()
    first = time.perf_counter() - t0
    for _ in range(max(steps - 1, 0)):
      side.step()
  mem["host_rss_peak_delta_bytes"] = rss.delta
  if on_gpu:
    if is_torch(side.name):
      mem["device_peak_bytes"] = int(side._torch.cuda.max_memory_allocated())
    else:
      stats = jax.devices()[0].memory_stats() or {}
      mem["device_peak_bytes_process"] = int(stats.get("peak_bytes_in_use", 0))
  if is_torch(side.name):
    side.compile_s = first  # eager: the first step pays allocator and kernel-selection warm-up
  return mem


def time_corruption(config, images_u8, steps: int) -> float:
  """Median seconds of the recipe's corruption alone (uint8 -> float, USFM's augmentation where the
  config has it, corrupt), jitted, forward."""
  import jax
  import jax.numpy as jnp
  from mae_jax import recipes

  @jax.jit
  def fn(key, images):
    x01 = images.astype(jnp.float32) / 255.0
    return recipes.augment_and_corrupt(config, key, x01)

  images = jax.device_put(jnp.asarray(images_u8))
  key = jax.random.key(0)
  jax.block_until_ready(fn(key, images))
  ts = []
  for i in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(jax.random.fold_in(key, i), images))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


# ---------------------------------------------------------------------------------------- profile


def profile_sides(sides, directory: str, steps: int) -> dict:
  """jax.profiler trace of each JAX side (per-op and per-category tables from it, joined with the
  compiled HLO) and a torch.profiler table of the peer, all in ms per step."""
  import jax
  out = {}
  os.makedirs(directory, exist_ok=True)
  for s in sides:
    if is_torch(s.name):
      import torch.profiler as tp
      with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
          s.step()
      table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
      path = os.path.join(directory, "torch_ops.txt")
      with open(path, "w") as f:
        f.write(table)
      out[s.name] = {"table": path, "ops": _torch_op_rows(prof, steps)}
    else:
      d = os.path.join(directory, f"jax_{s.name}")
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(steps):
          s.step()
      hlo = s.compiled.as_text()
      with open(os.path.join(directory, f"jax_{s.name}_hlo.txt"), "w") as f:
        f.write(hlo)
      per_instance = {k: v / steps for k, v in trace_op_ms(d).items()}
      rows, cats = jax_op_rows(per_instance, hlo)
      path = os.path.join(directory, f"jax_{s.name}_ops.txt")
      with open(path, "w") as f:
        f.write(format_rows(rows, 200) + "\n\n" + format_categories(cats))
      out[s.name] = {"table": path, "ops": rows[:60], "categories": cats}
  return out


def _torch_op_rows(prof, steps: int) -> list[dict]:
  rows = []
  for e in prof.key_averages():
    rows.append({"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                 "count_per_step": e.count / steps})
  rows.sort(key=lambda r: -r["ms_per_step"])
  total = sum(r["ms_per_step"] for r in rows)
  for r in rows:
    r["share"] = r["ms_per_step"] / total if total else 0.0
  return rows[:60]


def trace_op_ms(trace_dir: str) -> dict[str, float]:
  """Total ms of each event name in the perfetto trace (XLA:CPU emits one event per HLO op)."""
  import glob
  import gzip
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    return {}
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  agg = {}
  for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if e.get("ph") == "X" and "dur" in e:
      agg[e["name"]] = agg.get(e["name"], 0.0) + e["dur"] / 1e3
  return agg


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (its op_name metadata, its custom-call target or ""), for the entry
  computation of a compiled module."""
  import re
  entry = hlo_text[hlo_text.find("\nENTRY"):]
  ops = {}
  for line in entry.splitlines():
    m = re.match(r"\s+(?:ROOT )?%(\S+) = ", line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      target = re.search(r'custom_call_target="([^"]*)"', line)
      ops[m.group(1)] = (meta.group(1) if meta else "", target.group(1) if target else "")
  return ops


def op_category(name: str, op_name: str, target: str = "") -> tuple[str, str]:
  """(what, phase) of one HLO op. phase: forward / backward (transpose of the forward) / update
  (everything outside the gradient: optimizer, finite check). what: attention or MLP (from the
  model's named scopes) or other, split into matmul and the rest."""
  phase = "backward" if "transpose(" in op_name else ("forward" if "jvp(" in op_name else "update")
  last = op_name.rsplit("/", 1)[-1]
  matmul = name.startswith("dot") or "dot_general" in last or "->" in last
  scope = "attention" if "attn" in op_name else ("mlp" if "mlp" in op_name else "other")
  if phase == "update":
    return "optimizer + finite check", phase
  return f"{scope} {'matmul' if matmul else 'non-matmul'}", phase


def jax_op_rows(per_instance: dict[str, float], hlo_text: str):
  """Per op kind (HLO name without its numeric suffix) and per category, ms per step. Only events
  that are HLO ops count; time is summed over threads (ops can run on both cores at once)."""
  import re
  ops = hlo_ops(hlo_text)
  agg, cats = {}, {}
  for name, ms in per_instance.items():
    if name not in ops:
      continue
    key = re.sub(r"(\.\d+)+$", "", name)
    op_name, target = ops[name]
    if target:  # custom calls by target, not all as "ffi_call"
      key = f"{key}:{target}"
    a = agg.setdefault(key, [0.0, 0])
    a[0] += ms
    a[1] += 1
    what, phase = op_category(name, op_name, target)
    c = cats.setdefault(what, {"forward": 0.0, "backward": 0.0, "update": 0.0})
    c[phase] += ms
  rows = [{"op": k, "ms_per_step": v[0], "count_per_step": v[1]} for k, v in agg.items()]
  rows.sort(key=lambda r: -r["ms_per_step"])
  total = sum(r["ms_per_step"] for r in rows)
  for r in rows:
    r["share"] = r["ms_per_step"] / total if total else 0.0
  return rows, dict(sorted(cats.items(), key=lambda kv: -sum(kv[1].values())))


def format_categories(cats: dict) -> str:
  total = sum(sum(c.values()) for c in cats.values()) or 1.0
  lines = [f"{'category':28s} {'forward':>9s} {'backward':>9s} {'update':>9s} {'total':>9s} {'share':>7s}"]
  for what, c in cats.items():
    t = sum(c.values())
    lines.append(f"{what:28s} {c['forward']:9.1f} {c['backward']:9.1f} {c['update']:9.1f} {t:9.1f} "
                 f"{100 * t / total:6.1f}%")
  lines.append(f"{'all ops (ms/step, summed over threads)':44s}{'':16s}{total:9.1f}")
  return "\n".join(lines)


def format_rows(rows, limit: int = 60) -> str:
  lines = [f"{'op':60s} {'ms/step':>10s} {'share':>7s} {'calls/step':>10s}"]
  for r in rows[:limit]:
    lines.append(f"{r['op'][:60]:60s} {r['ms_per_step']:10.2f} {100 * r['share']:6.1f}% "
                 f"{r['count_per_step']:10.1f}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def environment(threads: int) -> dict:
  import jax
  env = {"python": platform.python_version(), "jax": jax.__version__, "platform": _jax_platform(),
         "device": jax.devices()[0].device_kind, "threads": threads, "nproc": os.cpu_count(),
         "load_avg": os.getloadavg(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
         "cpu": _cpu_name()}
  try:
    import torch
    import transformers
    env.update(torch=torch.__version__, transformers=transformers.__version__,
               torch_threads=torch.get_num_threads(), mkldnn=torch.backends.mkldnn.is_available())
  except ImportError:
    pass
  return env


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv: list[str]) -> dict:
  """The command line in-process: `argv` are the flags (no program name); the results."""
  return run(parse_args(argv))


def run(args: types.SimpleNamespace) -> dict:
  threads = setup_threads(args.threads)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  import jax
  import numpy as np
  if args.matmul_precision:
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
  from benchmarks import flops as flops_lib
  if args.peers:
    import torch
    torch.set_num_threads(threads)

  on_gpu = _jax_platform() == "gpu"
  rng = np.random.default_rng(args.seed)
  images = rng.integers(0, 256, size=(args.batch, args.image_size, args.image_size, args.channels),
                        dtype=np.uint8)
  env = environment(threads)
  print(f"# {env['cpu']} | {env['device']} ({env['platform']}) | threads {threads}/{env['nproc']} "
        f"| load avg {env['load_avg'][0]:.2f} {env['load_avg'][1]:.2f} {env['load_avg'][2]:.2f}")
  print(f"# jax {env['jax']} torch {env.get('torch', '-')} transformers {env.get('transformers', '-')} "
        f"| XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)

  sides, results = [], {}
  for r in args.recipes:
    s = JaxSide(r, args, images)
    sides.append(s)
    results[r] = {"compile_s": s.compile_s, "params": s.num_params, "xla_memory": s.memory,
                  "train_gflop_per_image": flops_lib.train_flops_per_image(s.config.model) / 1e9}
    print(f"# compiled {r}: {s.compile_s:.1f}s, {s.num_params / 1e6:.2f}M params", flush=True)
  for peer in args.peers:
    s = TorchSide(args, images, load_config("mae", args), peer)
    sides.append(s)
    results[s.name] = {"params": s.num_params, "attn": s.attn_implementation,
                       "adamw": args.torch_adamw}

  for s in sides:
    results[s.name]["memory"] = warm_up(s, args.warmup, on_gpu)
    if is_torch(s.name):
      results[s.name]["compile_s"] = s.compile_s
  times, cpu = time_sides(sides, args.steps)
  for s in sides:
    ts = times[s.name]
    med = statistics.median(ts)
    results[s.name].update(step_s_median=med, step_s_min=min(ts), step_s_max=max(ts),
                           images_per_s=args.batch / med, steps=len(ts), step_s_all=ts,
                           cpu_s_median=statistics.median(cpu[s.name]))
    if not is_torch(s.name) and on_gpu:
      peak = flops_lib.peak_flops(env["device"])
      if peak:
        results[s.name]["mfu"] = flops_lib.mfu(args.batch / med, results[s.name]["train_gflop_per_image"] * 1e9, peak)
  if args.corruption:
    for s in sides:
      if not is_torch(s.name):
        results[s.name]["corruption_s"] = time_corruption(s.config, images, args.steps)

  profile = profile_sides(sides, args.profile, args.profile_steps) if args.profile else {}
  env["load_avg_end"] = os.getloadavg()
  _print_table(args, results, sides, profile)
  out = {"args": {k: v for k, v in vars(args).items()}, "env": env, "results": results,
         "profile": profile}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2, default=str)
  return out


def _print_table(args, results, sides, profile):
  print(f"\nbatch {args.batch}, {args.image_size}x{args.image_size}x{args.channels}, {args.dtype}, "
        f"encoder {args.variant}, decoder {args.decoder}; {args.steps} timed steps per side, "
        f"medians")
  hdr = (f"{'side':14s} {'step ms':>9s} {'cpu ms':>9s} {'img/s':>8s} {'compile s':>9s} "
         f"{'peak RSS +MB':>12s} {'XLA temp MB':>11s}")
  mae_s = results.get("mae", {}).get("step_s_median")
  torch_s = results.get(HEADLINE, {}).get("step_s_median")
  hf_s = results.get(PEERS["transformers"], {}).get("step_s_median")
  hdr += (f" {'vs official':>11s} {'vs hf':>7s} {'vs mae':>7s} {'vs plain':>8s} {'GFLOP/img':>9s} {'MFU':>6s} "
          f"{'corrupt ms':>10s}")
  print(hdr)
  for s in sides:
    r = results[s.name]
    mem = r.get("memory", {}).get("host_rss_peak_delta_bytes", 0) / 2**20
    temp = r.get("xla_memory", {}).get("temp_size_in_bytes")
    temp = f"{temp / 2**20:.0f}" if temp is not None else "-"
    line = (f"{s.name:14s} {1e3 * r['step_s_median']:9.1f} {1e3 * r['cpu_s_median']:9.1f} "
            f"{r['images_per_s']:8.2f} "
            f"{r.get('compile_s', 0):9.1f} {mem:12.0f} {temp:>11s}")
    vs_t = f"{torch_s / r['step_s_median']:.3f}x" if torch_s and s.name != HEADLINE else "-"
    vs_h = f"{hf_s / r['step_s_median']:.3f}x" if hf_s and not is_torch(s.name) else "-"
    vs_m = f"{r['step_s_median'] / mae_s:.3f}" if mae_s and not is_torch(s.name) else "-"
    plain = results.get(PLAIN.get(s.name, ""), {}).get("step_s_median")
    vs_p = f"{r['step_s_median'] / plain:.3f}" if plain else "-"
    gf = f"{r['train_gflop_per_image']:.2f}" if "train_gflop_per_image" in r else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    cor = f"{1e3 * r['corruption_s']:.1f}" if "corruption_s" in r else "-"
    print(line + f" {vs_t:>11s} {vs_h:>7s} {vs_m:>7s} {vs_p:>8s} {gf:>9s} {mfu:>6s} {cor:>10s}")
  if "mae" in results:
    for peer_name, peer_s in ((HEADLINE, torch_s), (PEERS["transformers"], hf_s)):
      if peer_s:
        print(f"ratio (JAX mae img/s / {peer_name} img/s) = "
              f"{peer_s / results['mae']['step_s_median']:.3f}" + ("  <- headline" if peer_name == HEADLINE else ""))
  overheads = [f"{n} {100 * (results[n]['step_s_median'] / results[PLAIN[n]]['step_s_median'] - 1):+.1f}%"
               f" over {PLAIN[n]}" for n in results
               if not is_torch(n) and PLAIN.get(n, n) != n and PLAIN[n] in results]
  if overheads:
    print("recipe overhead over its model's plain step: " + ", ".join(overheads))
  for name, p in profile.items():
    print(f"\n## per-op profile: {name} ({p['table']})")
    print(format_rows(p["ops"], 25))
    if "categories" in p:
      print()
      print(format_categories(p["categories"]))


if __name__ == "__main__":
  tool_flags.run(FLAGS, lambda: run(namespace(FLAGS)))
