"""Config checks that run before anything compiles. Each error names the field and its value."""

from __future__ import annotations

import os

from mae_jax import recipes
from mae_jax.corrupt import blur as blur_lib
from mae_jax.models.vit import PRESETS


def _fail(field: str, value, why: str):
  raise ValueError(f"config.{field}={value!r}: {why}")


def validate_model(m) -> None:
  if m.variant not in PRESETS:
    _fail("model.variant", m.variant, f"expected one of {sorted(PRESETS)}")
  patch = m.patch_size or PRESETS[m.variant][3]
  if m.image_size <= 0 or m.image_size % patch:
    _fail("model.image_size", m.image_size, f"must be a positive multiple of the patch size {patch}")
  if m.in_chans not in (1, 3):
    _fail("model.in_chans", m.in_chans, "expected 1 (grayscale) or 3")
  if not 0.0 <= m.mask_ratio < 1.0:
    _fail("model.mask_ratio", m.mask_ratio, "must lie in [0, 1)")
  if m.path not in ("mae", "simmim"):
    _fail("model.path", m.path, "expected 'mae' or 'simmim'")
  if m.dtype not in ("float32", "bfloat16"):
    _fail("model.dtype", m.dtype, "expected 'float32' or 'bfloat16'")
  if m.loss_on not in ("masked", "all"):
    _fail("model.loss_on", m.loss_on, "expected 'masked' or 'all'")
  if m.blur_embed not in ("none", "token", "add"):
    _fail("model.blur_embed", m.blur_embed, "expected 'none', 'token' or 'add'")
  if m.path == "mae" and m.decoder_width % m.decoder_heads:
    _fail("model.decoder_width", m.decoder_width, f"must be divisible by decoder_heads={m.decoder_heads}")


def validate_pretrain(config, *, num_devices: int, process_count: int = 1) -> None:
  validate_model(config.model)
  if config.recipe not in recipes.RECIPES:
    _fail("recipe", config.recipe, f"expected one of {recipes.RECIPES}")
  c, t, d = config.corrupt, config.train, config.data
  if config.recipe == "deblur" and c.blur not in blur_lib.BLURS:
    _fail("corrupt.blur", c.blur, f"expected one of {sorted(blur_lib.BLURS)}")
  if config.recipe == "deblur" and c.blur == "gaussian" and c.sigma <= 0:
    _fail("corrupt.sigma", c.sigma, "must be > 0")
  if config.recipe == "denoise" and c.noise_std <= 0:
    _fail("corrupt.noise_std", c.noise_std, "must be > 0 for the denoising baseline")
  if config.recipe == "d2mae":
    recipes.sigma_levels(c.sigma_levels)  # raises naming the field
  if config.recipe == "usfm":
    if config.model.path != "simmim":
      _fail("model.path", config.model.path, "USFM uses the SimMIM path ('simmim')")
    patch = config.model.patch_size or PRESETS[config.model.variant][3]
    if c.spatial_unit % patch or config.model.image_size % c.spatial_unit:
      _fail("corrupt.spatial_unit", c.spatial_unit,
            f"must be a multiple of the patch size {patch} and divide image_size {config.model.image_size}")
    if not 0.0 <= c.spatial_ratio < 1.0:
      _fail("corrupt.spatial_ratio", c.spatial_ratio, "must lie in [0, 1)")
  if config.model.blur_embed != "none" and config.recipe != "d2mae":
    _fail("model.blur_embed", config.model.blur_embed, "a blurriness embedding needs recipe='d2mae'")
  if t.batch_size <= 0 or t.batch_size % num_devices:
    _fail("train.batch_size", t.batch_size, f"must be a positive multiple of the device count ({num_devices})")
  if t.batch_size % process_count:
    _fail("train.batch_size", t.batch_size, f"must be a multiple of the process count ({process_count})")
  if t.grad_accum < 1 or t.batch_size % (t.grad_accum * num_devices):
    _fail("train.grad_accum", t.grad_accum,
          f"batch_size {t.batch_size} must split into grad_accum micro-batches divisible by {num_devices} devices")
  if t.total_steps < 0 or (t.total_steps == 0 and t.epochs <= 0):
    _fail("train.epochs", t.epochs, "set train.epochs > 0 or train.total_steps > 0")
  if t.base_lr <= 0:
    _fail("train.base_lr", t.base_lr, "must be > 0")
  if t.checkpoint_every <= 0:
    _fail("train.checkpoint_every", t.checkpoint_every, "must be > 0")
  if d.name not in ("us_phantom", "folder"):
    _fail("data.name", d.name, "expected 'us_phantom' or 'folder'")
  if d.name == "folder" and not os.path.isdir(os.path.expanduser(d.folder or "")):
    _fail("data.folder", d.folder, "is not a directory")
  if d.sampler not in ("shuffle", "balanced"):
    _fail("data.sampler", d.sampler, "expected 'shuffle' or 'balanced'")
  if not 0.0 < d.crop_scale_min <= 1.0:
    _fail("data.crop_scale_min", d.crop_scale_min, "must lie in (0, 1]")
  if config.mesh.fsdp < 1 or num_devices % config.mesh.fsdp:
    _fail("mesh.fsdp", config.mesh.fsdp, f"must divide the device count ({num_devices})")
