"""What the model learned, as pictures: reconstructions, USFM spectra, the D²MAE blurriness search.

Three layers, each usable alone:

* arrays (pure, jit-able): `denormalize_patches`, `paste_visible`, `reconstruct_arrays`
  (`reconstruction_columns` is the trainer's TensorBoard preview), `log_amplitude`, `panel`;
* a model and images -> results -> matplotlib figures: `reconstruct` -> `reconstruction_figure`
  (original | corrupted input | reconstruction | reconstruction with the visible patches pasted),
  `spectrum_figure` (USFM: log-amplitude spectra of input, band-stop mask and reconstruction),
  `obs_curve` -> `obs_figure` (D²MAE: loss against σ per image, σ*, deblurred strip);
* a workdir -> PNG files: `write_figures`, also the command line

    python -m mae_jax.visualize --workdir=DIR --out=FIG.png [--images=4 | --images=a.png,b.png]
        [--split=validation] [--seed=0] [--mask_ratio=R] [--stats=local|image|own]

  which writes FIG.png, plus FIG_obs.png for D²MAE and FIG_spectrum.png for USFM.

Norm-pix models (MAE's `norm_pix_loss`, on in `configs/mae.py`; Deblurring MAE, denoising MAE and
D²MAE train on pixels) predict each patch normalised by its own mean and std, which the masked
patches' pixels would be needed to undo.
The figures use only what is visible: a visible patch gets its own statistics, a masked patch the
average statistics of the visible patches around it (`stats='local'`); `stats='image'` gives every
patch the pooled statistics of all visible pixels, `stats='own'` the true per-patch statistics (an
oracle that shows only the shape of the prediction). The figure title says which.

Figures are `matplotlib.figure.Figure` objects made without pyplot (no global state, Agg when
saved), with a fixed size in inches at `DPI`, so a saved PNG's pixel size is known in advance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging

from mae_jax import config_files, recipes, recon_quality, tool_flags
from mae_jax import reconstruct as reconstruct_lib
from mae_jax.corrupt import blur as blur_lib
from mae_jax.figures import CELL, DPI, HEADER, enhancement_figure, new_figure, save, show  # noqa: F401
from mae_jax.reconstruct import (STATS, Reconstruction, corrupt_for_figure,  # noqa: F401
                                 denormalize_patches, log_amplitude, paste_visible, reconstruct,
                                 reconstruct_arrays, reconstruction_columns)

OBS_SIZE = (10.0, 8.0)  # inches
RECIPE_TITLES = {"mae": "MAE", "deblur": "Deblurring MAE", "denoise": "Denoising MAE",
                 "d2mae": "D²MAE", "usfm": "USFM"}
# configs/<file>.py of each recipe (the notebook trains these).
CONFIG_FILES = {"mae": "mae", "deblur": "deblur_mae", "denoise": "denoise_mae", "d2mae": "d2mae",
                "usfm": "usfm"}


@dataclasses.dataclass
class ObsCurve:
  """D²MAE optimal blurriness search on a batch, every level evaluated for the curve."""
  sigmas: np.ndarray  # (T,) σ_t, t = 1..T
  losses: np.ndarray  # (N, T) per-image OBS loss at every level
  searched_t: np.ndarray  # (K,) the levels the search with step s visits (1-based)
  t_star: np.ndarray  # (N,) what mae_jax.train.obs.search picks with step s
  sigma_star: np.ndarray  # (N,)
  step: int
  norm_pix: bool
  original: np.ndarray  # (H, W, C): image 0
  blurred: np.ndarray  # (K, H, W, C): image 0 blurred with each searched σ
  deblurred: np.ndarray  # (K, H, W, C): the model's output for each (mask ratio 0, token t)


def obs_curve(model, config, x01, mean: float, std: float, *, zoom=None,
              step: int | None = None) -> ObsCurve:
  """The OBS loss against σ for every level (the curve) and σ* as `mae_jax.train.obs.search` picks
  it with search step `step` (default: the pretraining config's `obs.step`, else 2). zoom: the
  batch's (N, 2) model pixels per stored pixel, passed to the search (σ in stored pixels: σ·zoom
  per axis; None means 1)."""
  from mae_jax.train import obs  # lazy: visualize is imported by the trainer

  if config.recipe != "d2mae":
    raise ValueError(f"the optimal blurriness search needs a D²MAE model (recipe={config.recipe!r})")
  if step is None:
    step = int((config.get("obs") or {}).get("step") or 2)
  x = np.asarray(x01, np.float32)
  levels = obs.levels_of(config)
  _, _, all_losses = obs.search(model, config, x, mean, std, 1, zoom=zoom)
  # σ* as the search with step s picks it: argmin over its levels, ties to the smallest t (the same
  # numbers as obs.search(..., step), checked in the tests; one model pass instead of two).
  ts = obs.searched_t(len(levels), step)
  t_star = ts[np.argmin(all_losses[:, ts - 1], axis=1)]
  sigma_star = levels[t_star - 1]
  # Image 0 at every searched level, exactly as obs.search(..., step, zoom) feeds it (σ_t·zoom_0
  # per axis in native units, the search's kernel for this batch; mask ratio 0, token t).
  sigmas = levels[ts - 1]
  zoom, ksize = obs.search_blur(config, sigmas, zoom, x.shape[0])
  sig = jnp.asarray(sigmas)
  if zoom is not None:
    sig = blur_lib.per_axis_sigma(sig, jnp.broadcast_to(jnp.asarray(zoom[:1]), (len(ts), 2)))
  x0 = jnp.broadcast_to(jnp.asarray(x[:1]), (len(ts),) + x.shape[1:])
  xb = blur_lib.gaussian_blur(x0, sig, kernel_size=ksize)
  kwargs = {"blur_t": jnp.asarray(ts)} if getattr(model, "blur_embed", "none") != "none" else {}
  noise = jnp.zeros((len(ts), model.spec.num_patches), jnp.float32)
  out = jax.device_get(reconstruct_lib.forward_pixels(model, x0, xb, noise, jnp.float32(mean), jnp.float32(std), kwargs,
                                0.0, "own"))
  return ObsCurve(sigmas=np.asarray(levels), losses=np.asarray(all_losses), searched_t=ts,
                  t_star=np.asarray(t_star), sigma_star=np.asarray(sigma_star), step=int(step),
                  norm_pix=bool(getattr(model, "norm_pix_loss", False)), original=x[0],
                  blurred=np.asarray(xb), deblurred=np.asarray(out["reconstruction"]))


# ----------------------------------------------------------------------------------------- figures


def _input_label(rec: Reconstruction, i: int) -> str:
  info = rec.info
  masked = f"{100 * float(rec.mask[i].mean()):.0f}% masked"
  if rec.recipe == "d2mae":
    return f"σ={float(info['sigma'][i]):.2f} (t={int(info['t'][i])}), {masked}"
  if rec.recipe == "deblur":
    extra = ", ".join(f"{'σ' if k == 'sigma' else k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in info.items() if k != "blur")
    return f"{info['blur']} blur{' ' + extra if extra else ''}, {masked}"
  if rec.recipe == "denoise":
    return f"noise std={info['noise_std']:g}, {masked}"
  if rec.recipe == "usfm":
    freq = "band-stop + " if info.get("frequency") else ""
    area = float(rec.pixel_mask[i].mean())
    return f"{freq}mean mask {100 * area:.0f}%"
  return f"input, {masked}"


def denorm_note(rec: Reconstruction) -> str:
  if not rec.norm_pix:
    return "pixel-space prediction (no norm-pix)"
  return {"local": "norm-pix: de-normalised with the visible patches' mean/std "
                   "(masked patch: its visible neighbours')",
          "image": "norm-pix: de-normalised with the visible pixels' pooled mean/std",
          "own": "norm-pix: de-normalised with each patch's TRUE mean/std (oracle)"}[rec.stats]


def reconstruction_figure(rec: Reconstruction, *, title: str | None = None):
  """N rows × 4 columns: original | corrupted input | reconstruction | reconstruction + visible.
  Size: (4·CELL) × (N·CELL + HEADER) inches at DPI."""
  n = rec.original.shape[0]
  fig = new_figure(4 * CELL, n * CELL + HEADER)
  top = 1.0 - HEADER / (n * CELL + HEADER)
  axes = fig.subplots(n, 4, squeeze=False)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.18)
  names = ["original", None, "reconstruction", "reconstruction + visible"]
  for i in range(n):
    for j, col in enumerate(rec.columns()):
      label = _input_label(rec, i) if j == 1 else (names[j] if i == 0 else None)
      show(axes[i, j], col[i], label)
  head = title or f"{RECIPE_TITLES.get(rec.recipe, rec.recipe)}" + (
      f" — step {rec.step}" if rec.step is not None else "")
  note = "\n".join(filter(None, [denorm_note(rec), recon_quality.caption(rec)]))
  fig.suptitle(f"{head}\n{note}", fontsize=9, y=1.0 - 0.08 / (n * CELL + HEADER))
  return fig


def spectrum_figure(rec: Reconstruction, *, title: str | None = None):
  """USFM: per image, log-amplitude spectra (DC centred) of the original, the model input and the
  reconstruction, and the band-stop mask between them. Size as `reconstruction_figure`."""
  if "spectrum_mask" not in rec.info:
    raise ValueError(f"spectrum figures are for USFM reconstructions (recipe={rec.recipe!r})")
  n = rec.original.shape[0]
  fig = new_figure(4 * CELL, n * CELL + HEADER)
  axes = fig.subplots(n, 4, squeeze=False)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1.0 - HEADER / (n * CELL + HEADER),
                      wspace=0.04, hspace=0.18)
  spectra = [log_amplitude(rec.original), log_amplitude(rec.model_input),
             log_amplitude(rec.reconstruction)]
  smask = rec.info["spectrum_mask"]
  for i in range(n):
    lo = min(float(s[i].min()) for s in spectra)
    hi = max(float(s[i].max()) for s in spectra)
    kw = dict(cmap="magma", vmin=lo, vmax=hi)
    first = i == 0
    show(axes[i, 0], spectra[0][i], "original |F|" if first else None, **kw)
    show(axes[i, 1], spectra[1][i], "input |F|" if first else None, **kw)
    removed = int(round(float((1 - smask[i]).sum())))
    show(axes[i, 2], smask[i], f"frequency mask ({removed} bins removed)", cmap="gray", vmin=0, vmax=1)
    show(axes[i, 3], spectra[2][i], "reconstruction |F|" if first else None, **kw)
  head = title or "USFM: log(1 + |FFT|), DC centred" + (f" — step {rec.step}" if rec.step is not None else "")
  fig.suptitle(f"{head}\nmask: black = removed band-stop rings; spectra share one scale per row",
               fontsize=9, y=1.0 - 0.08 / (n * CELL + HEADER))
  return fig


def obs_figure(curve: ObsCurve, *, title: str | None = None):
  """D²MAE Fig. 3-style: OBS loss against σ per image with its σ* (top left), σ* counts (top right),
  image 0 blurred / deblurred / |deblurred − original| at each searched σ (bottom). OBS_SIZE inches."""
  from matplotlib.ticker import MaxNLocator
  fig = new_figure(*OBS_SIZE)
  gs = fig.add_gridspec(2, 1, height_ratios=[1.0, 1.25], hspace=0.28, left=0.07, right=0.98,
                        top=0.9, bottom=0.02)
  top = gs[0].subgridspec(1, 2, width_ratios=[2.0, 1.0], wspace=0.28)
  ax = fig.add_subplot(top[0])
  searched = np.isin(np.arange(1, len(curve.sigmas) + 1), curve.searched_t)
  n = curve.losses.shape[0]
  for i in range(n):
    color = f"C{i % 10}"
    ax.plot(curve.sigmas, curve.losses[i], color=color, lw=2.0 if i == 0 else 0.8,
            alpha=1.0 if i == 0 else 0.6, label="image 0" if i == 0 else None)
    ax.plot(curve.sigmas[searched], curve.losses[i][searched], "o", color=color, ms=3)
    j = int(curve.t_star[i]) - 1
    ax.plot([curve.sigmas[j]], [curve.losses[i][j]], "*", color=color, ms=12 if i == 0 else 8,
            markeredgecolor="k", label="σ* (search)" if i == 0 else None)
  ax.set_xlabel("σ_t")
  ax.set_ylabel("OBS loss: MSE to the original" + (" (norm-pix space)" if curve.norm_pix else ""))
  ax.set_xticks(curve.sigmas)
  ax.tick_params(labelsize=7)
  ax.legend(fontsize=7)
  ax.set_title(f"loss vs σ ({n} image{'s' * (n > 1)}); dots: searched levels (step {curve.step})",
               fontsize=8)
  hx = fig.add_subplot(top[1])
  ss = curve.sigmas[curve.searched_t - 1]
  counts = [int(np.sum(np.isclose(curve.sigma_star, s))) for s in ss]
  width = 0.8 * (float(np.min(np.diff(ss))) if len(ss) > 1 else 0.1)
  hx.bar(ss, counts, width=width, color="C1")
  hx.set_xticks(ss)
  hx.yaxis.set_major_locator(MaxNLocator(integer=True))
  hx.tick_params(labelsize=7)
  hx.set_xlabel("σ*")
  hx.set_ylabel("images")
  hx.set_title("σ* distribution", fontsize=8)

  k = len(curve.searched_t)
  strip = gs[1].subgridspec(3, k, wspace=0.04, hspace=0.12)
  diff = np.abs(curve.deblurred - curve.original[None])
  dmax = max(float(diff.max()), 1e-6)
  star = int(curve.t_star[0])
  for c, t in enumerate(curve.searched_t):
    hit = int(t) == star
    head = f"{'σ*=' if hit else 'σ='}{curve.sigmas[t - 1]:.2f}"
    a0 = fig.add_subplot(strip[0, c])
    show(a0, curve.blurred[c], head)
    if hit:
      a0.title.set_color("red")
      a0.title.set_fontweight("bold")
    show(fig.add_subplot(strip[1, c]), curve.deblurred[c])
    show(fig.add_subplot(strip[2, c]), diff[c].mean(-1), cmap="inferno", vmin=0.0, vmax=dmax)
    if c == 0:
      for r, name in enumerate(("blurred", "deblurred", "|difference|")):
        fig.axes[-3 + r].set_ylabel(name, fontsize=7)
  fig.suptitle(title or "D²MAE optimal blurriness search — image 0: blurred input, model output "
               "(mask ratio 0, token t), |output − original|", fontsize=9)
  return fig


def figure_pixels(n_images: int) -> tuple[int, int]:
  """(width, height) in pixels of a saved reconstruction / spectrum figure of n images."""
  return round(4 * CELL * DPI), round((n_images * CELL + HEADER) * DPI)


# ---------------------------------------------------------------------------------------- workdirs


@dataclasses.dataclass
class Pretrained:
  config: object
  model: object
  step: int
  mean: float
  std: float
  workdir: str


def load(workdir: str, step: int | None = None) -> Pretrained:
  """The model, config, checkpoint step and normalisation of a pretraining workdir."""
  from mae_jax.train import core
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config, model, ckpt = core.load_pretrained(workdir, step)
  path = os.path.join(workdir, "data_stats.json")
  if os.path.exists(path):
    with open(path) as f:
      s = json.load(f)
    mean, std = float(s["mean"]), float(s["std"])
  elif config.data.get("mean") is not None and config.data.get("std") is not None:
    mean, std = float(config.data.mean), float(config.data.std)
  else:
    raise ValueError(f"{workdir!r} has no data_stats.json and its config sets no data.mean/std")
  return Pretrained(config, model, int(ckpt), mean, std, workdir)


def load_batch(config, images=4, *, split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
  """(x01, zoom): x01 (N, S, S, C) float32 in [0, 1] at the model's resolution, the first `images`
  records of `split` of the config's dataset (the evaluation stream, whole images resized), or the
  image files given as a list of paths (resized the same way); zoom (N, 2) float32, model pixels
  per stored pixel along (H, W), (S / H, S / W) of each stored image, which σ in stored pixels
  needs (`corrupt_for_figure`, `obs_curve`)."""
  size, chans = int(config.model.image_size), int(config.model.in_chans)
  if isinstance(images, (list, tuple)):
    from PIL import Image
    out, zoom = [], []
    for p in images:
      if not os.path.isfile(p):
        raise ValueError(f"--images: {p!r} is not a file")
      try:
        from mae_jax.data import dicom, folder  # a DICOM file: its first B-mode view
        with Image.fromarray(folder.read_gray(p)) if dicom.is_dicom_file(p) else Image.open(p) as im:
          zoom.append((size / im.height, size / im.width))
          im = im.convert("L" if chans == 1 else "RGB").resize((size, size), Image.BICUBIC)
          a = np.asarray(im, np.float32) / 255.0
      except (OSError, ValueError) as e:
        raise ValueError(f"--images: cannot read {p!r} as an image ({e})") from None
      out.append(a.reshape(size, size, chans))
    return np.stack(out), np.asarray(zoom, np.float32)
  from mae_jax.data import pipeline, sources
  n = int(images)
  if n < 1:
    raise ValueError(f"--images={images!r}: ask for at least one image")
  src = sources.open_source(config.data, split)
  n = min(n, len(src))
  batch = next(iter(pipeline.eval_iterator(src, batch_size=n, image_size=size, in_chans=chans,
                                           with_mask=False)))
  return (np.asarray(batch["image"][:n], np.float32) / 255.0,
          np.asarray(batch["zoom"][:n], np.float32))


def load_images(config, images=4, *, split: str = "validation") -> np.ndarray:
  """`load_batch` without the zoom (figures from these treat the images as stored pixels)."""
  return load_batch(config, images, split=split)[0]


def suffixed(out: str, suffix: str) -> str:
  root, ext = os.path.splitext(out)
  return f"{root}_{suffix}{ext or '.png'}"


def figures(pre: Pretrained, x01, *, zoom=None, seed: int = 0, mask_ratio=None,
            stats: str = "local", obs_step: int | None = None) -> dict:
  """Every figure for one model: {'reconstruction': Figure, 'spectrum'?: ..., 'obs'?: ...}.
  zoom: the batch's (N, 2) model pixels per stored pixel (`load_batch`)."""
  rec = reconstruct(pre.model, pre.config, x01, pre.mean, pre.std, zoom=zoom, seed=seed,
                    mask_ratio=mask_ratio, stats=stats, step=pre.step)
  figs = {"reconstruction": reconstruction_figure(rec)}
  if pre.config.recipe == "usfm":
    figs["spectrum"] = spectrum_figure(rec)
  if pre.config.recipe == "d2mae":
    figs["obs"] = obs_figure(obs_curve(pre.model, pre.config, x01, pre.mean, pre.std, zoom=zoom,
                                       step=obs_step))
  return figs


def write_figures(workdir: str, out: str, *, images=4, split: str = "validation", seed: int = 0,
                  mask_ratio=None, stats: str = "local", step: int | None = None) -> list[str]:
  """The CLI: loads `workdir`, draws its figures, writes OUT (reconstruction), OUT_spectrum (USFM)
  and OUT_obs (D²MAE). Returns the paths written."""
  pre = load(workdir, step)
  x01, zoom = load_batch(pre.config, images, split=split)
  paths = []
  for name, fig in figures(pre, x01, zoom=zoom, seed=seed, mask_ratio=mask_ratio,
                           stats=stats).items():
    paths.append(save(fig, out if name == "reconstruction" else suffixed(out, name)))
  return paths


# --------------------------------------------------------------------------------- notebook helpers


def get_config(recipe: str, arg: str = "smoke", overrides: dict | None = None):
  """configs/<recipe's file>.py:ARG as `--config` would load it, with dotted-key overrides applied."""
  return config_files.load(CONFIG_FILES.get(recipe, recipe), arg, overrides)


def pretrain_demo(recipe: str, workdir: str, *, steps: int = 40, arg: str = "smoke",
                  overrides: dict | None = None, quiet: bool = False) -> str:
  """Trains configs/<recipe>.py:ARG for `steps` steps into `workdir`, unless a finished run of at
  least that many steps is already there (then it is only loaded later). Returns the workdir."""
  from mae_jax import validate
  from mae_jax.train import pretrain
  workdir = os.path.abspath(os.path.expanduser(workdir))
  done = os.path.join(workdir, "train_done.json")
  if os.path.exists(done):
    with open(done) as f:
      finished = int(json.load(f).get("step") or 0)
    # Both: the run said it finished, and its last checkpoint was committed (not left half-written).
    if finished >= steps and max(validate.checkpoint_steps(workdir), default=0) >= steps:
      return workdir
  over = {"train.total_steps": int(steps), "train.log_every": max(1, int(steps)),
          "train.checkpoint_every": max(1, int(steps))}
  over.update(overrides or {})
  config = get_config(recipe, arg, over)
  t0 = time.perf_counter()
  res = pretrain.train(config, workdir)
  if not quiet:
    loss = res.get("loss")
    print(f"{recipe}: {res['step']} steps in {time.perf_counter() - t0:.0f}s"
          + (f", loss {loss:.4f}" if loss is not None else "") + f" -> {workdir}")
  return workdir


def explorer(pre: Pretrained, x01, *, zoom=None, seed: int = 0, stats: str = "local"):
  """An ipywidgets slider panel: mask ratio (MAE path), and σ (Deblurring MAE, Gaussian), the level t
  (D²MAE), the noise std (Denoising MAE) or the spatial mask ratio (USFM). zoom: the batch's (see
  `reconstruct`). Returns the widget, or None (with a note) when ipywidgets is not installed."""
  try:
    import ipywidgets as widgets
    from IPython.display import display
  except ImportError:
    print("ipywidgets is not installed: no interactive sliders (pip install ipywidgets)")
    return None
  config, c = pre.config, pre.config.corrupt
  controls = {}
  if config.model.path == "mae":
    controls["mask_ratio"] = widgets.FloatSlider(value=float(config.model.mask_ratio), min=0.0,
                                                 max=0.95, step=0.05, description="mask ratio")
  if config.recipe == "deblur" and c.blur == "gaussian":
    controls["sigma"] = widgets.FloatSlider(value=float(c.sigma), min=0.1, max=3.0, step=0.1,
                                            description="blur σ")
  elif config.recipe == "d2mae":
    levels = recipes.sigma_levels(c.sigma_levels)
    controls["t"] = widgets.SelectionSlider(options=[(f"{s:.2f}", i + 1) for i, s in enumerate(levels)],
                                            value=len(levels) // 2 + 1, description="σ_t")
  elif config.recipe == "denoise":
    controls["noise_std"] = widgets.FloatSlider(value=float(c.noise_std), min=0.0, max=0.5, step=0.02,
                                                description="noise std")
  elif config.recipe == "usfm":
    controls["spatial_ratio"] = widgets.FloatSlider(value=float(c.spatial_ratio), min=0.0, max=0.9,
                                                    step=0.1, description="mask ratio")
  out = widgets.Output()

  def redraw(**values):
    rec = reconstruct(pre.model, config, x01, pre.mean, pre.std, zoom=zoom, seed=seed,
                      stats=stats, step=pre.step, **values)
    out.clear_output(wait=True)
    with out:
      display(reconstruction_figure(rec))

  ui = widgets.interactive(redraw, **controls)
  box = widgets.VBox([widgets.HBox(list(controls.values())), out])
  ui.update()
  display(box)
  return box


# ------------------------------------------------------------------------------ enhancement


def write_enhancement_figure(workdirs, out: str, *, images: int = 4, labels=None) -> str:
  """low | each enhancement workdir's output (e.g. CycleGAN, + features) | high, from the
  `predictions_test.npz` of enhancement workdirs run on the same test split; `labels` name the
  columns (default: each run's method)."""
  preds = []
  for w in workdirs:
    path = os.path.join(w, "predictions_test.npz")
    if not os.path.exists(path):
      raise ValueError(f"{w!r} holds no predictions_test.npz: is it a finished enhancement workdir?")
    preds.append(np.load(path))
  low, high = preds[0]["low"], preds[0]["high"]
  for w, p in zip(workdirs, preds):
    if p["high"].shape != high.shape or not np.array_equal(p["high"], high):
      raise ValueError(f"{w!r} was tested on other images than {workdirs[0]!r}")
  n = min(int(images), len(low))
  names = labels or [str(p["method"]) for p in preds]
  methods = [(name, p["enhanced"][:n]) for name, p in zip(names, preds, strict=True)]
  return save(enhancement_figure(low[:n], methods, high[:n]), out)


# -------------------------------------------------------------------------------------------- CLI


PROG = "python -m mae_jax.visualize"
# This tool's own flags, not absl's global FLAGS: the tests import it beside `main`, whose --workdir
# it shares; `_cli` joins them to FLAGS for the command line (absl's --help, --helpfull).
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A pretraining workdir (config.json, checkpoints/).", flag_values=FLAGS)
flags.DEFINE_list("enhance", None, "Instead of --workdir: enhancement workdirs, comma separated (e.g. "
                  "CycleGAN, + features); OUT is then low | each one's output | high on their test pairs.",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "The PNG to write, e.g. figs/recon.png (D²MAE adds OUT_obs, USFM "
                    "OUT_spectrum).", flag_values=FLAGS, required=True)
flags.DEFINE_list("images", ["4"], "How many images of --split, or image files, comma separated.",
                  flag_values=FLAGS)
flags.DEFINE_enum("split", "validation", ["train", "validation", "test"], "The dataset split of --images=N.",
                  flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seeds the corruption and the mask.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_float("mask_ratio", None, "Overrides the model's (MAE path).", flag_values=FLAGS)
flags.DEFINE_enum("stats", "local", list(STATS), "Norm-pix de-normalisation statistics (module docstring).",
                  flag_values=FLAGS)


def main(argv: list[str]) -> list[str]:
  """The command line as a call (tests, notebooks): `argv` without the program name. Prints and
  returns the paths written; a mistake raises SystemExit naming the flag, file or workdir
  (several image files: --images=a.png,b.png)."""
  try:
    tool_flags.parse(FLAGS, argv, PROG)
  except SystemExit as e:
    if "unexpected arguments" in str(e):  # the usual slip: image files separated by spaces
      raise SystemExit(f"{e}; several image files: --images=a.png,b.png") from None
    raise
  return _figures_from_flags()


def _figures_from_flags() -> list[str]:
  f = FLAGS
  if not f.workdir and not f.enhance:
    raise SystemExit(f"{PROG}: one of --workdir or --enhance is required")
  items = [s for s in f.images if s]
  images = int(items[0]) if len(items) == 1 and items[0].isdigit() else items
  try:
    if f.enhance:
      paths = [write_enhancement_figure(f.enhance, f.out, images=images if isinstance(images, int) else 4)]
    else:
      paths = write_figures(f.workdir, f.out, images=images, split=f.split, seed=f.seed,
                            mask_ratio=f.mask_ratio, stats=f.stats, step=f.step)
  except ValueError as e:
    raise SystemExit(f"{PROG}: {e}") from None
  for p in paths:
    print(p)
  return paths


def _cli_main() -> None:
  # app.run sets absl's verbosity to INFO: orbax's restore chatter would bury the paths printed.
  absl_logging.set_verbosity(absl_logging.WARNING)
  _figures_from_flags()


if __name__ == "__main__":
  tool_flags.run(FLAGS, _cli_main)
