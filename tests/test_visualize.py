"""Reconstruction figures (issue 8): the array helpers against hand-built arrays, the figures' sizes,
and the CLI on every recipe's smoke checkpoint."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mae_jax import losses, recipes, visualize
from mae_jax import patches as patch_lib
from mae_jax.corrupt import frequency
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit
from tests import smoke_runs

EPS = losses.NORM_PIX_EPS
# Compiled once per model and mask ratio: eager op-by-op execution of even a tiny ViT is slow.
reconstruct_arrays = nnx.jit(visualize.reconstruct_arrays, static_argnames=("mask_ratio", "stats"))


# ---------------------------------------------------------------------------- patches, hand-built


def test_patchify_and_unpatchify_match_hand_built_order():
  img = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  tokens = np.array([[[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]], np.float32)
  np.testing.assert_array_equal(np.asarray(patch_lib.patchify(img, 2)), tokens)
  np.testing.assert_array_equal(np.asarray(patch_lib.unpatchify(tokens, 2, (2, 2), 1)), img)
  # Two channels: (row, col, channel) inside a patch, channel fastest.
  img2 = np.stack([img[..., 0], 100 + img[..., 0]], -1)
  first = np.array([0, 100, 1, 101, 4, 104, 5, 105], np.float32)
  np.testing.assert_array_equal(np.asarray(patch_lib.patchify(img2, 2))[0, 0], first)
  np.testing.assert_array_equal(np.asarray(patch_lib.unpatchify(patch_lib.patchify(img2, 2), 2, (2, 2), 2)),
                                img2)


def test_patch_mask_upsamples_to_pixels():
  mask = np.array([[0, 1, 1, 0]], np.float32)
  want = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], np.float32)
  got = np.asarray(patch_lib.upsample_patch_mask(mask, 2, (2, 2)))
  np.testing.assert_array_equal(got[0, ..., 0], want)


# ------------------------------------------------------------------------------- de-normalisation


def test_denormalize_own_stats_inverts_norm_pix():
  t = np.array([[[1.0, 3.0], [10.0, 14.0]]], np.float32)  # means 2, 12; unbiased vars 2, 8
  pred = np.array([[[-1, 1], [-2, 2]]], np.float32) / np.sqrt(np.array([[[2.0], [8.0]]]) + EPS)
  np.testing.assert_allclose(np.asarray(visualize.denormalize_patches(pred, t, stats="own")), t, atol=1e-5)
  rng = np.random.default_rng(0)
  t = rng.uniform(size=(2, 9, 12)).astype(np.float32)
  pred = losses.normalize_patches(jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(visualize.denormalize_patches(pred, t)), t, atol=1e-5)


def test_denormalize_image_stats_pools_the_visible_pixels():
  t = np.array([[[1, 3], [100, 200], [5, 7], [0, 0]]], np.float32)
  mask = np.array([[0, 1, 0, 1]], np.float32)
  # visible pixels 1, 3, 5, 7: mean 4, unbiased variance (9 + 1 + 1 + 9) / 3
  want = np.sqrt(20 / 3 + EPS) * 1.0 + 4.0
  got = np.asarray(visualize.denormalize_patches(np.ones_like(t), t, mask, stats="image"))
  np.testing.assert_allclose(got, np.full_like(t, want), rtol=1e-6)
  # The default with a mask is the same (the trainer's preview relied on it before `stats`).
  np.testing.assert_allclose(np.asarray(visualize.denormalize_patches(np.ones_like(t), t, mask)), got)


def _local_reference(a, d, mask, h, w):
  """Loops: visible -> own (mean a, var 2d²); masked -> average over visible cells at Chebyshev
  distance ≤ 1, else ≤ 2, else pooled visible pixels."""
  mean, var = np.zeros(h * w), np.zeros(h * w)
  for i in range(h * w):
    if not mask[i]:
      mean[i], var[i] = a[i], 2 * d[i] ** 2
      continue
    for r in (1, 2):
      nb = [j for j in range(h * w) if not mask[j]
            and max(abs(j // w - i // w), abs(j % w - i % w)) <= r]
      if nb:
        mean[i] = np.mean([a[j] for j in nb])
        var[i] = np.mean([2 * d[j] ** 2 for j in nb])
        break
  return mean, var


@pytest.mark.parametrize("h,w,masked", [(3, 3, [0, 4, 8]), (5, 5, [6, 7, 8, 11, 12, 13, 16, 17, 18])])
def test_denormalize_local_stats_take_visible_neighbours(h, w, masked):
  rng = np.random.default_rng(h)
  a = rng.uniform(0, 1, h * w)
  d = rng.uniform(0.1, 0.5, h * w)
  t = np.stack([a - d, a + d], -1)[None].astype(np.float32)  # patch mean a, unbiased var 2d²
  mask = np.zeros((1, h * w), np.float32)
  mask[0, masked] = 1
  pred = (np.array([-1.0, 1.0], np.float32) / np.sqrt(2.0))[None, None].repeat(h * w, 1)
  got = np.asarray(visualize.denormalize_patches(pred, t, mask, stats="local", grid=(h, w)))
  mean, var = _local_reference(a, d, mask[0], h, w)
  want = pred[0] * np.sqrt(var[:, None] + EPS) + mean[:, None]
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
  # Visible patches come back exactly; the 3×3 centre, hand-computed: mean of its 8 neighbours' a.
  np.testing.assert_allclose(got[0][mask[0] == 0], t[0][mask[0] == 0], atol=1e-5)
  if h == 3:
    nb = [1, 2, 3, 5, 6, 7]
    np.testing.assert_allclose(got[0, 4].mean(), a[nb].mean(), rtol=1e-5)


def test_denormalize_rejects_bad_requests():
  t = np.ones((1, 4, 2), np.float32)
  with pytest.raises(ValueError, match="stats"):
    visualize.denormalize_patches(t, t, stats="median")
  with pytest.raises(ValueError, match="mask"):
    visualize.denormalize_patches(t, t, stats="local", grid=(2, 2))
  with pytest.raises(ValueError, match="grid"):
    visualize.denormalize_patches(t, t, np.zeros((1, 4)), stats="local")


# ------------------------------------------------------------------------------ paste and models

SPEC = vit.ViTSpec(image_size=16, patch_size=4, in_chans=1, width=16, depth=1, num_heads=2)


def _tiny_mae(norm_pix=True):
  return mae_lib.MAE(SPEC, decoder_width=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix,
                     rngs=nnx.Rngs(0))


def test_paste_visible_hand_built():
  recon = np.full((1, 2, 2, 1), 9.0, np.float32)
  orig = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)
  pm = np.array([[[[1], [0]], [[0], [1]]]], np.float32)
  np.testing.assert_array_equal(np.asarray(visualize.paste_visible(recon, orig, pm)),
                                [[[[9], [1]], [[2], [9]]]])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_pasted_image_equals_original_on_visible_patches(norm_pix):
  model = _tiny_mae(norm_pix)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  # Small noise = kept: the 4 patches with the smallest noise stay visible (ratio 0.75, L = 16).
  noise = np.tile(np.linspace(1, 0, 16, dtype=np.float32), (2, 1))
  out = reconstruct_arrays(model, x, x, 0.4, 0.2, noise=jnp.asarray(noise))
  want_mask = np.ones((2, 16), np.float32)
  want_mask[:, 12:] = 0
  np.testing.assert_array_equal(np.asarray(out["mask"]), want_mask)
  pix = np.asarray(out["pixel_mask"])[..., 0]
  np.testing.assert_array_equal(pix[:, 12:, :], 0)  # the bottom patch row is visible
  np.testing.assert_array_equal(pix[:, :12, :], 1)
  pasted, orig, recon = (np.asarray(out[k]) for k in ("pasted", "original", "reconstruction"))
  np.testing.assert_array_equal(pasted[:, 12:], orig[:, 12:])
  # The same values up to rounding: `pasted` and `reconstruction` are separate outputs, which XLA may
  # de-normalise in different fusions (a multiply-add contracted in one and not the other).
  np.testing.assert_allclose(pasted[:, :12], recon[:, :12], rtol=0, atol=1e-6)
  assert np.all(np.asarray(out["model_input"])[:, :12] == 0.5)  # masked patches shown grey


def test_simmim_paste_uses_the_pixel_mask():
  model = mae_lib.SimMIM(SPEC, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 1))
  pm = np.zeros((1, 16, 16, 1), np.float32)
  pm[:, :8, 8:] = 1
  out = reconstruct_arrays(model, x, x, 0.4, 0.2, pixel_mask=jnp.asarray(pm))
  pasted, orig, recon = (np.asarray(out[k]) for k in ("pasted", "original", "reconstruction"))
  np.testing.assert_array_equal(pasted[pm[..., 0] == 0], orig[pm[..., 0] == 0])
  np.testing.assert_array_equal(pasted[pm[..., 0] == 1], recon[pm[..., 0] == 1])


def test_reconstruction_columns_is_jittable_for_the_trainer_preview():
  model = _tiny_mae()
  graphdef, state = nnx.split(model)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))

  @jax.jit
  def fn(state, x):
    return visualize.reconstruction_columns(nnx.merge(graphdef, state), x, x, 0.4, 0.2,
                                            key=jax.random.key(3))

  cols = fn(state, x)
  assert len(cols) == 4 and all(c.shape == x.shape for c in cols)
  assert np.isfinite(np.asarray(cols[2])).all()


# ---------------------------------------------------------------------------- corruption, spectra


# Model pixels per stored pixel, per axis, not 1 and not square (a non-square crop), up to the smoke
# configs' zoom bound (1.28) and one beyond it (the kernel is then truncated, as in training).
ZOOM = np.array([[1.25, 0.5], [0.75, 1.0], [2.0, 1.5]], np.float32)


def _cv2_blur(img, sigma_yx, ksize):
  """OpenCV reference: cv2.GaussianBlur with an explicit ksize and per-axis σ, reflect-101."""
  import cv2
  return cv2.GaussianBlur(np.asarray(img, np.float32)[..., 0], (ksize, ksize), sigmaX=float(sigma_yx[1]),
                          sigmaY=float(sigma_yx[0]), borderType=cv2.BORDER_REFLECT_101)[..., None]


@pytest.mark.parametrize("zoom", [None, ZOOM], ids=["no-zoom", "zoom"])
@pytest.mark.parametrize("recipe", smoke_runs.RECIPES)
def test_figure_corruption_is_the_recipes(recipe, zoom):
  config = visualize.get_config(recipe)
  assert config.corrupt.sigma_units == "native"  # the default, which reads the zoom
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1))
  key = jax.random.key(7)
  want, want_kw = recipes.corrupt(config, key, x, zoom)
  got, kw, info = visualize.corrupt_for_figure(config, key, x, zoom=zoom)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if zoom is not None and recipe in ("deblur", "d2mae"):
    # σ in stored pixels: each image blurred with σ·zoom per axis by the recipe's kernel (OpenCV).
    if recipe == "deblur":
      sig, sig_max = np.full(3, config.corrupt.sigma), config.corrupt.sigma
    else:
      sig, sig_max = info["sigma"], recipes.sigma_levels(config.corrupt.sigma_levels).max()
    ksize = recipes.gaussian_size(sig_max, recipes.zoom_bound(config.corrupt, config.data, 32))
    for i in range(3):
      np.testing.assert_allclose(np.asarray(got[i]), _cv2_blur(x[i], sig[i] * zoom[i], ksize), atol=2e-6)
  assert sorted(kw) == sorted(want_kw)
  for k in kw:
    np.testing.assert_array_equal(np.asarray(kw[k]), np.asarray(want_kw[k]))
  if recipe == "d2mae":
    levels = recipes.sigma_levels(config.corrupt.sigma_levels)
    np.testing.assert_array_equal(info["t"], np.asarray(want_kw["blur_t"]))
    np.testing.assert_allclose(info["sigma"], levels[info["t"] - 1])
  if recipe == "usfm":  # the returned band-stop mask is the one the input was filtered with
    smask = info["spectrum_mask"]
    assert smask.shape == (3, 32, 32) and 0 < (1 - smask).sum()
    filtered = frequency.apply_spectrum_mask(x, jnp.asarray(smask))
    pix = np.asarray(want_kw["pixel_mask"])
    rebuilt = np.where(pix > 0, np.asarray(x).mean((1, 2), keepdims=True), np.asarray(filtered))
    np.testing.assert_allclose(rebuilt, np.asarray(want), atol=1e-6)


def test_figure_corruption_overrides():
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  d2 = visualize.get_config("d2mae")
  _, kw, info = visualize.corrupt_for_figure(d2, jax.random.key(0), x, t=3)
  np.testing.assert_array_equal(np.asarray(kw["blur_t"]), [3, 3])
  np.testing.assert_allclose(info["sigma"], [0.3, 0.3], rtol=1e-6)
  with pytest.raises(ValueError, match="t must lie"):
    visualize.corrupt_for_figure(d2, jax.random.key(0), x, t=12)
  with pytest.raises(ValueError, match="sigma"):
    visualize.corrupt_for_figure(visualize.get_config("mae"), jax.random.key(0), x, sigma=0.5)
  de = visualize.get_config("denoise")
  a, _, info = visualize.corrupt_for_figure(de, jax.random.key(0), x, noise_std=0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(x))
  assert info == {"noise_std": 0.0}
  # A level override blurs with σ_t·zoom per axis too, with the recipe's kernel.
  xb, _, _ = visualize.corrupt_for_figure(d2, jax.random.key(0), x, t=11, zoom=ZOOM[:2])
  ksize = recipes.gaussian_size(1.1, recipes.zoom_bound(d2.corrupt, d2.data, 32))
  for i in range(2):
    np.testing.assert_allclose(np.asarray(xb[i]), _cv2_blur(x[i], 1.1 * ZOOM[i], ksize), atol=2e-6)


def test_reconstruct_augments_and_corrupts_like_the_training_step():
  """USFM augments on device: the figure's original is the augmented image, and its input is that
  image's corruption, both as `recipes.augment_and_corrupt` makes them with the figure's key."""
  config = visualize.get_config("usfm")
  assert config.augment.enabled
  spec = vit.ViTSpec(image_size=32, patch_size=4, in_chans=1, width=16, depth=1, num_heads=2)
  model = mae_lib.SimMIM(spec, rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.uniform(jax.random.key(0), (2, 32, 32, 1)))
  k_corrupt, _ = jax.random.split(jax.random.key(5))  # reconstruct's split of key(seed)
  clean, inputs, kw = recipes.augment_and_corrupt(config, k_corrupt, jnp.asarray(x), ZOOM[:2])
  assert not np.allclose(np.asarray(clean), x)  # the augmentation changed the images
  rec = visualize.reconstruct(model, config, x, 0.4, 0.2, zoom=ZOOM[:2], seed=5)
  np.testing.assert_allclose(rec.original, np.asarray(clean), atol=1e-6)
  np.testing.assert_allclose(rec.model_input, np.asarray(inputs), atol=1e-6)
  np.testing.assert_array_equal(rec.pixel_mask, np.asarray(kw["pixel_mask"], np.float32))
  plain = visualize.reconstruct(model, config, x, 0.4, 0.2, zoom=ZOOM[:2], seed=5, augment=False)
  np.testing.assert_array_equal(plain.original, x)


def test_log_amplitude_closed_form():
  c = np.full((1, 8, 8, 1), 0.5)
  s = visualize.log_amplitude(c)[0]
  assert s[4, 4] == pytest.approx(np.log1p(64 * 0.5))
  s[4, 4] = 0
  np.testing.assert_allclose(s, 0, atol=1e-12)
  # cos(2π·2x/8): two peaks of |F| = 64/2 at (0, ±2) from DC
  xx = np.arange(8)
  img = np.cos(2 * np.pi * 2 * xx / 8)[None, None, :, None].repeat(8, 1)
  s = visualize.log_amplitude(img)[0]
  assert s[4, 2] == pytest.approx(np.log1p(32)) and s[4, 6] == pytest.approx(np.log1p(32))
  s[4, 2] = s[4, 6] = 0
  np.testing.assert_allclose(s, 0, atol=1e-9)


# ------------------------------------------------------------------------------ figures, offline


def _fake_reconstruction(recipe, n=3):
  rng = np.random.default_rng(0)
  im = lambda: rng.uniform(size=(n, 32, 32, 1)).astype(np.float32)  # noqa: E731
  info = {"t": np.arange(1, n + 1), "sigma": 0.1 * np.arange(1, n + 1)} if recipe == "d2mae" else {}
  if recipe == "usfm":
    info = {"spectrum_mask": np.ones((n, 32, 32), np.float32), "spatial_ratio": 0.4, "frequency": True}
  pm = np.zeros((n, 32, 32, 1), np.float32)
  return visualize.Reconstruction(recipe, im(), im(), im(), im(), pm, np.zeros((n, 16), np.float32),
                                  norm_pix=True, stats="local", info=info, step=3)


@pytest.mark.parametrize("n", [1, 3])
def test_saved_figures_have_the_promised_size(tmp_path, n):
  rec = _fake_reconstruction("usfm", n)
  for fig, name in ((visualize.reconstruction_figure(rec), "r.png"), (visualize.spectrum_figure(rec), "s.png")):
    path = visualize.save(fig, str(tmp_path / name))
    with Image.open(path) as im:
      assert im.size == visualize.figure_pixels(n)
  expected = (round(4 * visualize.CELL * visualize.DPI), round((n * visualize.CELL + visualize.HEADER) * visualize.DPI))
  assert visualize.figure_pixels(n) == expected
  with pytest.raises(ValueError, match="USFM"):
    visualize.spectrum_figure(_fake_reconstruction("mae", n))


def test_explorer_skips_without_ipywidgets(monkeypatch, capsys):
  import sys
  monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import raises ImportError
  assert visualize.explorer(None, None) is None
  assert "ipywidgets is not installed" in capsys.readouterr().out


# -------------------------------------------------------------------------- CLI on smoke checkpoints


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
  return smoke_runs.shared_root(tmp_path_factory)


def _gray(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("L"), np.float32), im.size


def _assert_not_blank(a, parts=4):
  """Every vertical strip (one per figure column) has real pixel variance, not a flat colour."""
  for strip in np.array_split(a, parts, axis=1):
    assert strip.std() > 10.0, strip.std()


@pytest.mark.parametrize("recipe", smoke_runs.RECIPES)
def test_cli_writes_figures_for_each_recipe(recipe, smoke_root, tmp_path, capsys):
  workdir = smoke_runs.smoke_workdir(smoke_root, recipe)
  out = str(tmp_path / f"{recipe}.png")
  paths = visualize.main([f"--workdir={workdir}", f"--out={out}", "--images=3", "--seed=1"])
  extra = {"d2mae": ["obs"], "usfm": ["spectrum"]}.get(recipe, [])
  assert paths == [out] + [visualize.suffixed(out, s) for s in extra]
  assert capsys.readouterr().out.split() == paths
  a, size = _gray(out)
  assert size == visualize.figure_pixels(3)
  _assert_not_blank(a)
  for s in extra:
    a, size = _gray(visualize.suffixed(out, s))
    want = visualize.figure_pixels(3) if s == "spectrum" else tuple(round(v * visualize.DPI) for v in visualize.OBS_SIZE)
    assert size == want
    _assert_not_blank(a, parts=4 if s == "spectrum" else 2)


def test_cli_takes_image_files_and_reports_bad_ones(smoke_root, tmp_path):
  workdir = smoke_runs.smoke_workdir(smoke_root, "mae")
  files = []
  for i in range(2):
    p = tmp_path / f"img{i}.png"
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(p)
    files.append(str(p))
  out = str(tmp_path / "files.png")
  visualize.main([f"--workdir={workdir}", f"--out={out}", f"--images={','.join(files)}"])
  assert _gray(out)[1] == visualize.figure_pixels(2)
  with pytest.raises(SystemExit, match="not a file"):
    visualize.main([f"--workdir={workdir}", f"--out={out}", f"--images={tmp_path / 'missing.png'}"])
  with pytest.raises(SystemExit, match="no config.json"):
    visualize.main([f"--workdir={tmp_path}", f"--out={out}"])


def test_cli_flag_mistakes_name_the_flag(tmp_path):
  out = str(tmp_path / "x.png")
  with pytest.raises(SystemExit, match="--out"):  # required
    visualize.main([f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit, match="mask-ratio"):  # absl flags: --mask_ratio
    visualize.main([f"--workdir={tmp_path}", f"--out={out}", "--mask-ratio=0.5"])
  with pytest.raises(SystemExit, match="stats"):
    visualize.main([f"--workdir={tmp_path}", f"--out={out}", "--stats=global"])
  with pytest.raises(SystemExit, match=r"unexpected arguments 'b.png'.*--images=a.png,b.png"):
    visualize.main([f"--workdir={tmp_path}", f"--out={out}", "--images", "a.png", "b.png"])
  with pytest.raises(SystemExit, match="one of --workdir or --enhance"):
    visualize.main([f"--out={out}"])
  # Values do not carry over from one call to the next (the seed of a call that failed later).
  with pytest.raises(SystemExit, match="no config.json"):
    visualize.main([f"--workdir={tmp_path}", f"--out={out}", "--seed=5"])
  with pytest.raises(SystemExit):
    visualize.main([f"--out={out}"])
  assert visualize.FLAGS.seed == 0 and visualize.FLAGS.workdir is None


def test_command_line_is_absl(tmp_path):
  """`python -m mae_jax.visualize`: absl's --helpfull lists this tool's flags; a bad workdir is one
  line on stderr naming it, nothing written."""
  import subprocess
  import sys
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  out = tmp_path / "fig.png"
  r = subprocess.run([sys.executable, "-m", "mae_jax.visualize", "--helpfull"], capture_output=True,
                     text=True, env=env, timeout=300)
  for flag in ("--workdir", "--out", "--images", "--enhance", "--mask_ratio", "--stats"):
    assert flag in r.stdout, flag
  r = subprocess.run([sys.executable, "-m", "mae_jax.visualize", f"--workdir={tmp_path}", f"--out={out}"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 1 and not out.exists()
  assert len(r.stderr.strip().splitlines()) == 1 and "no config.json" in r.stderr, r.stderr


def test_obs_curve_agrees_with_the_search(smoke_root):
  from mae_jax.train import obs
  pre = visualize.load(smoke_runs.smoke_workdir(smoke_root, "d2mae"))
  x = visualize.load_images(pre.config, 3)
  curve = visualize.obs_curve(pre.model, pre.config, x, pre.mean, pre.std, step=2)
  t_star, sigma_star, per = obs.search(pre.model, pre.config, x, pre.mean, pre.std, 2)
  np.testing.assert_array_equal(curve.searched_t, np.arange(1, 12, 2))
  np.testing.assert_allclose(curve.losses[:, curve.searched_t - 1], per, rtol=1e-4)
  np.testing.assert_array_equal(curve.t_star, t_star)
  np.testing.assert_allclose(curve.sigma_star, sigma_star)
  assert curve.blurred.shape == curve.deblurred.shape == (6, 32, 32, 1)
  assert np.isfinite(curve.deblurred).all()


def test_obs_curve_blurs_in_stored_pixels_with_the_batch_zoom(smoke_root):
  """σ in stored pixels: the curve is obs.search(..., zoom)'s, and image 0's strip is G_{σ_t·zoom_0}
  per axis with the search's kernel for the batch (OpenCV reference)."""
  from mae_jax.train import obs
  pre = visualize.load(smoke_runs.smoke_workdir(smoke_root, "d2mae"))
  assert pre.config.corrupt.sigma_units == "native"
  x, zoom = visualize.load_batch(pre.config, 3)
  np.testing.assert_array_equal(zoom.shape, (3, 2))
  curve = visualize.obs_curve(pre.model, pre.config, x, pre.mean, pre.std, zoom=ZOOM, step=2)
  t_star, sigma_star, per = obs.search(pre.model, pre.config, x, pre.mean, pre.std, 2, zoom=ZOOM)
  np.testing.assert_allclose(curve.losses[:, curve.searched_t - 1], per, rtol=1e-4)
  np.testing.assert_array_equal(curve.t_star, t_star)
  np.testing.assert_allclose(curve.sigma_star, sigma_star)
  _, _, per1 = obs.search(pre.model, pre.config, x, pre.mean, pre.std, 2)
  assert not np.allclose(per, per1, rtol=1e-3)  # the zoom changes what the search sees
  sigmas = curve.sigmas[curve.searched_t - 1]
  ksize = int(round(float(sigmas.max() * ZOOM.max()) * 6 + 1)) | 1  # OpenCV's size for the largest σ
  for c, s in enumerate(sigmas):
    np.testing.assert_allclose(curve.blurred[c], _cv2_blur(x[0], s * ZOOM[0], ksize), atol=2e-6)
