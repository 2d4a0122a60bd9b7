"""Model construction from `config.model`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax.models import beit
from mae_jax.models import mae as mae_lib
from mae_jax.models import vit

BACKBONES = ("vit", "beit")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES = ("auto", *DTYPES)


def compute_dtype(name: str, backend: str | None = None):
  """The compute dtype for `model.dtype`. 'auto' = bfloat16 on GPU/TPU (the mixed precision the
  official MAE trains with, there via fp16 autocast) and float32 on CPU, where bfloat16 matmuls are
  slower and the parity tests run. Parameters and optimizer state are float32 either way."""
  if name not in DTYPE_NAMES:
    raise ValueError(f"model.dtype={name!r}: expected one of {list(DTYPE_NAMES)}")
  if name == "auto":
    name = "bfloat16" if (backend or jax.default_backend()) in ("gpu", "tpu") else "float32"
  return DTYPES[name]


def vit_spec(mcfg) -> vit.ViTSpec:
  return vit.ViTSpec.from_preset(mcfg.variant, image_size=mcfg.image_size, in_chans=mcfg.in_chans,
                                 patch_size=mcfg.patch_size or None, attention=mcfg.get("attention", "xla"),
                                 remat=mcfg.get("remat", "none"),
                                 scan_layers=bool(mcfg.get("scan_layers", False)))


def beit_options(mcfg) -> beit.BeitOptions:
  return beit.BeitOptions(init_values=float(mcfg.get("layer_scale", 0.1)),
                          shared_rel_pos=bool(mcfg.get("shared_rel_pos", True)))


def build_encoder(mcfg, spec, *, dtype, rngs):
  """The encoder `model.backbone` names: 'vit' (MAE's ViT, sin-cos positions) or 'beit' (USFM's
  released backbone: relative position bias, layer scale, q/v bias; models/beit.py)."""
  backbone = mcfg.get("backbone", "vit")
  if backbone == "vit":
    return None  # the model builds its own vit.Encoder (same parameter draws as always)
  if backbone == "beit":
    return beit.Encoder(spec, options=beit_options(mcfg), dtype=dtype, rngs=rngs)
  raise ValueError(f"model.backbone={backbone!r}: expected one of {list(BACKBONES)}")


def build_pretrain_model(mcfg, *, seed: int = 0):
  """The pretraining model of a config: `MAE` (path 'mae') or `SimMIM` (path 'simmim', USFM)."""
  spec = vit_spec(mcfg)
  dtype = compute_dtype(mcfg.dtype)
  rngs = nnx.Rngs(seed)
  if mcfg.path not in ("mae", "simmim"):
    raise ValueError(f"model.path={mcfg.path!r}: expected 'mae' or 'simmim'")
  encoder = build_encoder(mcfg, spec, dtype=dtype, rngs=rngs)
  if mcfg.path == "mae":
    return mae_lib.MAE(spec, decoder_width=mcfg.decoder_width, decoder_depth=mcfg.decoder_depth,
                       decoder_heads=mcfg.decoder_heads, mask_ratio=mcfg.mask_ratio,
                       norm_pix_loss=mcfg.norm_pix_loss, loss_on=mcfg.loss_on,
                       blur_embed=mcfg.blur_embed, dtype=dtype, rngs=rngs, encoder=encoder)
  if mcfg.path == "simmim":
    return mae_lib.SimMIM(spec, ffl_weight=mcfg.ffl_weight, ffl_alpha=mcfg.ffl_alpha, dtype=dtype,
                          rngs=rngs, encoder=encoder)
  raise ValueError(f"model.path={mcfg.path!r}: expected 'mae' or 'simmim'")
