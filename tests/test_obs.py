"""D²MAE optimal blurriness search (docs/methods.md#d2mae, d2mae.txt Algorithm 1): the argmin, mask ratio 0, the
blur (checked against OpenCV), and once per image — not per epoch — when fine-tuning runs it."""

import json
import math
import os

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mae_jax import losses
from mae_jax.corrupt import blur as blur_lib
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit
from mae_jax.train import finetune, obs
from tests import smoke_runs
from tests.conftest import load_config

LEVELS = "0.1:1.1:0.1"  # σ_t = 0.1·t, t = 1..11
MEAN, STD = 0.4, 0.2


def _pretrain_config(levels=LEVELS):
  c = ml_collections.ConfigDict()
  c.corrupt = ml_collections.ConfigDict({"sigma_levels": levels})
  return c


def _patchify(x, p):
  """(N, H, W, C) -> (N, L, p·p·C), written out here independently of mae_jax.patches."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


class StandIn:
  """A 'pretrained MAE' whose reconstruction error is smallest at a known level for each image:
  it returns the (blurred) input plus W·(t − t_true), where t_true is read from the image's mean
  intensity (a Gaussian blur keeps the mean). Records what the search passes it."""

  W = 0.5

  def __init__(self, spec):
    self.spec = spec
    self.blur_embed = "token"
    self.norm_pix_loss = False
    self.traces = []

  @staticmethod
  def t_true_of(mean01):
    return 1 + 2 * jnp.round((mean01 - 0.2) / 0.1)  # means 0.2, 0.3, ... -> t = 1, 3, ...

  def __call__(self, images, *, target, noise, mask_ratio, blur_t):
    self.traces.append({"mask_ratio": mask_ratio, "noise_shape": noise.shape, "rows": images.shape[0]})
    t_true = self.t_true_of(images.mean(axis=(1, 2, 3)) * STD + MEAN)
    pred = _patchify(images, self.spec.patch_size) + self.W * (blur_t - t_true)[:, None, None]
    return jnp.zeros(()), pred, jnp.zeros(noise.shape)


def _images(t_true, size=16, seed=0):
  rng = np.random.default_rng(seed)
  base = 0.2 + 0.1 * (np.asarray(t_true) - 1) / 2
  tex = 0.02 * rng.standard_normal((len(t_true), size, size, 1))
  return (base[:, None, None, None] + tex).astype(np.float32)


def test_search_picks_known_argmin_with_mask_ratio_zero():
  spec = vit.ViTSpec(image_size=16, patch_size=8, in_chans=1, width=16, depth=1, num_heads=2)
  model = StandIn(spec)
  t_true = np.array([1, 3, 5, 7, 9, 11, 5, 1])
  x = _images(t_true)
  t_star, sigma_star, per = obs.search(model, _pretrain_config(), x, MEAN, STD, step=2)
  np.testing.assert_array_equal(t_star, t_true)
  np.testing.assert_allclose(sigma_star, 0.1 * t_true, rtol=1e-6)
  assert per.shape == (8, 6)
  assert model.traces and all(tr["mask_ratio"] == 0.0 for tr in model.traces)
  # One model call holds every searched level of the batch (6 levels x 8 images).
  assert model.traces[-1]["rows"] == 48 and model.traces[-1]["noise_shape"] == (48, spec.num_patches)

  # The searched losses, recomputed with OpenCV's blur (reflect-101) and numpy.
  ts = np.arange(1, 12, 2)
  ksize = 9  # OpenCV's size for the largest σ = 1.1: round(6.6 + 1) | 1
  for j, t in enumerate(ts):
    xb = np.stack([cv2.GaussianBlur(im[..., 0], (ksize, ksize), 0.1 * t, borderType=cv2.BORDER_REFLECT_101)
                   for im in x])[..., None]
    xn, xbn = (x - MEAN) / STD, (xb - MEAN) / STD
    t_read = 1 + 2 * np.round((xbn.mean(axis=(1, 2, 3)) * STD + MEAN - 0.2) / 0.1)
    pred = _patchify(xbn, 8) + StandIn.W * (t - t_read)[:, None, None]
    ref = np.mean((pred - _patchify(xn, 8)) ** 2, axis=(1, 2))
    np.testing.assert_allclose(per[:, j], ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("step,expected", [(1, list(range(1, 12))), (2, [1, 3, 5, 7, 9, 11]),
                                           (3, [1, 4, 7, 10])])
def test_searched_levels(step, expected):
  assert obs.searched_t(11, step).tolist() == expected


def test_search_equals_direct_mae_calls():
  """A real D²MAE model (token, norm_pix): the batched search equals one model call per level with
  mask ratio 0 (any patch order: here a random one), losses in the normalised-target space."""
  spec = vit.ViTSpec(image_size=16, patch_size=8, in_chans=1, width=16, depth=1, num_heads=2)
  model = mae_lib.MAE(spec, decoder_width=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=True,
                      loss_on="all", blur_embed="token", rngs=nnx.Rngs(3))
  x = np.random.default_rng(1).uniform(size=(5, 16, 16, 1)).astype(np.float32)
  t_star, sigma_star, per = obs.search(model, _pretrain_config(), x, MEAN, STD, step=3)
  ts = [1, 4, 7, 10]
  noise = jax.random.uniform(jax.random.key(0), (5, spec.num_patches))

  @nnx.jit
  def direct(model, x, t):
    xb = blur_lib.gaussian_blur(x, jnp.full((5,), 0.1 * t), kernel_size=9)
    return model((xb - MEAN) / STD, target=(x - MEAN) / STD, noise=noise, mask_ratio=0.0,
                 blur_t=jnp.full((5,), t))

  for j, t in enumerate(ts):
    _, pred, mask = direct(model, jnp.asarray(x), t)
    assert float(mask.sum()) == 0.0
    tgt = losses.normalize_patches(jnp.asarray(_patchify((x - MEAN) / STD, 8)))
    ref = np.mean(np.square(np.asarray(pred) - np.asarray(tgt)), axis=(1, 2))
    np.testing.assert_allclose(per[:, j], ref, rtol=1e-4)
  np.testing.assert_array_equal(t_star, np.asarray(ts)[per.argmin(1)])
  np.testing.assert_allclose(sigma_star, 0.1 * t_star, rtol=1e-6)


# ------------------------------------------------------------------- fine-tuning runs OBS once


@pytest.fixture(scope="module")
def d2mae_pretrain(tmp_path_factory):
  return smoke_runs.smoke_workdir(smoke_runs.shared_root(tmp_path_factory), "d2mae")


def test_finetune_runs_obs_once_per_image(d2mae_pretrain, tmp_path, monkeypatch):
  calls = []
  real_search = obs.search

  def counting(model, config, images01, mean, std, step, **kw):
    calls.append(len(images01))
    return real_search(model, config, images01, mean, std, step, **kw)

  monkeypatch.setattr(obs, "search", counting)
  c = load_config("finetune", f"smoke,init_from={d2mae_pretrain}")
  c.train.epochs = 2
  c.eval.n_boot = 50
  wd = str(tmp_path / "ft")
  res = finetune.run(c, wd)
  sizes = {"train": c.data.num_train, "validation": c.data.num_validation, "test": c.data.num_test}
  bs = c.obs.batch_size
  # One pass over every split (padded last batches), not one per epoch: 2 epochs ran.
  assert len(res["history"]) == 2
  assert len(calls) == sum(math.ceil(n / bs) for n in sizes.values())
  assert sum(calls) == sum(math.ceil(n / bs) * bs for n in sizes.values())
  for split, n in sizes.items():
    with open(os.path.join(wd, "obs", f"obs_{split}.json")) as f:
      blob = json.load(f)
    assert blob["meta"]["searched_t"] == [1, 3, 5, 7, 9, 11]  # configs/d2mae.py: step 2
    assert len(blob["images"]) == n and [r["i"] for r in blob["images"]] == list(range(n))
    assert all(r["t"] in (1, 3, 5, 7, 9, 11) and math.isclose(r["sigma"], 0.1 * r["t"], rel_tol=1e-5)
               and len(r["losses"]) == 6 for r in blob["images"])
  assert os.path.exists(os.path.join(wd, "obs", "sigma_hist_all.png"))
  assert os.path.exists(os.path.join(wd, "results.json"))
  with open(os.path.join(wd, "results.json")) as f:
    out = json.load(f)
  assert out["obs"]["mode"] == "search" and "token" in out["transfer"]

  # A second pass (e.g. a resumed or repeated fine-tuning) reads the cache: no search at all.
  calls.clear()
  pcfg, model, ckpt_step, mean, std = obs.pretrained_for_transfer(c)
  meta = obs.cache_meta(pcfg, init_from=c.init_from, ckpt_step=ckpt_step, step=2, data_cfg=c.data,
                        image_size=pcfg.model.image_size, mean=mean, std=std)
  from mae_jax.data import sources
  srcs = {s: sources.open_source(c.data, s) for s in obs.SPLITS}
  again = obs.ensure(model, pcfg, srcs, workdir=wd, meta=meta, step=2, image_size=pcfg.model.image_size,
                     in_chans=1, mean=mean, std=std)
  assert calls == [] and len(again["train"]["t"]) == sizes["train"]


def test_obs_job_writes_json_and_organ_histograms(d2mae_pretrain, tmp_path):
  c = load_config("obs", f"smoke,init_from={d2mae_pretrain},step=5")
  wd = tmp_path / "obs_job"
  out = obs.run(c, str(wd))
  assert out["meta"]["searched_t"] == [1, 6, 11]
  for split in obs.SPLITS:
    assert (wd / "obs" / f"obs_{split}.json").exists()
  pngs = sorted(p.name for p in (wd / "obs").glob("sigma_hist_*.png"))
  assert "sigma_hist_all.png" in pngs and "sigma_hist_thyroid.png" in pngs and len(pngs) >= 3


def test_obs_rejects_a_non_d2mae_pretraining(tmp_path):
  pre = tmp_path / "pre"
  pre.mkdir()
  (pre / "config.json").write_text(load_config("mae", "smoke").to_json())
  c = load_config("obs", f"smoke,init_from={pre}")
  with pytest.raises(ValueError, match="init_from.*recipe='mae'"):
    obs.run(c, str(tmp_path / "x"))
  c.init_from = ""
  with pytest.raises(ValueError, match="config.init_from"):
    obs.run(c, str(tmp_path / "y"))


def test_obs_scores_d2mae_in_pixel_space():
  """configs/d2mae.py trains with pixel MSE (norm_pix_loss=False), so the search's per-image error
  is the plain MSE between the prediction and the normalised original, no per-patch normalisation
  (the MSE against a per-patch normalised target differs)."""
  from mae_jax import models
  c = load_config("d2mae", "smoke")
  model = models.build_pretrain_model(c.model, seed=1)
  assert model.norm_pix_loss is False
  size, p = c.model.image_size, c.model.patch_size
  x = np.random.default_rng(2).uniform(size=(3, size, size, 1)).astype(np.float32)
  _, _, per = obs.search(model, c, x, MEAN, STD, step=5)  # t = 1, 6, 11
  noise = jax.random.uniform(jax.random.key(0), (3, model.spec.num_patches))
  for j, t in enumerate([1, 6, 11]):
    xb = blur_lib.gaussian_blur(jnp.asarray(x), jnp.full((3,), 0.1 * t), kernel_size=9)
    _, pred, _ = model((xb - MEAN) / STD, target=(jnp.asarray(x) - MEAN) / STD, noise=noise,
                       mask_ratio=0.0, blur_t=jnp.full((3,), t))
    tgt = _patchify((x - MEAN) / STD, p)
    np.testing.assert_allclose(per[:, j], np.mean(np.square(np.asarray(pred) - tgt), axis=(1, 2)),
                               rtol=1e-4)
    normed = np.asarray(losses.normalize_patches(jnp.asarray(tgt)))
    assert not np.allclose(per[:, j], np.mean(np.square(np.asarray(pred) - normed), axis=(1, 2)),
                           rtol=1e-2)
