"""Image enhancement (USFM §4.1.2, Table 4, Fig. 5b): CycleGAN from low- to high-quality ultrasound,
optionally helped by the features of a frozen pretrained encoder. See docs/enhancement.md.

`run(config, workdir)` for `config.job == 'enhance'`:

  1. Data: the low- and high-quality images of each split, in memory at `model.image_size`
     (`us_phantom` with task='enhance': paired acquisitions of one scene; or a folder with `low/` and
     `high/`, `folder.enhance_layout`). Training is unpaired, as CycleGAN's: each step draws its low
     and its high images independently (a pure function of the seeds and the step, so a resumed run
     draws the same batches), with random horizontal flips inside the step.
  2. Model (`models/cyclegan.py`): two ResNet generators, two PatchGAN discriminators. With
     `init_from` set (and `model.features`), both generators receive the frozen encoder's patch
     features of their own input (the pretraining's normalisation and transfer blur), resized to
     the generator's S/4 grid and concatenated on the channel axis. The encoder's parameters are an
     argument of the step, never differentiated (stop_gradient) and never in the optimiser.
  3. One jitted step over the mesh (batch split over ('data', 'fsdp'), the small CNNs replicated):
     generator losses (LSGAN, cycle λ, identity 0.5·λ) and their gradients with the discriminators
     fixed; the fakes through the on-device image pools (`query_pool`); the discriminator losses
     (LSGAN, halved) and their gradients; then one Adam (2e-4, β = (0.5, 0.999)) update of all four
     networks through `core.apply_if_finite` (Adam is per element, so this equals the official two
     optimisers), skipped as a whole with the pools left unchanged when a loss is not finite.
     Learning rate constant, then linearly to 0 over the last `train.decay_fraction` of the steps.
  4. Every `train.eval_every` epochs: mean SSIM of G_A(low) against high on the validation pairs; the best
     parameters are kept (`downstream.Validation` / `downstream.Checkpoints`: the latest state with
     the pools as its non-trained `stats`, the best parameters, every `train.checkpoint_every`
     epochs and at SIGTERM).
  5. Test: the best G_A on the test pairs, per-image SSIM / LNCC / NMI (`image_quality`), mean ± std
     and bootstrap CIs, the same for the identity baseline (the low image itself), written as
     `results.json` / `results.md`, `metrics_test.csv`, `predictions_test.npz` (low, enhanced, high
     as uint8) and `enhanced_test.png` (low | enhanced | high).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from mae_jax import evaluate, image_quality
from mae_jax.data import sources
from mae_jax.models import cyclegan
from mae_jax.train import core, downstream, optim, preemption, sharding, transfer, writers

log = logging.getLogger("mae_jax")

METRICS = image_quality.METRICS
SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------- checks


def validate_config(config, num_devices: int) -> None:
  fail = downstream.fail
  t, m = config.train, config.model
  if int(m.image_size) < 16 or int(m.image_size) % 4:
    fail("model.image_size", m.image_size, "must be a multiple of 4 and >= 16 (two stride-2 stages)")
  for name in ("ngf", "ndf"):
    if int(m[name]) < 1:
      fail(f"model.{name}", m[name], "must be >= 1")
  if int(m.n_blocks) < 0:
    fail("model.n_blocks", m.n_blocks, "must be >= 0")
  if not 1 <= int(m.n_layers) <= 5:
    fail("model.n_layers", m.n_layers, "must lie in [1, 5] (3 = the 70×70 PatchGAN)")
  downstream.validate_steps(t, num_devices)
  if t.lr <= 0:
    fail("train.lr", t.lr, "must be > 0")
  if not 0.0 <= t.decay_fraction <= 1.0:
    fail("train.decay_fraction", t.decay_fraction, "must lie in [0, 1]")
  if t.lambda_cycle < 0 or t.lambda_identity < 0:
    fail("train.lambda_cycle", (t.lambda_cycle, t.lambda_identity), "weights must be >= 0")
  for name in ("eval_every", "checkpoint_every"):
    if int(t[name]) < 1:
      fail(f"train.{name}", t[name], "must be >= 1 (epochs)")
    if name == "checkpoint_every" and int(t.checkpoint_every) % int(t.eval_every):
      fail("train.checkpoint_every", t.checkpoint_every,
           f"must be a multiple of train.eval_every ({t.eval_every}): checkpoints follow a validation")
  if int(t.pool_size) < 0:
    fail("train.pool_size", t.pool_size, "must be >= 0 (0: no image pool)")
  if config.data.name not in ("us_phantom", "folder"):
    fail("data.name", config.data.name, "expected 'us_phantom' or 'folder'")
  organ = config.data.get("organ") or ""
  if organ and config.data.name == "us_phantom":
    from mae_jax.data import phantom
    if organ not in phantom.ORGANS:
      fail("data.organ", organ, f"expected '' or one of {phantom.ORGANS}")
  if organ and config.data.name == "folder":
    fail("data.organ", organ, "only the built-in dataset has organs; point data.folder at one organ")


# --------------------------------------------------------------------------------------- data


def _resize(a: np.ndarray, size: int) -> np.ndarray:
  a = np.asarray(a, np.uint8)
  a = a[..., 0] if a.ndim == 3 else a
  if a.shape == (size, size):
    return a
  return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR), np.uint8)


def load_split(config, split: str, size: int) -> dict:
  """{'low': (Na, S, S, 1) uint8, 'high': (Nb, S, S, 1) uint8, 'paired': bool, 'organ': (Na,)}: a
  split in memory (paired row by row when `paired`)."""
  d = config.data
  if d.name == "us_phantom":
    from mae_jax.data import phantom
    src = sources.open_source(d, split, task="enhance")
    keep = np.arange(len(src))
    if d.get("organ"):
      keep = keep[src.organ_ids == phantom.ORGANS.index(d.organ)]
    recs = [src[int(i)] for i in keep]
    low = np.stack([_resize(r["low"], size) for r in recs])[..., None]
    high = np.stack([_resize(r["high"], size) for r in recs])[..., None]
    return {"low": low, "high": high, "paired": True, "organ": np.array([int(r["organ"]) for r in recs])}
  from mae_jax.data import folder
  if not d.folder:
    raise ValueError("config.data.folder is empty: with data.name='folder' it must name a directory "
                     "with low/ and high/")
  lay = _folder_layout(os.path.abspath(os.path.expanduser(d.folder)), int(d.seed))[split]
  for path, why in lay["skipped"]:
    log.warning("data.folder: skipped %s: %s", path, why)
  read = lambda paths: (np.stack([_resize(folder.read_gray(p), size) for p in paths])[..., None]
                        if paths else np.zeros((0, size, size, 1), np.uint8))
  if split == "train":
    low, high = read(lay["low"]), read(lay["high"])
    paired = False
  else:
    low, high = read([a for a, _ in lay["pairs"]]), read([b for _, b in lay["pairs"]])
    paired = True
  return {"low": low, "high": high, "paired": paired, "organ": np.full(len(low), -1)}


@functools.lru_cache(maxsize=4)
def _folder_layout(root: str, seed: int):
  from mae_jax.data import folder
  return folder.enhance_layout(root, split_seed=seed)


def batch_indices(n_low: int, n_high: int, *, seed: int, step: int, batch: int):
  """The rows of the low and of the high images drawn at `step` (independently: unpaired
  training), a pure function of the seed and the step."""
  rng = np.random.default_rng([seed, step])
  return rng.integers(0, n_low, batch), rng.integers(0, n_high, batch)


def train_batch(data: dict, config, step: int, mesh) -> dict:
  t = config.train
  ia, ib = batch_indices(len(data["low"]), len(data["high"]), seed=config.data.seed + config.seed,
                         step=step, batch=int(t.batch_size))
  local = int(t.batch_size) // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  return sharding.global_batch({"low": data["low"][ia[rows]], "high": data["high"][ib[rows]]}, mesh)


# ------------------------------------------------------------------------------ frozen encoder


class FeatureExtractor:
  """The frozen encoder of a pretraining workdir as a pure function of its (non-trained) weights:
  [0, 1] images → (N, gh, gw, D) patch features, stop_gradient-ed. Input: resized to the
  pretraining size, the recipe's transfer blur (Deblurring MAE), the pretraining normalisation."""

  def __init__(self, pre: downstream.Pretrained, native_size: int | None = None):
    """native_size: the stored side of the enhancement images, so that a Deblurring MAE blur given
    in stored pixels gets its meaning (σ·S/native_size); None: σ at zoom 1."""
    self.pcfg = pre.config
    self.plan = transfer.TransferPlan(pre.config, None, None)  # D²MAE: no σ* search, t unused
    self.native_size = native_size
    self.mean, self.std = float(pre.mean), float(pre.std)
    encoder = pre.model.encoder
    self.spec = encoder.spec
    graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
    self.graphdef = graphdef
    self.weights = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}

  @property
  def dim(self) -> int:
    return int(self.spec.width)

  def __call__(self, weights, x01):
    s, c = int(self.spec.image_size), int(self.spec.in_chans)
    if x01.shape[1:3] != (s, s):
      x01 = jax.image.resize(x01, (x01.shape[0], s, s, x01.shape[-1]), "linear")
    if x01.shape[-1] != c:
      x01 = jnp.broadcast_to(x01[..., :1], (*x01.shape[:3], c))
    n = x01.shape[0]
    if self.plan.fixed_gaussian:  # Deblurring MAE's σ, per axis in native units
      zoom = np.full((n, 2), s / self.native_size if self.native_size else 1.0, np.float32)
      sigma = jnp.asarray(self.plan.lookup("test", np.zeros(n, np.int64), zoom)["sigma"])
    else:
      sigma = jnp.zeros((n,), jnp.float32)
    x01 = self.plan.apply(x01, sigma)
    enc = nnx.merge(self.graphdef, weights["params"], weights["rest"])
    tokens = enc((x01 - self.mean) / self.std)[:, 1:]
    gh, gw = self.spec.grid
    return jax.lax.stop_gradient(tokens.reshape(tokens.shape[0], gh, gw, -1).astype(jnp.float32))


# ---------------------------------------------------------------------------------- image pool


def init_pool(size: int, image_shape) -> dict:
  """The two image pools (fakes of each domain) as fixed-size arrays plus how many slots are filled."""
  z = lambda: jnp.zeros((size, *image_shape), jnp.float32)  # two buffers: both are donated
  return {"A": z(), "B": z(), "n_A": jnp.zeros((), jnp.int32), "n_B": jnp.zeros((), jnp.int32)}


def query_pool(images, count, batch, key):
  """CycleGAN's ImagePool.query, one image of `batch` after the other: while the pool is not full an
  image is stored and returned; then with probability 1/2 a random stored image is returned and
  replaced by it, else the image itself is returned. Returns (pool images, count, the returned batch)."""
  size = images.shape[0]
  if size == 0:
    return images, count, batch

  def one(carry, xs):
    imgs, n = carry
    img, k = xs
    k_p, k_i = jax.random.split(k)
    fill = n < size
    swap = (~fill) & (jax.random.uniform(k_p) > 0.5)
    idx = jax.random.randint(k_i, (), 0, size)
    out = jnp.where(swap, imgs[idx], img)
    pos = jnp.where(fill, n, idx)
    imgs = jnp.where(fill | swap, imgs.at[pos].set(img), imgs)
    return (imgs, n + fill.astype(n.dtype)), out

  (images, count), out = jax.lax.scan(one, (images, count), (batch, jax.random.split(key, batch.shape[0])))
  return images, count, out


# ---------------------------------------------------------------------------------------- steps


def lsgan(pred, target: float):
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def l1(a, b):
  return jnp.mean(jnp.abs(a - b))


def linear_decay(lr: float, total: int, decay_fraction: float):
  """Constant, then linearly to 0 over the last `decay_fraction` of the steps (CycleGAN's
  `lambda_rule`: 100 epochs at 2e-4, then 100 decaying)."""
  start = int(round(total * (1.0 - decay_fraction)))

  def schedule(step):
    frac = jnp.maximum(0.0, jnp.asarray(step, jnp.float32) - start) / float(total - start + 1)
    return lr * (1.0 - frac)

  return schedule


def make_steps(config, graphdef, rest, tx, schedule, features: FeatureExtractor | None):
  t = config.train
  lam, lam_idt = float(t.lambda_cycle), float(t.lambda_cycle) * float(t.lambda_identity)

  def feats(frozen, x):  # x in [-1, 1]
    return None if features is None else features(frozen, (x + 1.0) * 0.5)

  def gen_loss(g_params, d_params, frozen, A, B):
    model = nnx.merge(graphdef, {**g_params, **d_params}, rest)
    fA, fB = feats(frozen, A), feats(frozen, B)
    fake_B = model.G_A(A, fA)
    fake_A = model.G_B(B, fB)
    rec_A = model.G_B(fake_B, feats(frozen, fake_B))
    rec_B = model.G_A(fake_A, feats(frozen, fake_A))
    gan = lsgan(model.D_A(fake_B), 1.0) + lsgan(model.D_B(fake_A), 1.0)
    cycle = l1(rec_A, A) + l1(rec_B, B)
    loss = gan + lam * cycle
    idt = jnp.zeros(())
    if lam_idt > 0:
      idt = l1(model.G_A(B, fB), B) + l1(model.G_B(A, fA), A)
      loss = loss + lam_idt * idt
    return loss, {"g_gan": gan, "cycle": cycle, "identity": idt, "fake_A": fake_A, "fake_B": fake_B}

  def disc_loss(d_params, g_params, real_A, real_B, pooled_A, pooled_B):
    model = nnx.merge(graphdef, {**g_params, **d_params}, rest)
    d_a = 0.5 * (lsgan(model.D_A(real_B), 1.0) + lsgan(model.D_A(pooled_B), 0.0))
    d_b = 0.5 * (lsgan(model.D_B(real_A), 1.0) + lsgan(model.D_B(pooled_A), 0.0))
    return d_a + d_b, {"d_A": d_a, "d_B": d_b}

  def split(params):
    return ({k: params[k] for k in ("G_A", "G_B")}, {k: params[k] for k in ("D_A", "D_B")})

  def train_step(state: core.TrainState, pool, frozen, batch):
    key = core.step_key(state)
    k_fa, k_fb, k_pa, k_pb = jax.random.split(key, 4)
    A = batch["low"].astype(jnp.float32) / 127.5 - 1.0
    B = batch["high"].astype(jnp.float32) / 127.5 - 1.0
    if config.data.hflip:  # per image, each domain its own flips
      flip = lambda k, x: jnp.where(jax.random.bernoulli(k, 0.5, (x.shape[0], 1, 1, 1)), x[:, :, ::-1], x)
      A, B = flip(k_fa, A), flip(k_fb, B)
    g_params, d_params = split(state.params)
    (g_loss, g_aux), g_grads = jax.value_and_grad(gen_loss, has_aux=True)(g_params, d_params, frozen, A, B)
    fake_A, fake_B = jax.lax.stop_gradient(g_aux.pop("fake_A")), jax.lax.stop_gradient(g_aux.pop("fake_B"))
    pool_A, n_A, q_A = query_pool(pool["A"], pool["n_A"], fake_A, k_pa)
    pool_B, n_B, q_B = query_pool(pool["B"], pool["n_B"], fake_B, k_pb)
    (d_loss, d_aux), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(d_params, g_params, A, B, q_A, q_B)
    new_state, grad_norm, ok = core.apply_if_finite(state, {**g_grads, **d_grads}, g_loss + d_loss, tx)
    new_pool = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                            {"A": pool_A, "B": pool_B, "n_A": n_A, "n_B": n_B}, pool)
    metrics = {"loss": g_loss + d_loss, "g_loss": g_loss, "d_loss": d_loss, **g_aux, **d_aux,
               "grad_norm": grad_norm, "lr": schedule(state.step), "finite": ok.astype(jnp.float32),
               "skipped_total": new_state.skipped, "bad_streak": new_state.bad_steps}
    return new_state, new_pool, metrics

  def eval_step(params, frozen, low):
    model = nnx.merge(graphdef, params, rest)
    A = low.astype(jnp.float32) / 127.5 - 1.0
    return (model.G_A(A, feats(frozen, A)) + 1.0) * 0.5

  return train_step, eval_step


def enhance_split(eval_fn, params, frozen, low: np.ndarray, *, batch_size: int, mesh) -> np.ndarray:
  """G_A of every low image, (N, S, S, 1) float32 in [0, 1] (the last batch padded by repetition)."""
  outs = []
  local = batch_size // jax.process_count()
  for s in range(0, len(low), batch_size):
    x = low[s:s + batch_size]
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
    rows = x[jax.process_index() * local:(jax.process_index() + 1) * local]
    y = eval_fn(params, frozen, sharding.global_batch({"low": rows}, mesh)["low"])
    outs.append(np.asarray(sharding.host_gather(y))[:n])
  return np.clip(np.concatenate(outs), 0.0, 1.0)


# ------------------------------------------------------------------------------------------ run


def run(config, workdir: str) -> dict:
  """Trains CycleGAN (with the feature branch when `init_from` is set) in `workdir`; returns the
  test results, or {'preempted': True, 'step': ...} when SIGTERM stopped it (a rerun continues)."""
  return preemption.guarded(_run, config, workdir)


def _set_up(config, workdir: str):
  """(absolute workdir, is process 0, mesh, the `downstream.Pretrained` or None for plain CycleGAN)."""
  if config.get("init_from") and config.model.features:
    return downstream.set_up(config, workdir)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    core.save_config(config, workdir)
  return workdir, is_main, sharding.make_mesh(config.mesh.fsdp), None


def method_name(pre) -> str:
  return "CycleGAN" if pre is None else f"CycleGAN + {pre.config.recipe} features"


def _run(config, workdir: str, preempt: preemption.Preemption) -> dict:
  validate_config(config, jax.device_count())
  workdir, is_main, mesh, pre = _set_up(config, workdir)
  size = int(config.model.image_size)
  data = {s: load_split(config, s, size) for s in SPLITS}
  for s in SPLITS:
    if len(data[s]["low"]) == 0 or len(data[s]["high"]) == 0:
      raise ValueError(f"config.data: the {s} split has no {'low' if not len(data[s]['low']) else 'high'} "
                       f"images{' of organ ' + config.data.organ if config.data.get('organ') else ''}")
  n_train = max(len(data["train"]["low"]), len(data["train"]["high"]))
  log.info("enhancement data: train %d low / %d high%s, validation %d pairs, test %d pairs, %dpx",
           len(data["train"]["low"]), len(data["train"]["high"]),
           " (paired, trained unpaired)" if data["train"]["paired"] else " (unpaired)",
           len(data["validation"]["low"]), len(data["test"]["low"]), size)

  features = FeatureExtractor(pre, int(config.data.native_size)) if pre is not None else None
  if pre is not None:
    pre.model = None  # the extractor holds its weights
  m, t = config.model, config.train
  graphdef, params, rest = cyclegan.init(  # rest: empty (no non-trained state)
      config.seed, in_ch=1, ngf=int(m.ngf), n_blocks=int(m.n_blocks), ndf=int(m.ndf),
      n_layers=int(m.n_layers), feat_dim=features.dim if features else 0)
  n_params = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}

  steps = optim.Steps.of(t, n_train)
  schedule = linear_decay(float(t.lr), steps.total, float(t.decay_fraction))
  tx = optax.adam(schedule, b1=float(t.b1), b2=float(t.b2))
  state = core.init_state(params, tx, config.seed)
  shardings = sharding.state_shardings(mesh, state)
  pool = init_pool(int(t.pool_size), (size, size, 1))
  pool_sh = sharding.replicated(mesh, pool)
  frozen = features.weights if features else {}
  frozen_sh = sharding.replicated(mesh, frozen)
  frozen = jax.device_put(frozen, frozen_sh)

  ckpts = downstream.Checkpoints(workdir, int(t.keep_checkpoints))
  val = downstream.Validation("ssim", "SSIM")
  start, state, pool = ckpts.restore(val, state, shardings, pool, pool_sh)

  train_step, eval_step = make_steps(config, graphdef, rest, tx, schedule, features)
  bsh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(shardings, pool_sh, frozen_sh, bsh),
                    out_shardings=(shardings, pool_sh, sharding.replicated(mesh)), donate_argnums=(0, 1))
  eval_fn = jax.jit(eval_step, in_shardings=(shardings.params, frozen_sh, bsh),
                    out_shardings=sharding.replicated(mesh))
  eval_bs = int(t.eval_batch_size or t.batch_size)
  enhance = functools.partial(enhance_split, eval_fn, frozen=frozen, batch_size=eval_bs, mesh=mesh)

  writer = writers.Monitor(workdir, t, steps.total, start, is_main)
  log.info("%s: G %.3fM + %.3fM, D %.3fM + %.3fM params (ngf %d, %d blocks, %d×%d PatchGAN)%s; steps=%d "
           "(%d/epoch), batch=%d, lr=%.3g decaying over the last %.0f%%", method_name(pre),
           *(n_params[k] / 1e6 for k in ("G_A", "G_B", "D_A", "D_B")), m.ngf, m.n_blocks,
           cyclegan.receptive_field(int(m.n_layers)), cyclegan.receptive_field(int(m.n_layers)),
           f"; frozen {pre.config.recipe} encoder from {pre.init_from} (step {pre.step}, width {features.dim})"
           if pre else "", steps.total, steps.per_epoch, t.batch_size, t.lr, 100 * t.decay_fraction)

  def validate_epoch(step, carry):
    epoch = steps.epoch(step)
    if not steps.epoch_ends(step) or (epoch % int(t.eval_every) and step != steps.total):
      return
    state, pool = carry
    with writer.timed("validation"):
      out = enhance(state.params, low=data["validation"]["low"])
    vs = float(np.mean(image_quality.ssim(out, data["validation"]["high"] / 255.0)))
    writer.write_scalars(step, {"val_ssim": vs})
    improved = val.record(epoch, step, {"ssim": vs}, state.params, pool)
    log.info("epoch %d (step %d): validation SSIM %.4f%s", epoch, step, vs, " (best)" if improved else "")

  def train_one(carry, batch):
    state, pool, metrics = step_fn(*carry, frozen, batch)
    return (state, pool), metrics

  out = downstream.run_loop(
      config, preempt, writer, workdir, is_main, steps=steps, start=start, carry=(state, pool),
      batch=lambda step: train_batch(data["train"], config, step, mesh), step=train_one, ckpts=ckpts,
      val=val, split=lambda carry: carry,
      # a multiple of eval_every: checkpoints follow a validation
      checkpoint_every_epochs=t.checkpoint_every, evaluate=validate_epoch, lr_field="train.lr")
  step = out.step
  if out.preempted:
    writer.close()
    return {"preempted": True, "step": step}
  # (step, cycle loss, generator GAN loss, discriminator loss): the run's first step and the logged ones
  logged = ([out.first] if out.first and out.first[0] not in dict(out.history) else []) + out.history
  history = [{"step": s, "cycle": m["cycle"], "g_gan": m["g_gan"], "d_loss": m["d_loss"]} for s, m in logged]
  test = data["test"]
  out = enhance(jax.device_put(val.best_params(workdir), shardings.params), low=test["low"])
  high01, low01 = test["high"] / 255.0, test["low"] / 255.0
  per = image_quality.per_image(out, high01)
  ident = image_quality.per_image(low01, high01)
  kw = dict(n_boot=int(config.eval.n_boot), alpha=float(config.eval.alpha), seed=config.seed)
  summ, base = image_quality.summary(per, **kw), image_quality.summary(ident, **kw)
  writer.write_scalars(step, {f"test_{k}": v["mean"] for k, v in summ.items()})
  writer.close()
  organ = config.data.get("organ") or "all"
  row = lambda method, s: {"method": method, "organ": organ, "seed": str(config.seed),
                           **{k: (s[k]["mean"], s[k]["lo"], s[k]["hi"]) for k in METRICS}}
  results = {
      "rows": [row(method_name(pre), summ), row("identity (low-quality input)", base)],
      "test": {k: {"value": v["mean"], "std": v["std"], "lo": v["lo"], "hi": v["hi"]} for k, v in summ.items()},
      "identity_baseline": {k: {"value": v["mean"], "std": v["std"], "lo": v["lo"], "hi": v["hi"]}
                            for k, v in base.items()},
      "test_n": int(len(out)),
      "validation_best": val.best,
      "validation_history": val.history,
      "loss_history": history,
      "method": method_name(pre),
      "init_from": pre.init_from if pre else "",
      "pretrain_recipe": pre.config.recipe if pre else None,
      "checkpoint_step": int(pre.step) if pre else None,
      "metric_settings": {"ssim": "11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1",
                          "lncc": f"{image_quality.LNCC_WINDOW}x{image_quality.LNCC_WINDOW} windows "
                                  f"inside the image, squared, eps {image_quality.LNCC_EPS:g}",
                          "nmi": f"Studholme (H(A)+H(B))/H(A,B), {image_quality.NMI_BINS} bins per axis",
                          "nmi_sym": "2 MI / (H(A)+H(B)), same histogram",
                          "resolution": f"{size}px (model.image_size), intensities in [0, 1]"},
      "ci": downstream.ci_note(config),
  }
  if is_main:
    evaluate.write_results(workdir, "results", results, metrics=list(METRICS))
    with open(os.path.join(workdir, "results.md"), "a") as f:
      f.write("\nTest pairs, per image then mean ± std (USFM Table 4's form):\n\n")
      for name, s in ((method_name(pre), summ), ("identity", base)):
        f.write(f"- {name}: " + ", ".join(f"{k} {100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f} %"
                                           for k in METRICS) + "\n")
    with open(os.path.join(workdir, "metrics_test.csv"), "w") as f:
      f.write("position," + ",".join(METRICS) + "," + ",".join(f"identity_{k}" for k in METRICS) + "\n")
      for i in range(len(out)):
        f.write(f"{i}," + ",".join(f"{per[k][i]:.6g}" for k in METRICS) + ","
                + ",".join(f"{ident[k][i]:.6g}" for k in METRICS) + "\n")
    to8 = lambda a: np.round(np.asarray(a)[..., 0] * 255.0).astype(np.uint8)
    np.savez_compressed(os.path.join(workdir, "predictions_test.npz"), low=test["low"][..., 0],
                        enhanced=to8(out), high=test["high"][..., 0], organ=test["organ"],
                        method=np.array(method_name(pre)))
    n_fig = int(config.eval.figure_images)
    if n_fig > 0:
      try:
        from mae_jax import figures
        figures.save(figures.enhancement_figure(
            test["low"][:n_fig, ..., 0], [(method_name(pre), to8(out[:n_fig]))], test["high"][:n_fig, ..., 0]),
            os.path.join(workdir, "enhanced_test.png"))
      except ImportError:
        log.warning("matplotlib is not installed: no enhancement figure")
  log.info("test (best epoch %d, validation SSIM %.4f): %s; identity %s", val.best["epoch"], val.best["ssim"],
           ", ".join(f"{k} {summ[k]['mean']:.4f} [{summ[k]['lo']:.4f}, {summ[k]['hi']:.4f}]" for k in METRICS),
           ", ".join(f"{k} {base[k]['mean']:.4f}" for k in METRICS))
  return {"test": {k: v["mean"] for k, v in summ.items()}, "identity": {k: v["mean"] for k, v in base.items()},
          "per_image": per, "loss_history": history, "best": val.best, "step": step,
          "frozen": sharding.host_gather(frozen), "method": method_name(pre)}

