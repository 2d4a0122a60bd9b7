"""The recipes as the papers define them: D²MAE's levels, token and target; USFM's path and loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx
from focal_frequency_loss import FocalFrequencyLoss

from mae_jax import patches as patch_lib
from mae_jax import recipes
from mae_jax.corrupt import blur as blur_lib
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit

SPEC = vit.ViTSpec(image_size=32, patch_size=8, in_chans=1, width=32, depth=2, num_heads=2)
DEC = dict(decoder_width=16, decoder_depth=1, decoder_heads=2)


def test_sigma_levels_follow_the_paper():
  np.testing.assert_allclose(recipes.sigma_levels("0.1:1.1:0.1"), 0.1 * np.arange(1, 12), atol=1e-6)
  assert len(recipes.sigma_levels("0.1:0.6:0.1")) == 6
  assert len(recipes.sigma_levels("0.1:1.6:0.1")) == 16
  for bad in ("1.1:0.1:0.1", "0.1:1.1:0", "0.1-1.1"):
    with pytest.raises(ValueError, match="corrupt.sigma_levels"):
      recipes.sigma_levels(bad)


def test_d2mae_levels_are_uniform_and_blur_matches_sigma():
  levels = recipes.sigma_levels("0.1:1.1:0.1")
  x = jax.random.uniform(jax.random.key(0), (4000, 8, 8, 1))
  xb, t = jax.jit(lambda k: recipes.d2mae_blur(k, x, levels))(jax.random.key(1))
  counts = np.bincount(np.asarray(t), minlength=12)[1:]
  assert counts.sum() == 4000 and (counts > 0).all()
  assert scipy.stats.chisquare(counts).pvalue > 0.01
  # Each sample is blurred with its own σ_t (checked on a few samples against a scalar-σ blur).
  size = blur_lib.gaussian_kernel_size(1.1)
  for i in range(5):
    ref = blur_lib.gaussian_blur(x[i:i + 1], float(levels[int(t[i]) - 1]), kernel_size=size)
    np.testing.assert_allclose(np.asarray(xb[i:i + 1]), np.asarray(ref), atol=1e-6)


def test_ddpm_timestep_embedding_closed_form():
  d, t = 10, np.array([1, 7])
  emb = np.asarray(mae_lib.timestep_embedding(jnp.asarray(t), d))
  half = d // 2
  for i, ti in enumerate(t):
    for k in range(half):
      w = math.exp(-math.log(10000) * k / (half - 1))
      assert emb[i, k] == pytest.approx(math.sin(ti * w), abs=1e-6)
      assert emb[i, half + k] == pytest.approx(math.cos(ti * w), abs=1e-6)


@pytest.mark.parametrize("embed,prefix", [("token", 2), ("add", 1), ("none", 1)])
def test_d2mae_encoder_sequence(embed, prefix):
  model = mae_lib.MAE(SPEC, blur_embed=embed, loss_on="all", rngs=nnx.Rngs(0), **DEC)
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
  noise = jax.random.uniform(jax.random.key(1), (3, SPEC.num_patches))
  t = jnp.array([1, 5, 11])
  latent, _, _ = model.forward_encoder(x, noise, 0.75, t if embed != "none" else None)
  assert latent.shape == (3, prefix + int(SPEC.num_patches * 0.25), SPEC.width)
  if embed == "token":
    # The blurriness token carries the level: changing t changes the output.
    other, _, _ = model.forward_encoder(x, noise, 0.75, jnp.array([2, 5, 11]))
    assert not np.allclose(np.asarray(latent[0]), np.asarray(other[0]))
    np.testing.assert_allclose(np.asarray(latent[1:]), np.asarray(other[1:]), atol=1e-6)


def test_d2mae_loss_is_against_the_unblurred_image_on_all_patches():
  model = mae_lib.MAE(SPEC, blur_embed="token", loss_on="all", norm_pix_loss=False, rngs=nnx.Rngs(0), **DEC)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  xb = blur_lib.gaussian_blur(x, 1.1)
  noise = jax.random.uniform(jax.random.key(1), (2, SPEC.num_patches))
  loss, pred, _ = model(xb, target=x, noise=noise, blur_t=jnp.array([3, 9]))
  clean = np.asarray(patch_lib.patchify(x, 8))
  blurred = np.asarray(patch_lib.patchify(xb, 8))
  expected = ((np.asarray(pred) - clean) ** 2).mean()
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert abs(float(loss) - ((np.asarray(pred) - blurred) ** 2).mean()) > 1e-4


def test_usfm_path_sees_all_tokens_and_uses_l1_plus_focal_frequency():
  model = mae_lib.SimMIM(SPEC, ffl_weight=0.4, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  xc = recipes.corrupt(_usfm_config(), jax.random.key(3), x)[0]
  tokens = model.encoder(xc)
  assert tokens.shape == (2, 1 + SPEC.num_patches, SPEC.width)
  loss, pred, _ = model(xc, target=x)
  pred_img = np.asarray(patch_lib.unpatchify(pred, 8, SPEC.grid, 1))
  l1 = np.abs(pred_img - np.asarray(x)).mean()
  ffl = FocalFrequencyLoss(loss_weight=1.0, alpha=1.0)(
      torch.from_numpy(pred_img.transpose(0, 3, 1, 2)), torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)))
  assert float(loss) == pytest.approx(l1 + 0.4 * ffl.item(), rel=1e-5)


def _usfm_config():
  import ml_collections
  c = ml_collections.ConfigDict()
  c.recipe = "usfm"
  c.corrupt = dict(spatial_ratio=0.4, spatial_unit=16, frequency=True)
  return c


def test_usfm_corruption_holds_the_image_mean_in_masked_units():
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1))
  xc, kw = recipes.corrupt(_usfm_config(), jax.random.key(5), x)
  pix = np.asarray(kw["pixel_mask"])[..., 0] > 0
  means = np.asarray(x).mean(axis=(1, 2, 3))
  for i in range(3):
    assert pix[i].sum() == int(round(16 * 16 * 4 - 16 * 16 * int(4 * 0.6)))  # 2 of 4 units at ratio 0.4
    np.testing.assert_allclose(np.asarray(xc)[i, ..., 0][pix[i]], means[i], atol=1e-6)


# ------------------------------------------------------------------------- loss space (issue 14.1)

# The loss space each recipe trains in, stated by the papers / reference code (docs/methods.md):
# He et al.'s MAE: normalised pixels; Deblurring MAE, its denoising baseline, D²MAE and the
# ultrasound MAE baseline of their tables: pixel MSE (openmedlab/DeblurringMIM main_pretrain.py).
LOSS_SPACE = [("mae", "smoke", True), ("mae", "smoke,norm_pix=false", False),
              ("deblur_mae", "smoke", False), ("denoise_mae", "smoke", False),
              ("d2mae", "smoke", False)]


@pytest.mark.parametrize("base_default", [True, False])
def test_every_recipe_states_its_loss_space(base_default, monkeypatch):
  """Each config sets `model.norm_pix_loss` itself: flipping the shared default changes nothing."""
  from mae_jax import config_base, models
  from tests.conftest import load_config
  real_base = config_base.base

  def flipped(args):
    c = real_base(args)
    c.model.norm_pix_loss = base_default
    return c

  monkeypatch.setattr(config_base, "base", flipped)
  for name, args, norm_pix in LOSS_SPACE:
    c = load_config(name, args)
    assert c.model.norm_pix_loss is norm_pix, (name, args)
    assert models.build_pretrain_model(c.model).norm_pix_loss is norm_pix, (name, args)
