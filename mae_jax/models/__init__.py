"""Model construction from `config.model`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mae_jax.models import mae as mae_lib
from mae_jax.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def vit_spec(mcfg) -> vit.ViTSpec:
  return vit.ViTSpec.from_preset(mcfg.variant, image_size=mcfg.image_size, in_chans=mcfg.in_chans,
                                 patch_size=mcfg.patch_size or None)


def build_pretrain_model(mcfg, *, seed: int = 0):
  """The pretraining model of a config: `MAE` (path 'mae') or `SimMIM` (path 'simmim', USFM)."""
  spec = vit_spec(mcfg)
  dtype = compute_dtype(mcfg.dtype)
  rngs = nnx.Rngs(seed)
  if mcfg.path == "mae":
    return mae_lib.MAE(spec, decoder_width=mcfg.decoder_width, decoder_depth=mcfg.decoder_depth,
                       decoder_heads=mcfg.decoder_heads, mask_ratio=mcfg.mask_ratio,
                       norm_pix_loss=mcfg.norm_pix_loss, loss_on=mcfg.loss_on,
                       blur_embed=mcfg.blur_embed, dtype=dtype, rngs=rngs)
  if mcfg.path == "simmim":
    return mae_lib.SimMIM(spec, ffl_weight=mcfg.ffl_weight, ffl_alpha=mcfg.ffl_alpha, dtype=dtype,
                          rngs=rngs)
  raise ValueError(f"model.path={mcfg.path!r}: expected 'mae' or 'simmim'")
